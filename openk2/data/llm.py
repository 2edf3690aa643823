"""The one LLM client every synthesis pipeline talks through.

A pipeline asks for chat completions (`ChatRequest` -> `ChatResponse`) and never learns where they
come from: an OpenAI-compatible endpoint (`openk2 serve`, vLLM, a hosted API), the in-process engine,
or a scripted function (tests, and template-driven data where no model is needed). The client adds
what every pipeline needs and none should write again:

* bounded concurrency (a semaphore around the backend call);
* retries with exponential backoff and jitter for transient failures (connection errors, timeouts,
  429, 5xx); permanent ones (400, bad JSON from the model) fail at once;
* a cache keyed by the full request (messages, tools, sampling, seed), persisted as JSONL, so a rerun
  or a resumed run pays nothing for requests it already made;
* `run_jsonl`: resumable output. Each finished item is written to OUT (accepted) and to OUT.done
  (accepted or rejected, with the reason); a rerun skips every id in either, and a line cut by a
  crash is dropped on open, so an interrupted run continues where it stopped without duplicates;
* a tqdm progress bar and a final stats table (requests, cache hits, retries, tokens, acceptance).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from openk2.checkpoint import load_model


class LLMError(RuntimeError):
    """A request that failed for good (bad request, or retries exhausted)."""


class TransientError(LLMError):
    """A failure worth retrying: connection reset, timeout, rate limit, server error."""


class ContextOverflow(LLMError):
    """The request does not fit the model's context: permanent for this item, so it is rejected
    (recorded as done) rather than failed and retried on every rerun."""


class Rejected(Exception):
    """Raised by a pipeline step to reject an item (drifted rewrite, failed rubric) with a reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class ChatRequest:
    messages: list[dict]
    tools: list[dict] | None = None
    temperature: float = 0.6
    max_tokens: int = 512
    seed: int | None = None
    model: str | None = None
    tag: str = ""  # which pipeline step asked (for the stats); not part of the cache key

    def key(self) -> str:
        """Identity of the request: equal requests give the cached response."""
        payload = {k: v for k, v in asdict(self).items() if k != "tag"}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass
class ChatResponse:
    content: str
    tool_calls: list[dict] = field(
        default_factory=list
    )  # OpenAI shape: {id, type, function{name, arguments}}
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def message(self) -> dict:
        """The assistant message to append to a conversation."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


class Backend(Protocol):
    async def complete(self, request: ChatRequest) -> ChatResponse: ...


# ----------------------------------------------------------------------------------------------------
# Backends


class OpenAIBackend:
    """Any OpenAI-compatible /v1/chat/completions endpoint, through the official async client."""

    def __init__(self, base_url: str, model: str = "openk2", api_key: str = "EMPTY", timeout: float = 300.0):
        import openai

        self._openai = openai
        self.model = model
        self._args = dict(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)
        self._clients: dict[int, openai.AsyncOpenAI] = {}

    @property
    def client(self):
        """One AsyncOpenAI per event loop: its connection pool belongs to the loop that opened it."""
        loop = id(asyncio.get_running_loop())
        if loop not in self._clients:
            self._clients[loop] = self._openai.AsyncOpenAI(**self._args)
        return self._clients[loop]

    async def complete(self, request: ChatRequest) -> ChatResponse:
        oa = self._openai
        kwargs: dict[str, Any] = dict(
            model=request.model or self.model,
            messages=request.messages,
            temperature=request.temperature,
            max_tokens=request.max_tokens,
        )
        if request.tools:
            kwargs["tools"] = request.tools
        if request.seed is not None:
            kwargs["seed"] = request.seed
        try:
            r = await self.client.chat.completions.create(**kwargs)
        except (oa.APIConnectionError, oa.APITimeoutError, oa.RateLimitError, oa.InternalServerError) as e:
            raise TransientError(f"{type(e).__name__}: {e}") from e
        except oa.APIStatusError as e:
            if e.status_code == 400 and "context" in str(e.message).lower():
                raise ContextOverflow(f"HTTP 400: {e.message}") from e
            raise LLMError(f"HTTP {e.status_code}: {e.message}") from e
        if not r.choices:
            raise TransientError("the server returned no choices")
        choice = r.choices[0]
        calls = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            }
            for c in choice.message.tool_calls or []
        ]
        usage = r.usage
        return ChatResponse(
            content=choice.message.content or "",
            tool_calls=calls,
            finish_reason=choice.finish_reason or "stop",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
        )


class EngineBackend:
    """The in-process engine: the chat template in, the K2 tool-call parser out (no HTTP)."""

    def __init__(self, engine, tokenizer=None):
        self.engine = engine.start()
        self.tokenizer = tokenizer or engine.tokenizer

    async def complete(self, request: ChatRequest) -> ChatResponse:
        from openk2.serve.sampling import SamplingParams
        from openk2.tokenizer.chat import encode_chat
        from openk2.tokenizer.toolcalls import assistant_message, parse_tool_calls

        ids = encode_chat(self.tokenizer, request.messages, request.tools, add_generation_prompt=True).ids
        budget = self.engine.max_seq_len - len(ids)
        if budget < 1:
            raise ContextOverflow(
                f"prompt of {len(ids)} tokens does not fit the engine's {self.engine.max_seq_len}"
            )
        params = SamplingParams(
            max_tokens=min(request.max_tokens, budget),
            temperature=request.temperature,
            seed=request.seed,
            # the tool-call markers reach the parser; any other special token stays out of the text
            keep_special_token_ids=self.tokenizer.tool_call_marker_ids if request.tools else [],
        )
        try:
            (out,) = await asyncio.to_thread(self.engine.generate, [ids], params)
        except ValueError as e:
            raise LLMError(str(e)) from e
        comp = out.completions[0]
        msg = assistant_message(parse_tool_calls(comp.text, request.tools), include_invalid=False)
        return ChatResponse(
            content=msg.get("content") or "",
            tool_calls=msg.get("tool_calls") or [],
            finish_reason="tool_calls" if msg.get("tool_calls") else (comp.finish_reason or "stop"),
            prompt_tokens=len(ids),
            completion_tokens=len(comp.token_ids),
        )


class ScriptedBackend:
    """A Python function as the model: returns a ChatResponse, a string (the content), or an exception
    instance to raise. Drives the unit tests through every branch, and template-based generation."""

    def __init__(self, fn: Callable[[ChatRequest], ChatResponse | str | BaseException]):
        self.fn = fn
        self.calls = 0

    async def complete(self, request: ChatRequest) -> ChatResponse:
        self.calls += 1
        out = self.fn(request)
        if isinstance(out, BaseException):
            raise out
        if isinstance(out, str):
            out = ChatResponse(content=out)
        if not out.prompt_tokens:
            out.prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in request.messages)
        if not out.completion_tokens:
            out.completion_tokens = len(out.content.split()) + 8 * len(out.tool_calls)
        return out


# ----------------------------------------------------------------------------------------------------
# The client


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
    rejected: Counter = field(default_factory=Counter)  # per reason

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


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path, repair: bool = False) -> list[dict]:
    """Records of a JSONL file. A last line without its newline is what a crash leaves: with
    repair=True it is cut off the file, otherwise it is skipped. Any other bad line is an error."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        if repair:
            with open(path, "r+b") as f:
                f.truncate(cut)
        data = data[:cut]
    out = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
    return out


class LLMClient:
    def __init__(
        self,
        backend: Backend,
        concurrency: int = 8,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        cache_path: str | Path | None = None,
    ):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.backend = backend
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.stats = Stats()
        self.cache: dict[str, dict] = {}
        self.cache_path = Path(cache_path) if cache_path else None
        if self.cache_path:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            for rec in read_jsonl(self.cache_path, repair=True):
                self.cache[rec["key"]] = rec["response"]
        self._sems: dict[int, asyncio.Semaphore] = {}

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()  # one semaphore per event loop (asyncio.run makes a new one)
        return self._sems.setdefault(id(loop), asyncio.Semaphore(self.concurrency))

    async def chat(self, request: ChatRequest) -> ChatResponse:
        key = request.key()
        if key in self.cache:
            self.stats.cache_hits += 1
            return ChatResponse(**self.cache[key])
        attempt = 0
        while True:
            t0 = time.perf_counter()
            try:
                async with self._semaphore():
                    resp = await self.backend.complete(request)
            except TransientError as e:
                if attempt >= self.max_retries:
                    self.stats.failures += 1
                    raise LLMError(f"gave up after {attempt + 1} attempts: {e}") from e
                attempt += 1
                self.stats.retries += 1
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()))
                continue
            except LLMError:
                self.stats.failures += 1
                raise
            finally:
                self.stats.seconds += time.perf_counter() - t0
            break
        self.stats.requests += 1
        self.stats.prompt_tokens += resp.prompt_tokens
        self.stats.completion_tokens += resp.completion_tokens
        self.cache[key] = asdict(resp)
        if self.cache_path:
            _append_jsonl(self.cache_path, {"key": key, "response": asdict(resp)})
        return resp

    async def text(self, messages: list[dict], **kwargs) -> str:
        return (await self.chat(ChatRequest(messages=messages, **kwargs))).content


def extract_json(text: str) -> Any:
    """The first JSON object or array in a model's answer (models wrap JSON in prose and fences)."""
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "[{":
            try:
                return decoder.raw_decode(text, i)[0]
            except json.JSONDecodeError:
                continue
    raise Rejected("no_json")


@dataclass
class RunSummary:
    total: int
    skipped: int  # already done by an earlier run
    accepted: int
    rejected: int
    failed: int  # LLM failures; not marked done, so a rerun tries them again


async def run_jsonl(
    items: Iterable[dict],
    work: Callable[[dict], Awaitable[dict | list[dict]]],
    out_path: str | Path,
    stats: Stats,
    step: str,
    workers: int = 8,
    desc: str | None = None,
) -> RunSummary:
    """Apply `work` to every item whose "id" is not done yet; write accepted results to out_path.

    `work` returns one record (or several) to keep, or raises Rejected(reason). Results are written as
    they finish (order follows completion), each record carrying the item's id as "source_id"."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done_path = out_path.with_name(out_path.name + ".done")
    done = {r["id"] for r in read_jsonl(done_path, repair=True)}
    done |= {r["source_id"] for r in read_jsonl(out_path, repair=True) if "source_id" in r}
    items = list(items)
    ids = [it.get("id") for it in items]
    if any(i is None for i in ids) or len(set(ids)) != len(ids):
        raise ValueError("every item needs a unique 'id' (that is how a resumed run knows what is done)")
    todo = [it for it in items if it["id"] not in done]
    summary = RunSummary(len(items), len(items) - len(todo), 0, 0, 0)
    queue: asyncio.Queue = asyncio.Queue()
    for it in todo:
        queue.put_nowait(it)
    bar = tqdm(total=len(items), initial=summary.skipped, desc=desc or step, unit="item", dynamic_ncols=True)

    async def worker() -> None:
        while not queue.empty():
            item = queue.get_nowait()
            try:
                try:
                    result = await work(item)
                except ContextOverflow:
                    raise Rejected("context_overflow") from None
            except Rejected as r:
                stats.rejected[f"{step}:{r.reason}"] += 1
                summary.rejected += 1
                _append_jsonl(done_path, {"id": item["id"], "accepted": False, "reason": r.reason})
            except LLMError as e:
                summary.failed += 1
                bar.write(f"{step}: item {item['id']!r} failed: {e}")
            else:
                records = result if isinstance(result, list) else [result]
                for rec in records:
                    _append_jsonl(out_path, {**rec, "source_id": item["id"]})
                _append_jsonl(done_path, {"id": item["id"], "accepted": True})
                stats.accepted[step] += 1
                summary.accepted += 1
            bar.update(1)
            bar.set_postfix(ok=summary.accepted, rej=summary.rejected, fail=summary.failed)

    await asyncio.gather(*(worker() for _ in range(max(1, min(workers, len(todo))))))
    bar.close()
    return summary


def make_client(
    base_url: str | None = None,
    model: str = "openk2",
    checkpoint: str | None = None,
    concurrency: int = 8,
    cache_path: str | Path | None = None,
    api_key: str = "EMPTY",
) -> LLMClient:
    """The client the CLI builds: an HTTP endpoint, or a checkpoint loaded into the in-process engine."""
    if (base_url is None) == (checkpoint is None):
        raise ValueError("give exactly one of --base-url (an OpenAI-compatible server) or --checkpoint")
    if base_url is not None:
        backend: Backend = OpenAIBackend(base_url, model=model, api_key=api_key)
    else:
        from openk2.serve.engine import Engine
        from openk2.tokenizer.tokenizer import K2Tokenizer

        backend = EngineBackend(Engine(load_model(checkpoint), K2Tokenizer.from_pretrained(checkpoint)))
    return LLMClient(backend, concurrency=concurrency, cache_path=cache_path)
