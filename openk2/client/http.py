"""Any OpenAI-compatible endpoint (`openk2 serve`, vLLM, a hosted API) over plain HTTP.

httpx rather than the `openai` client on purpose: the conformance suite must see what the server
really sent (a 500, a body that is not JSON, a stream chunk that does not parse), and the client
library would hide those behind its own retries and exceptions. Streamed replies are reassembled
here: content concatenated, tool calls by their `index`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from openk2.client.retry import RetryPolicy
from openk2.client.types import (
    ChatRequest,
    ChatResult,
    CompletionRequest,
    CompletionResult,
    MalformedResponse,
    StreamAssembly,
    ToolCallOut,
)


class EndpointBackend:
    """`/v1/chat/completions` (and `/v1/completions` for raw prompts) of one endpoint.

    `timeout` bounds each request; transient failures are retried `max_retries` times by the retry
    policy (or by `retry`, when given); `concurrency` requests are in flight at once in `chat_many`."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 1,
        concurrency: int = 4,
        retry: RetryPolicy | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint must be an http(s) URL, got {base_url!r}")
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.timeout = timeout
        self.retry = retry or RetryPolicy(max_retries)
        self.concurrency = max(1, concurrency)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=httpx.Timeout(timeout), headers=headers)
        self.model = model or self._first_model()
        self.name = self.model

    def _first_model(self) -> str:
        """The server's first listed model; servers that serve one model ignore the field anyway."""
        try:
            r = self.client.get(f"{self.base_url}/models")
            r.raise_for_status()
            return str(r.json()["data"][0]["id"])
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            return "default"

    def close(self) -> None:
        self.client.close()

    # ---- batches --------------------------------------------------------------------------------
    def chat_many(self, requests: list[ChatRequest]) -> list[ChatResult]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self.chat, requests))

    def complete_many(self, requests: list[CompletionRequest]) -> list[CompletionResult]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self.complete, requests))

    # ---- one request ----------------------------------------------------------------------------
    def chat(self, req: ChatRequest) -> ChatResult:
        body = req.body(self.model)
        parse = _parse_chat_stream if req.stream else _parse_chat
        return self.retry.run(lambda: self._post("/chat/completions", body, req.stream, parse, ChatResult))

    def complete(self, req: CompletionRequest) -> CompletionResult:
        body = req.body(self.model)
        return self.retry.run(
            lambda: self._post("/completions", body, False, _parse_completion, CompletionResult)
        )

    def _post(self, path: str, body: dict, stream: bool, parse, result_type):
        """One HTTP exchange -> a parsed result, or a result whose `error` says what went wrong."""
        url = self.base_url + path
        try:
            if stream:
                with self.client.stream("POST", url, json=body) as r:
                    if r.status_code != 200:
                        r.read()
                        return result_type(error=_http_error(r))
                    return parse(_sse_events(r.iter_lines()))
            r = self.client.post(url, json=body)
            if r.status_code != 200:
                return result_type(error=_http_error(r))
            try:
                data = r.json()
            except ValueError:
                return result_type(error=f"malformed_json: {r.text[:120]!r}")
            return parse(data)
        except httpx.TimeoutException:
            return result_type(error=f"timeout: no complete answer within {self.timeout:g} s")
        except httpx.HTTPError as e:
            return result_type(error=f"connection_error: {type(e).__name__}: {e}")
        except MalformedResponse as e:
            return result_type(error=f"malformed_json: {e}")


def _http_error(r: httpx.Response) -> str:
    """`http_STATUS: body`; a 400 the server marks context_length_exceeded becomes `context_length`."""
    text = r.text[:300]
    if r.status_code == 400 and "context_length_exceeded" in text:
        return f"context_length: {text!r}"
    return f"http_{r.status_code}: {text!r}"


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise MalformedResponse(what)


def _tool_calls_from_message(calls: Any) -> list[ToolCallOut]:
    if calls is None:
        return []
    _need(isinstance(calls, list), "message.tool_calls is not a list")
    out = []
    for c in calls:
        fn = c.get("function") if isinstance(c, dict) else None
        _need(isinstance(fn, dict), "a tool call lacks its `function` object")
        args = fn.get("arguments", "")
        # Some servers send arguments as an object rather than a string; keep it, as JSON text.
        arguments = args if isinstance(args, str) else json.dumps(args)
        out.append(ToolCallOut(str(c.get("id", "")), str(fn.get("name", "")), arguments))
    return out


def _usage(data: dict) -> tuple[int, int]:
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def _parse_chat(data: Any) -> ChatResult:
    try:
        choice = data["choices"][0]
        msg = choice["message"]
    except (KeyError, IndexError, TypeError):
        raise MalformedResponse(f"no choices[0].message in {str(data)[:120]!r}") from None
    _need(isinstance(msg, dict), "choices[0].message is not an object")
    content = msg.get("content") or ""
    _need(isinstance(content, str), "message.content is not a string")
    calls = _tool_calls_from_message(msg.get("tool_calls"))
    prompt_tokens, completion_tokens = _usage(data)
    return ChatResult(
        content,
        calls,
        choice.get("finish_reason"),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )


def _sse_events(lines) -> Iterator[Any]:
    """`data:` payloads of a server-sent event stream, decoded; stops at [DONE]."""
    for line in lines:
        if not line.startswith("data:"):
            continue  # comments, event names, keep-alives, blank separators
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            yield json.loads(payload)
        except ValueError:
            raise MalformedResponse(f"stream chunk is not JSON: {payload[:120]!r}") from None


def _parse_chat_stream(events) -> ChatResult:
    """Reassemble a streamed reply; the usage-only chunk, when sent, gives the token counts."""
    assembly = StreamAssembly()
    prompt_tokens = completion_tokens = 0
    for ev in events:
        if isinstance(ev, dict) and "error" in ev:
            raise MalformedResponse(f"error event in stream: {str(ev['error'])[:120]}")
        try:
            choices = ev["choices"]
        except (KeyError, TypeError):
            raise MalformedResponse(f"stream chunk without choices: {str(ev)[:120]!r}") from None
        if not choices:
            prompt_tokens, completion_tokens = _usage(ev)
            continue
        choice = choices[0]
        _need(isinstance(choice, dict), "a choice is not an object")
        assembly.add(choice.get("delta") or {}, choice.get("finish_reason"))
    result = assembly.result()
    result.prompt_tokens, result.completion_tokens = prompt_tokens, completion_tokens
    return result


def _parse_completion(data: Any) -> CompletionResult:
    try:
        choice = data["choices"][0]
        text = choice["text"]
    except (KeyError, IndexError, TypeError):
        raise MalformedResponse(f"no choices[0].text in {str(data)[:120]!r}") from None
    _need(isinstance(text, str), "choices[0].text is not a string")
    return CompletionResult(text, choice.get("finish_reason"))
