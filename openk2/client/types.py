"""The request and response types every client backend speaks, and the client's errors.

A `ChatRequest` is an OpenAI chat-completions request (`body()` is the JSON an endpoint receives, and
what the in-process backend hands to the server's own chat layer). A `ChatResult` carries an `error`
string instead of raising: a benchmark over 164 problems must not die because request 97 timed out.
The error starts with its kind (`timeout`, `connection_error`, `http_503`, `malformed_json`,
`bad_request`, `context_length`, `engine_error`, `transient`, `failed`), which is what the retry
policy and the async client read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

OPTIONAL_FIELDS = (
    "tools",
    "tool_choice",
    "max_tokens",
    "seed",
    "top_p",
    "stop",
    "response_format",
    "parallel_tool_calls",
    "logit_bias",
)


class LLMError(RuntimeError):
    """A request that failed for good (bad request, or retries exhausted)."""


class TransientError(LLMError):
    """A failure worth retrying: connection reset, timeout, rate limit, server error."""


class ContextOverflow(LLMError):
    """The request does not fit the model's context: permanent for this item."""


class MalformedResponse(ValueError):
    """A server answered, but not in the OpenAI shape."""


@dataclass
class ChatRequest:
    messages: list[dict]
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None  # "auto" | "none" | "required" | {"type": "function", ...}
    max_tokens: int | None = 256  # None: as many as the context leaves
    temperature: float = 0.0
    seed: int | None = 0
    stream: bool = False
    top_p: float | None = None
    stop: list[str] | None = None
    response_format: dict | None = None
    parallel_tool_calls: bool | None = None
    logit_bias: dict[str, float] | None = None
    model: str | None = None  # the endpoint's model name; None: the backend's
    tag: str = ""  # which pipeline step asked (for the stats); not part of the request

    def body(self, model: str) -> dict:
        """The OpenAI JSON body (fields left at None are left out, so the server's defaults hold)."""
        body: dict[str, Any] = {"model": self.model or model, "messages": self.messages}
        for key in OPTIONAL_FIELDS:
            if getattr(self, key) is not None:
                body[key] = getattr(self, key)
        body["temperature"] = self.temperature
        if self.stream:
            body["stream"] = True
        return body

    def key(self) -> str:
        """Identity of the request: equal requests give the cached response."""
        payload = {k: v for k, v in asdict(self).items() if k not in ("tag", "stream")}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass
class CompletionRequest:
    prompt: str
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = 0
    stop: list[str] = field(default_factory=list)

    def body(self, model: str) -> dict:
        body: dict[str, Any] = {
            "model": model,
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        if self.stop:
            body["stop"] = self.stop
        return body


@dataclass
class ToolCallOut:
    id: str
    name: str
    arguments: str  # raw text, as the model wrote it: validating it is the caller's job

    def to_openai(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class ChatResult:
    content: str = ""
    tool_calls: list[ToolCallOut] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None  # None on success; "timeout: ...", "http_500: ...", ...
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 1  # tries it took (retries + 1)

    def message(self) -> dict:
        """The OpenAI assistant message, to continue a multi-turn conversation."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content or None}
        if self.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return msg

    def to_record(self) -> dict:
        return {
            "content": self.content,
            "tool_calls": [asdict(c) for c in self.tool_calls],
            "finish_reason": self.finish_reason,
            "error": self.error,
            "latency_s": round(self.latency_s, 4),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }

    @classmethod
    def from_record(cls, record: dict) -> ChatResult:
        fields = {k: v for k, v in record.items() if k in cls.__dataclass_fields__ and k != "tool_calls"}
        return cls(**fields, tool_calls=[ToolCallOut(**c) for c in record.get("tool_calls") or []])


class StreamAssembly:
    """Streamed `delta` objects -> one ChatResult: content concatenated, tool calls by `index` (id and
    name from their first fragment, arguments concatenated)."""

    def __init__(self):
        self.content: list[str] = []
        self.calls: dict[int, dict] = {}
        self.finish_reason: str | None = None

    def add(self, delta: Any, finish_reason: str | None = None) -> None:
        if not isinstance(delta, dict):
            raise MalformedResponse("delta is not an object")
        if delta.get("content"):
            self.content.append(str(delta["content"]))
        for tc in delta.get("tool_calls") or []:
            if not (isinstance(tc, dict) and isinstance(tc.get("index"), int)):
                raise MalformedResponse("tool-call delta without index")
            slot = self.calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
            slot["id"] = tc.get("id") or slot["id"]
            fn = tc.get("function") or {}
            slot["name"] = fn.get("name") or slot["name"]
            slot["arguments"] += fn.get("arguments") or ""
        self.finish_reason = finish_reason or self.finish_reason

    def result(self) -> ChatResult:
        calls = [ToolCallOut(c["id"], c["name"], c["arguments"]) for _, c in sorted(self.calls.items())]
        return ChatResult("".join(self.content), calls, self.finish_reason)


@dataclass
class CompletionResult:
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    latency_s: float = 0.0
    attempts: int = 1


class Backend(Protocol):
    """Where chat results come from. Batches in, results out, in order; failures are recorded in each
    result's `error`, never raised."""

    name: str

    def chat(self, request: ChatRequest) -> ChatResult: ...

    def chat_many(self, requests: list[ChatRequest]) -> list[ChatResult]: ...

    def complete_many(self, requests: list[CompletionRequest]) -> list[CompletionResult]: ...

    def close(self) -> None: ...
