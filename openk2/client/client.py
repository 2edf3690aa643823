"""`LLMClient`: the async face of a backend for pipelines that run many conversations at once.

A pipeline awaits `client.chat(request)` and never learns where the answer comes from. The client
adds what every pipeline needs and none should write again:

* bounded concurrency: backend calls run on a pool of `concurrency` threads;
* failures raised as exceptions (the backend records them): `ContextOverflow` for a request that
  does not fit, `LLMError` for the rest, after the backend's retry policy has had its tries;
* a cache keyed by the full request (messages, tools, sampling, seed), persisted as JSONL, so a
  rerun or a resumed run pays nothing for requests it already made;
* stats: requests, cache hits, retries, failures, tokens, and per-step acceptance (a final table).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from openk2.client.retry import is_transient
from openk2.client.runner import append_jsonl, read_jsonl
from openk2.client.types import Backend, ChatRequest, ChatResult, ContextOverflow, LLMError


@dataclass
class Stats:
    requests: int = 0  # backend calls that succeeded
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0  # requests that failed for good
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    accepted: Counter = field(default_factory=Counter)  # per pipeline step
    rejected: Counter = field(default_factory=Counter)  # per "step:reason"

    def table(self) -> str:
        rows = [
            ("requests", self.requests),
            ("cache hits", self.cache_hits),
            ("retries", self.retries),
            ("failed requests", self.failures),
            ("prompt tokens", self.prompt_tokens),
            ("completion tokens", self.completion_tokens),
            ("tokens / s", f"{(self.prompt_tokens + self.completion_tokens) / max(self.seconds, 1e-9):.1f}"),
        ]
        for step in sorted(set(self.accepted) | {k.split(":")[0] for k in self.rejected}):
            acc = self.accepted[step]
            rej = sum(v for k, v in self.rejected.items() if k.split(":")[0] == step)
            rate = f"{100 * acc / (acc + rej):.1f}%" if acc + rej else "-"
            rows.append((f"{step}: accepted / rejected", f"{acc} / {rej} ({rate})"))
        for reason, n in sorted(self.rejected.items()):
            rows.append((f"  rejected {reason}", n))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


class LLMClient:
    def __init__(self, backend: Backend, concurrency: int = 8, cache_path: str | Path | None = None):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.backend = backend
        self.concurrency = concurrency
        self.stats = Stats()
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="openk2-llm")
        self.cache: dict[str, dict] = {}
        self.cache_path = Path(cache_path) if cache_path else None
        if self.cache_path:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            for rec in read_jsonl(self.cache_path, repair=True):
                self.cache[rec["key"]] = rec["response"]

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.backend.close()

    async def chat(self, request: ChatRequest) -> ChatResult:
        key = request.key()
        if key in self.cache:
            self.stats.cache_hits += 1
            return ChatResult.from_record(self.cache[key])
        t0 = time.perf_counter()
        result = await asyncio.get_running_loop().run_in_executor(self._pool, self.backend.chat, request)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.retries += result.attempts - 1
        if result.error is not None:
            self.stats.failures += 1
            if result.error.startswith("context_length"):
                raise ContextOverflow(result.error)
            if is_transient(result.error):
                raise LLMError(f"gave up after {result.attempts} attempts: {result.error}")
            raise LLMError(result.error)
        self.stats.requests += 1
        self.stats.prompt_tokens += result.prompt_tokens
        self.stats.completion_tokens += result.completion_tokens
        record = result.to_record()
        self.cache[key] = record
        if self.cache_path:
            append_jsonl(self.cache_path, {"key": key, "response": record})
        return result

    async def text(self, messages: list[dict], **kwargs) -> str:
        return (await self.chat(ChatRequest(messages=messages, **kwargs))).content
