"""A checkpoint run in-process: the engine behind the same chat layer as `openk2 serve`.

Each request becomes the OpenAI body an endpoint would receive and goes through
`openk2.serve.openai_chat.prepare_chat`, so a checkpoint evaluated here and through a server gives the
same greedy answer, tool calls included (tests/test_client_parity.py holds the two equal). A request
the chat layer refuses (bad tools, too long) becomes an error result, not an exception.
"""

from __future__ import annotations

import time
from pathlib import Path

from openk2.client.types import (
    ChatRequest,
    ChatResult,
    CompletionRequest,
    CompletionResult,
    StreamAssembly,
    ToolCallOut,
)
from openk2.serve.engine import Engine
from openk2.serve.openai_chat import PreparedChat, RequestError, prepare_chat
from openk2.serve.sampling import SamplingParams


class LocalBackend:
    """An engine (or a checkpoint / run directory, loaded onto `device`) answering in-process.

    `constrained` applies tool_choice "required" / a named function with a grammar, as the server
    does by default; off, they are left to the model (what the conformance suite measures). The
    engine's background thread is started, so concurrent callers (the async client) share batches."""

    def __init__(
        self,
        checkpoint: str | Path | Engine,
        max_batch: int = 8,
        max_seq_len: int | None = None,
        constrained: bool = True,
        device: str = "cpu",
    ):
        if isinstance(checkpoint, Engine):
            self.engine, self.name = checkpoint, "engine"
        else:
            from openk2.checkpoint import load

            path = Path(checkpoint)
            if not path.is_dir():
                raise FileNotFoundError(f"checkpoint directory not found: {path}")
            model, tokenizer = load(path, device=device)
            self.engine = Engine(model, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len)
            self.name = path.name
        self.engine.start()
        self.tokenizer = self.engine.tokenizer
        self.constrained = constrained

    def close(self) -> None:
        self.engine.stop()

    def chat(self, request: ChatRequest) -> ChatResult:
        return self.chat_many([request])[0]

    def chat_many(self, requests: list[ChatRequest]) -> list[ChatResult]:
        start = time.perf_counter()
        results: list[ChatResult | None] = [None] * len(requests)
        plans: dict[int, PreparedChat] = {}
        for i, req in enumerate(requests):
            try:
                plans[i] = prepare_chat(req.body(self.name), self.engine, self.constrained)
            except RequestError as e:
                kind = "context_length" if e.code == "context_length_exceeded" else "bad_request"
                results[i] = ChatResult(error=f"{kind}: {e.param}: {e.message}")
        # Streamed requests read the engine's text piece by piece, as the server's event stream does.
        streams = {i: plans[i].stream() for i, req in enumerate(requests) if req.stream and i in plans}
        assemblies = {i: StreamAssembly() for i in streams}

        def on_event(i: int):
            def feed(ev) -> None:
                for delta in streams[i].feed(ev.text, finished=ev.finish_reason is not None):
                    assemblies[i].add(delta)

            return feed

        order = list(plans)
        outs = self.engine.generate(
            [plans[i].prompt for i in order],
            [plans[i].params for i in order],
            [on_event(i) if i in streams else None for i in order],
        )
        elapsed = time.perf_counter() - start
        for i, out in zip(order, outs):
            comp = out.completions[0]
            if comp.finish_reason == "error":
                results[i] = ChatResult(error="engine_error: the engine failed while generating")
                continue
            if i in streams:
                result = assemblies[i].result()
                result.finish_reason = streams[i].finish_reason(comp.finish_reason)
            else:
                message, finish = plans[i].reply(comp.text, comp.finish_reason)
                calls = [
                    ToolCallOut(c["id"], c["function"]["name"], c["function"]["arguments"])
                    for c in message.get("tool_calls") or []
                ]
                result = ChatResult(message.get("content") or "", calls, finish)
            result.prompt_tokens, result.completion_tokens = len(plans[i].prompt), len(comp.token_ids)
            results[i] = result
        for r in results:
            r.latency_s = elapsed
        return results

    def complete_many(self, requests: list[CompletionRequest]) -> list[CompletionResult]:
        start = time.perf_counter()
        results: list[CompletionResult | None] = [None] * len(requests)
        prompts, params, order = [], [], []
        for i, r in enumerate(requests):
            prompt = self.tokenizer.encode(r.prompt)
            p = SamplingParams(
                max_tokens=r.max_tokens, temperature=r.temperature, seed=r.seed, stop=list(r.stop)
            )
            try:
                self.engine.check(prompt, p)
            except ValueError as e:  # ContextLengthError is a ValueError too
                results[i] = CompletionResult(error=f"bad_request: {e}")
                continue
            prompts.append(prompt)
            params.append(p)
            order.append(i)
        outs = self.engine.generate(prompts, params)
        elapsed = time.perf_counter() - start
        for i, out in zip(order, outs):
            comp = out.completions[0]
            error = (
                "engine_error: the engine failed while generating" if comp.finish_reason == "error" else None
            )
            results[i] = CompletionResult(comp.text, comp.finish_reason, error)
        for r in results:
            r.latency_s = elapsed
        return results
