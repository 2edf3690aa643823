"""A Python function as the model: for tests, and for template-driven data where no model is needed."""

from __future__ import annotations

from collections.abc import Callable

from openk2.client.retry import RetryPolicy
from openk2.client.types import (
    ChatRequest,
    ChatResult,
    CompletionRequest,
    CompletionResult,
    ContextOverflow,
    LLMError,
    TransientError,
)

Script = Callable[[ChatRequest | CompletionRequest], ChatResult | CompletionResult | str | BaseException]


class ScriptedBackend:
    """`fn(request)` answers: a ChatResult (or CompletionResult), a string (the content / text), or an
    LLMError instance, returned or raised, which becomes the result's error (TransientError ->
    `transient`, ContextOverflow -> `context_length`, others -> `failed`) and goes through the same
    retry policy as a real endpoint's failures. Any other exception is a bug in the script: raised."""

    def __init__(self, fn: Script, retry: RetryPolicy | None = None, name: str = "scripted"):
        self.fn = fn
        self.retry = retry or RetryPolicy(backoff_s=0.0)
        self.name = name
        self.calls = 0

    def close(self) -> None:
        pass

    def chat(self, request: ChatRequest) -> ChatResult:
        return self.retry.run(lambda: self._once(request, ChatResult))

    def chat_many(self, requests: list[ChatRequest]) -> list[ChatResult]:
        return [self.chat(r) for r in requests]

    def complete_many(self, requests: list[CompletionRequest]) -> list[CompletionResult]:
        return [self.retry.run(lambda r=r: self._once(r, CompletionResult)) for r in requests]

    def _once(self, request, result_type):
        self.calls += 1
        try:
            out = self.fn(request)
        except LLMError as e:
            out = e
        if isinstance(out, LLMError):
            kind = {TransientError: "transient", ContextOverflow: "context_length"}.get(type(out), "failed")
            return result_type(error=f"{kind}: {out}")
        if isinstance(out, BaseException):
            raise out
        if isinstance(out, str):
            out = ChatResult(content=out) if result_type is ChatResult else CompletionResult(text=out)
        if isinstance(out, ChatResult):
            if not out.prompt_tokens:
                out.prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in request.messages)
            if not out.completion_tokens:
                out.completion_tokens = len(out.content.split()) + 8 * len(out.tool_calls)
        return out
