"""OpenAI's error shape, for every error the server answers with.

`{"error": {"message", "type", "param", "code"}}` with a 4xx status for a bad request (the message
names the field, `param` holds it) and 5xx only for the server's own failures. The HTTP handlers raise
`APIError`; the middlewares (auth, body limit) answer with `error_response` directly.
"""

from __future__ import annotations

from starlette.responses import JSONResponse


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "invalid_request_error", 503: "server_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
