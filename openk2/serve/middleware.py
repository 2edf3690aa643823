"""The server's ASGI middlewares: API-key auth and the request body-size limit.

Both are plain ASGI callables, not Starlette's BaseHTTPMiddleware: that one runs the endpoint in a
separate task behind its own `receive`, so `Request.is_disconnected()` never sees the client leave
and a non-streamed generation would keep its cache slots until it ends. These pass `receive` and
`send` through untouched (the body limit only counts what `receive` returns).
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openk2.serve.errors import APIError, error_response

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # a 128k-token prompt, even as \u-escaped CJK, fits


class APIKeyMiddleware:
    """Answer 401 to a request under one of `prefixes` that lacks `Authorization: Bearer KEY`."""

    def __init__(self, app: ASGIApp, api_key: str, prefixes: tuple[str, ...]):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefixes):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not hmac.compare_digest(given, self.expected):  # constant time: no key by timing
                error = APIError(401, "invalid or missing API key", code="invalid_api_key")
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Answer 413 to a request body over max_bytes: at once from its Content-Length (nothing is read),
    or, for a chunked body, as soon as the bytes read pass the limit. `path_limits` gives exact paths
    a limit of their own (the weight-update endpoint takes a whole model)."""

    def __init__(self, app: ASGIApp, max_bytes: int, path_limits: dict[str, int] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = path_limits or {}

    def _too_large(self, limit: int) -> APIError:
        message = f"the request body is larger than this server's limit of {limit} bytes"
        return APIError(413, message, code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.path_limits.get(scope["path"], self.max_bytes)
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            if not length.isdigit():
                error = APIError(400, f"Content-Length must be a number of bytes, got {length!r:.40}")
                await error_response(error)(scope, receive, send)
                return
            if int(length) > limit:
                await error_response(self._too_large(limit))(scope, receive, send)
                return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if started:
                raise
            await error_response(self._too_large(limit))(scope, receive, send)
