"""Where evaluation outputs come from: a local checkpoint through the engine, or any OpenAI-compatible
endpoint over plain HTTP.

Both backends answer batches of `ChatRequest`s (and raw `CompletionRequest`s) with results that carry
an `error` string instead of raising: a benchmark over 164 problems must not die because request 97
timed out or the server sent half a JSON object. The error is recorded next to the item and counts as
a failure in the metrics.

The endpoint backend speaks HTTP with httpx rather than through the `openai` client on purpose: the
conformance suite must see what the server really sent (a 500, a body that is not JSON, a stream
chunk that does not parse), and the client library would hide those behind retries and exceptions.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from openk2.checkpoint import load_model


@dataclass
class ChatRequest:
    messages: list[dict]
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None  # "auto" | "none" | "required" | {"type": "function", ...}
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = 0
    stream: bool = False


@dataclass
class CompletionRequest:
    prompt: str
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = 0
    stop: list[str] = field(default_factory=list)


@dataclass
class ToolCallOut:
    id: str
    name: str
    arguments: str  # raw text, as the model wrote it: validating it is the evaluator's job


@dataclass
class ChatResult:
    content: str = ""
    tool_calls: list[ToolCallOut] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None  # None on success; "timeout", "http_500", "malformed_json", ...
    latency_s: float = 0.0

    def message(self) -> dict:
        """The OpenAI assistant message, to continue a multi-turn conversation."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content or None}
        if self.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        return msg

    def to_record(self) -> dict:
        return {
            "content": self.content,
            "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in self.tool_calls],
            "finish_reason": self.finish_reason,
            "error": self.error,
            "latency_s": round(self.latency_s, 4),
        }


@dataclass
class CompletionResult:
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    latency_s: float = 0.0


class Backend(Protocol):
    name: str

    def chat_many(self, requests: list[ChatRequest]) -> list[ChatResult]: ...

    def complete_many(self, requests: list[CompletionRequest]) -> list[CompletionResult]: ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint


class EndpointBackend:
    """Any server that speaks `/v1/chat/completions` (and `/v1/completions` for raw prompts).

    `timeout` bounds each request (connect, read and the whole body); transient failures (timeouts,
    connection errors, 5xx) are retried `max_retries` times, then reported. `concurrency` requests
    are in flight at once."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 1,
        concurrency: int = 4,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint must be an http(s) URL, got {base_url!r}")
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.timeout = timeout
        self.max_retries = max_retries
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
        body: dict[str, Any] = {
            "model": self.model,
            "messages": req.messages,
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "stream": req.stream,
        }
        if req.seed is not None:
            body["seed"] = req.seed
        if req.tools is not None:
            body["tools"] = req.tools
        if req.tool_choice is not None:
            body["tool_choice"] = req.tool_choice
        parse = _parse_chat_stream if req.stream else _parse_chat
        result = self._with_retries(lambda: self._post("/chat/completions", body, req.stream, parse))
        return result if isinstance(result, ChatResult) else ChatResult(**result)

    def complete(self, req: CompletionRequest) -> CompletionResult:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": req.prompt,
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
        }
        if req.seed is not None:
            body["seed"] = req.seed
        if req.stop:
            body["stop"] = req.stop
        result = self._with_retries(lambda: self._post("/completions", body, False, _parse_completion))
        return result if isinstance(result, CompletionResult) else CompletionResult(**result)

    def _with_retries(self, attempt):
        for i in range(self.max_retries + 1):
            start = time.perf_counter()
            result = attempt()
            if isinstance(result, dict):  # a failure: {"error": ...}
                result["latency_s"] = time.perf_counter() - start
                if i < self.max_retries and _transient(result["error"]):
                    time.sleep(min(2.0, 0.25 * 2**i))
                    continue
            else:
                result.latency_s = time.perf_counter() - start
            return result
        raise AssertionError("unreachable")

    def _post(self, path: str, body: dict, stream: bool, parse):
        """One HTTP exchange -> a parsed result, or {"error": reason} for the caller to record."""
        url = self.base_url + path
        try:
            if stream:
                with self.client.stream("POST", url, json=body) as r:
                    if r.status_code != 200:
                        r.read()
                        return {"error": _http_error(r)}
                    return parse(_sse_events(r.iter_lines()))
            r = self.client.post(url, json=body)
            if r.status_code != 200:
                return {"error": _http_error(r)}
            try:
                data = r.json()
            except ValueError:
                return {"error": f"malformed_json: {r.text[:120]!r}"}
            return parse(data)
        except httpx.TimeoutException:
            return {"error": f"timeout: no complete answer within {self.timeout:g} s"}
        except httpx.HTTPError as e:
            return {"error": f"connection_error: {type(e).__name__}: {e}"}
        except _Malformed as e:
            return {"error": f"malformed_json: {e}"}


class _Malformed(ValueError):
    """The server answered 200 but the body is not the OpenAI shape."""


def _transient(error: str) -> bool:
    return error.startswith(("timeout", "connection_error", "http_5"))


def _http_error(r: httpx.Response) -> str:
    return f"http_{r.status_code}: {r.text[:200]!r}"


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise _Malformed(what)


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
        out.append(
            ToolCallOut(
                str(c.get("id", "")),
                str(fn.get("name", "")),
                args if isinstance(args, str) else json.dumps(args),
            )
        )
    return out


def _parse_chat(data: Any) -> ChatResult:
    try:
        choice = data["choices"][0]
        msg = choice["message"]
    except (KeyError, IndexError, TypeError):
        raise _Malformed(f"no choices[0].message in {str(data)[:120]!r}") from None
    _need(isinstance(msg, dict), "choices[0].message is not an object")
    content = msg.get("content") or ""
    _need(isinstance(content, str), "message.content is not a string")
    return ChatResult(content, _tool_calls_from_message(msg.get("tool_calls")), choice.get("finish_reason"))


def _sse_events(lines) -> Any:
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
            raise _Malformed(f"stream chunk is not JSON: {payload[:120]!r}") from None


def _parse_chat_stream(events) -> ChatResult:
    """Reassemble streamed deltas: content concatenated, tool calls by `index` (id and name from the
    first fragment, arguments concatenated)."""
    content: list[str] = []
    calls: dict[int, dict] = {}
    finish = None
    for ev in events:
        if isinstance(ev, dict) and "error" in ev:
            raise _Malformed(f"error event in stream: {str(ev['error'])[:120]}")
        try:
            choices = ev["choices"]
        except (KeyError, TypeError):
            raise _Malformed(f"stream chunk without choices: {str(ev)[:120]!r}") from None
        if not choices:
            continue  # usage-only chunk
        choice = choices[0]
        delta = choice.get("delta") or {}
        _need(isinstance(delta, dict), "delta is not an object")
        if delta.get("content"):
            content.append(delta["content"])
        for tc in delta.get("tool_calls") or []:
            _need(isinstance(tc, dict) and isinstance(tc.get("index"), int), "tool-call delta without index")
            slot = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
            slot["id"] = tc.get("id") or slot["id"]
            fn = tc.get("function") or {}
            slot["name"] = fn.get("name") or slot["name"]
            slot["arguments"] += fn.get("arguments") or ""
        finish = choice.get("finish_reason") or finish
    tool_calls = [ToolCallOut(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())]
    return ChatResult("".join(content), tool_calls, finish)


def _parse_completion(data: Any) -> CompletionResult:
    try:
        choice = data["choices"][0]
        text = choice["text"]
    except (KeyError, IndexError, TypeError):
        raise _Malformed(f"no choices[0].text in {str(data)[:120]!r}") from None
    _need(isinstance(text, str), "choices[0].text is not a string")
    return CompletionResult(text, choice.get("finish_reason"))


# ----------------------------------------------------------------------------------------------------
# Local checkpoint through the engine


class LocalBackend:
    """A checkpoint directory (weights + tokenizer) run in-process by `openk2.serve.engine.Engine`.

    Tool choice is applied the way the server applies it: "none" bans the tool-call section marker;
    "required" and a named function constrain decoding to a valid tool-call section when `constrained`
    is on, and are left to the model when it is off (which is what the conformance suite measures)."""

    def __init__(
        self,
        checkpoint: str | Path,
        max_batch: int = 8,
        max_seq_len: int | None = None,
        constrained: bool = True,
        device: str = "cpu",
    ):
        from openk2.serve.engine import Engine
        from openk2.tokenizer.tokenizer import K2Tokenizer

        path = Path(checkpoint)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {path}")
        self.tokenizer = K2Tokenizer.from_pretrained(path)
        self.model = load_model(path, device=device)
        self.engine = Engine(self.model, self.tokenizer, max_batch=max_batch, max_seq_len=max_seq_len)
        self.constrained = constrained
        self.name = path.name

    def close(self) -> None:
        self.engine.stop()

    def _params(self, req: ChatRequest | CompletionRequest, tools=None, tool_choice=None):
        from openk2.serve.sampling import SamplingParams

        params = SamplingParams(
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            seed=req.seed,
        )
        if isinstance(req, CompletionRequest):
            params.stop = list(req.stop)
            return params
        if tools:  # as the server: the parser needs the markers, other special tokens stay out
            params.keep_special_token_ids = self.tokenizer.tool_call_marker_ids
        if tool_choice == "none" and tools:
            params.banned_token_ids = [
                self.tokenizer.tool_calls_section_begin_id,
                self.tokenizer.tool_call_begin_id,
            ]
        elif self.constrained and tools and tool_choice == "required":
            params.grammar = self.engine.grammars.tool_calls(tools)
        elif self.constrained and tools and isinstance(tool_choice, dict):
            params.grammar = self.engine.grammars.tool_calls(tools, tool_choice["function"]["name"])
        return params

    def _run(self, prompts: list[list[int] | None], params: list, on_events: list) -> list:
        """Submit everything, step the engine until done; a request refused at submission (too long,
        a broken grammar) becomes an error result instead of stopping the batch."""
        outs: list = []
        for prompt, p, cb in zip(prompts, params, on_events):
            if isinstance(p, str) or prompt is None:
                outs.append(p if isinstance(p, str) else "error: bad request")
                continue
            try:
                outs.append(self.engine.submit(prompt, p, cb))
            except ValueError as e:  # ContextLengthError is a ValueError too
                outs.append(f"refused: {e}")
        while any(not isinstance(o, str) and not o.finished for o in outs):
            self.engine.step()
        return outs

    def chat_many(self, requests: list[ChatRequest]) -> list[ChatResult]:
        from openk2.tokenizer.chat import encode_chat
        from openk2.tokenizer.toolcalls import StreamingToolCallParser, parse_tool_calls

        start = time.perf_counter()
        prompts, params, parsers, callbacks = [], [], [], []
        for req in requests:
            try:
                prompts.append(
                    encode_chat(self.tokenizer, req.messages, req.tools, add_generation_prompt=True).ids
                )
                params.append(self._params(req, req.tools, req.tool_choice))
            except (ValueError, KeyError, TypeError) as e:
                prompts.append(None)
                params.append(f"bad_request: {type(e).__name__}: {e}")
            # Streamed requests are parsed piece by piece as the engine emits text, like the server.
            parser = StreamingToolCallParser(req.tools) if req.stream else None
            parsers.append(parser)
            callbacks.append((lambda ev, p=parser: p.feed(ev.text)) if parser is not None else None)
        outs = self._run(prompts, params, callbacks)
        elapsed = time.perf_counter() - start
        results = []
        for req, out, parser in zip(requests, outs, parsers):
            if isinstance(out, str):
                results.append(ChatResult(error=out, latency_s=elapsed))
                continue
            comp = out.completions[0]
            if comp.finish_reason == "error":
                results.append(ChatResult(error="engine_error", latency_s=elapsed))
                continue
            if parser is not None:
                parser.finish()
                parsed = parser.result()
            else:
                parsed = parse_tool_calls(comp.text, req.tools)
            calls = [ToolCallOut(c.id, c.name, c.arguments) for c in parsed.tool_calls]
            finish = "tool_calls" if calls and comp.finish_reason == "stop" else comp.finish_reason
            results.append(ChatResult(parsed.content, calls, finish, None, elapsed))
        return results

    def complete_many(self, requests: list[CompletionRequest]) -> list[CompletionResult]:
        start = time.perf_counter()
        prompts = [self.tokenizer.encode(r.prompt) for r in requests]
        outs = self._run(prompts, [self._params(r) for r in requests], [None] * len(requests))
        elapsed = time.perf_counter() - start
        results = []
        for out in outs:
            if isinstance(out, str):
                results.append(CompletionResult(error=out, latency_s=elapsed))
            else:
                comp = out.completions[0]
                error = "engine_error" if comp.finish_reason == "error" else None
                results.append(CompletionResult(comp.text, comp.finish_reason, error, elapsed))
        return results


def make_backend(
    model: str | None = None,
    endpoint: str | None = None,
    *,
    api_key: str | None = None,
    served_model: str | None = None,
    timeout: float = 60.0,
    max_retries: int = 1,
    concurrency: int = 4,
    max_batch: int = 8,
    constrained: bool = True,
) -> Backend:
    if (model is None) == (endpoint is None):
        raise ValueError("give exactly one of --model CHECKPOINT or --endpoint URL")
    if endpoint is not None:
        return EndpointBackend(endpoint, served_model, api_key, timeout, max_retries, concurrency)
    return LocalBackend(model, max_batch=max_batch, constrained=constrained)
