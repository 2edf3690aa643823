"""The inference engine: prefill and decode against the absorbed MLA cache, continuous batching.

One loop, one thread owns the model and the cache. Each `step()`:
  1. drops aborted requests and those past their deadline (their slots free at once);
  2. admits waiting requests into free slots and prefills them together (right-padded batch, one
     forward), sampling each one's first token: a new request joins between two decode steps. With
     the prefix cache (prefix_cache.py, on by default), a prompt's longest cached prefix is copied
     into its slot first and only the rest of the prompt is run;
  3. runs one decode step for every running sequence: one new token each, whatever its length;
  4. retires finished sequences (stop token, stop string, max_tokens, abort), which frees their slots.

The model's `LatentForward` runs prefill and decode against the latent cache (per block: project ->
write the cache rows -> attend to the slot's rows -> MLP / MoE); forward.py places its rows in the
cache slots. Requests come in from any thread (`submit`, `abort`), results go out
through callbacks; `generate` is the synchronous batch API (RL rollouts, data synthesis) and `stream`
the asyncio one (the HTTP server).

One request can never take others down with it: whatever raises while a request is admitted, sampled,
advanced or told about its tokens (a grammar, a seed, a callback whose event loop is gone) finishes
that request alone with reason "error"; a batched prefill that fails is retried request by request,
so only the one that fails again is dropped; and the loop goes on serving after any exception.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from openk2.model.transformer import Transformer
from openk2.serve.cache import ContextLengthError, LatentCache
from openk2.serve.constrained import Constraint, GrammarCompiler
from openk2.serve.forward import CachedForward
from openk2.serve.prefix_cache import DEFAULT_BLOCK_SIZE, PrefixCache
from openk2.serve.sampling import SamplingParams, TokenLogprob, sample
from openk2.tokenizer.tokenizer import IncrementalDecoder, K2Tokenizer

log = logging.getLogger(__name__)

__all__ = [
    "Completion",
    "ContextLengthError",
    "Engine",
    "EngineFullError",
    "RequestOutput",
    "StreamEvent",
    "WeightUpdateError",
]


# the float dtypes a weight update may arrive in (cast to the served model's dtype)
UPDATE_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class WeightUpdateError(ValueError):
    """A weight update the engine refuses (`Engine.load_weights`); the served weights are unchanged."""


DEFAULT_PREFIX_CACHE_TOKENS = 8192  # of shared prompt prefixes kept (0 = off); see prefix_cache.py


class EngineFullError(RuntimeError):
    """The waiting queue is full (an HTTP 503 for the server)."""


@dataclass
class StreamEvent:
    """New output of one completion (`index` among the request's n): usually one token."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    # on the last event: "stop" | "length" | "abort" | "error" | "timeout" (past the request deadline)
    finish_reason: str | None = None


@dataclass
class Completion:
    index: int
    token_ids: list[int] = field(default_factory=list)  # includes the stop token, when one ended it
    text: str = ""  # excludes stop tokens and stop strings
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    completions: list[Completion]
    time_to_first_token: float | None = None  # seconds from submission to the first sampled token
    error: str | None = None  # why it finished with "error", for the log and the caller

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)


class _Request:
    def __init__(
        self, request_id: str, prompt: list[int], params: SamplingParams, on_event, timeout: float | None
    ):
        self.id = request_id
        self.prompt = prompt
        self.params = params
        self.on_event: Callable[[StreamEvent], None] | None = on_event
        self.output = RequestOutput(request_id, prompt, [Completion(i) for i in range(params.n)])
        self.arrival = time.perf_counter()
        self.deadline = self.arrival + timeout if timeout else None
        self.done = threading.Event()


class _Sequence:
    """One completion in flight: its tokens, its cache slot, its sampling and text state."""

    def __init__(self, req: _Request, index: int, engine: Engine):
        self.req = req
        self.index = index
        self.params = req.params
        self.out = req.output.completions[index]
        self.slot = -1
        self.cached = 0  # rows of the slot that hold this sequence's tokens
        self.last = -1  # the latest sampled token, fed in the next decode step
        # Only a seeded completion owns a generator (so it samples the same alone or in any batch);
        # the others share the engine's, which lets the sampler draw their noise in one call.
        self.generator: torch.Generator | None = None
        if self.params.seed is not None:  # any int64 seed; + index wraps in torch's 64-bit range
            seed = (self.params.seed + index) % 2**64
            self.generator = torch.Generator(engine.device).manual_seed(seed)
        self.constraint: Constraint | None = (
            engine.grammars.matcher(self.params.grammar) if self.params.grammar is not None else None
        )
        self.decoder = IncrementalDecoder(engine.tokenizer)
        # Special tokens that stay out of the text: all of them when skip_special_tokens, except the
        # ones asked for (the tool-call markers, which the API's parser needs).
        self.hidden: Callable[[int], bool] = lambda tok: False
        if self.params.skip_special_tokens:
            keep, is_special = set(self.params.keep_special_token_ids), engine.tokenizer.is_special
            self.hidden = lambda tok: tok not in keep and is_special(tok)
        self.held = ""  # decoded text not yet emitted: it could be the start of a stop string
        self.stop_ids = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            self.stop_ids |= {engine.tokenizer.eos_id, engine.tokenizer.im_end_id}

        self.banned: torch.Tensor | None = None
        if self.params.banned_token_ids:
            self.banned = torch.ones(engine.vocab_size, dtype=torch.bool)
            self.banned[self.params.banned_token_ids] = False  # True = allowed

    def mask(self) -> torch.Tensor | None:
        """Bool (V,) of the tokens that may come next, or None when every token may."""
        if self.constraint is None:
            return self.banned
        allowed = self.constraint.allowed()
        return allowed if self.banned is None else allowed & self.banned


class Engine:
    """Serve one model: `generate` (batched, blocking), `stream` (async), `submit`/`abort` (threads).

    max_batch sequences run at once, each in a cache slot of max_seq_len tokens; up to max_queue more
    wait. A request that can never fit a slot is refused with ContextLengthError; a full queue with
    EngineFullError. With request_timeout (seconds), a request still unfinished that long after its
    submission, waiting or running, finishes with reason "timeout" and frees its slots.
    prefix_cache_tokens (0 = off) bounds the prefix cache, in tokens of whole prefix_block_size
    blocks; `load_weights` clears it, and so must anyone who changes the weights another way
    (`clear_prefix_cache`).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: K2Tokenizer,
        max_batch: int = 16,
        max_seq_len: int | None = None,
        max_queue: int = 1024,
        max_prefill_tokens: int = 8192,
        compile: bool = False,
        request_timeout: float | None = None,
        prefix_cache_tokens: int = DEFAULT_PREFIX_CACHE_TOKENS,
        prefix_block_size: int = DEFAULT_BLOCK_SIZE,
    ):
        if max_queue < 0 or max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        if prefix_cache_tokens < 0:
            raise ValueError(f"prefix_cache_tokens must be >= 0 (0 = off), got {prefix_cache_tokens}")
        if request_timeout is not None and not request_timeout > 0:
            raise ValueError(f"request_timeout must be positive seconds, got {request_timeout}")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} ids but the model only "
                f"{model.config.vocab_size} embeddings"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.vocab_size = model.config.vocab_size
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.request_timeout = request_timeout
        # called on the engine thread with each finished request and its seconds since submission
        self._observers: list[Callable[[RequestOutput, float], None]] = []
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        max_seq_len = max_seq_len or min(self.config.max_position_embeddings, 8192)
        self.cache = LatentCache(self.config, max_batch, max_seq_len, dtype=self.dtype, device=self.device)
        self._grammars: GrammarCompiler | None = None
        self.waiting: deque[_Request] = deque()
        self.running: list[_Sequence] = []
        self._aborts: set[str] = set()
        self._cv = threading.Condition()  # guards waiting/_aborts; notified on new work
        self._model_lock = threading.Lock()  # held by a step and by load_weights
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count()
        self._pending: dict[str, _Request] = {}  # not yet retired, by id
        self._rng = torch.Generator(device=self.device)  # noise for unseeded sampling
        self._rng.seed()
        prefix = None
        if prefix_cache_tokens:
            prefix = PrefixCache(self.cache, prefix_cache_tokens, prefix_block_size)
        self.forward = CachedForward(model, self.cache, compile=compile, prefix=prefix)
        if compile:
            # compile before the first request, not during it (about a minute on a laptop CPU the first
            # time; inductor's on-disk cache makes later starts take seconds)
            log.info("compiling the decode step with torch.compile")
            t0 = time.perf_counter()
            self.forward.warm_up()
            log.info("decode step compiled in %.1f s", time.perf_counter() - t0)

    # ------------------------------------------------------------------ public API
    @property
    def grammars(self) -> GrammarCompiler:
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer)
        return self._grammars

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The prefix cache (None when off); it belongs to the forward, whose `refresh` clears it."""
        return self.forward.prefix

    def clear_prefix_cache(self) -> None:
        """Forget every cached prompt prefix. `load_weights` does this already (through
        `forward.refresh`); call it after changing the model's weights any other way."""
        with self._model_lock:
            if self.prefix_cache is not None:
                self.prefix_cache.clear()

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams | None = None,
        on_event: Callable[[StreamEvent], None] | None = None,
        request_id: str | None = None,
    ) -> RequestOutput:
        """Queue a request; returns its (filling) RequestOutput. on_event runs on the engine thread."""
        return self._submit(prompt, params, on_event, request_id).output

    def check(self, prompt: list[int], params: SamplingParams | None = None) -> SamplingParams:
        """Everything `submit` validates, without queueing: ValueError / ContextLengthError."""
        params = (params or SamplingParams()).validate(self.vocab_size)
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        self.cache.check_fits(len(prompt), params.max_tokens)
        if params.n > self.cache.slots:
            raise ValueError(f"n={params.n} exceeds the engine's {self.cache.slots} cache slots")
        if params.grammar is not None:
            self.grammars.matcher(params.grammar)  # fail in the caller's thread if it is broken
        return params

    def _submit(self, prompt, params, on_event, request_id) -> _Request:
        prompt = [int(t) for t in prompt]
        params = self.check(prompt, params)
        request_id = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        req = _Request(request_id, prompt, params, on_event, self.request_timeout)
        with self._cv:
            if len(self.waiting) >= self.max_queue:
                raise EngineFullError(
                    f"the engine queue is full ({self.max_queue} requests waiting); retry later"
                )
            self._pending[req.id] = req
            self.waiting.append(req)
            self._cv.notify()
        return req

    def abort(self, request_id: str) -> None:
        """Cancel a request (waiting or running); its completions finish with reason "abort"."""
        with self._cv:
            self._aborts.add(request_id)
            self._cv.notify()

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        on_events: list[Callable[[StreamEvent], None] | None] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion, batched; blocks. Works with or without the background thread.
        params: one for all prompts, or one per prompt; on_events: an optional callback per prompt."""
        if not isinstance(params, list):
            params = [params] * len(prompts)
        elif len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        callbacks = on_events or [None] * len(prompts)
        reqs = [self._submit(p, sp, cb, None) for p, sp, cb in zip(prompts, params, callbacks)]
        if self._thread is not None:
            for r in reqs:
                r.done.wait()
        else:
            while not all(r.done.is_set() for r in reqs):
                self.step()
        return [r.output for r in reqs]

    async def stream(
        self, prompt: list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[StreamEvent]:
        """Yield events as tokens are sampled; leaving early (client gone, task cancelled) aborts the
        request. Needs the background thread (`start()`)."""
        if self._thread is None:
            raise RuntimeError("Engine.stream needs the engine thread: call engine.start() first")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamEvent] = asyncio.Queue()

        def deliver(ev: StreamEvent) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        out = self.submit(prompt, params, deliver, request_id)
        remaining = len(out.completions)
        try:
            while remaining:
                ev = await queue.get()
                if ev.finish_reason is not None:
                    remaining -= 1
                yield ev
        finally:
            if remaining:
                self.abort(out.request_id)

    def start(self) -> Engine:
        """Run the scheduling loop on a daemon thread (for servers and concurrent callers)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="openk2-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            with self._cv:
                self._stopping = True
                self._cv.notify()
            self._thread.join()
            self._thread = None
            self._finish_all("abort")  # nobody waits forever on a request the stopped loop never steps

    def load_weights(self, source: nn.Module | dict[str, torch.Tensor], check_finite: bool = True) -> float:
        """Replace the served weights by `source` (a model or a full state dict, e.g. RL weight sync);
        returns seconds.

        Everything is checked before anything is copied (`check_weights`): a refused update raises
        WeightUpdateError and the served weights stay as they were. The copy itself holds the step
        lock, so it lands between two engine steps and no forward ever sees half-updated weights.
        Running sequences keep their cache (computed with the old weights), as in-flight requests do
        in other engines during a weight update."""
        state = source.state_dict() if isinstance(source, nn.Module) else source
        t0 = time.perf_counter()
        checked = self.check_weights(state, check_finite)
        targets = self.model.state_dict()
        with self._model_lock, torch.no_grad():
            for name, tensor in checked.items():
                targets[name].copy_(tensor)
            self.forward.refresh()
        return time.perf_counter() - t0

    def check_weights(
        self, state: dict[str, torch.Tensor], check_finite: bool = True
    ) -> dict[str, torch.Tensor]:
        """`state` checked against the served model and cast to its dtypes, or WeightUpdateError naming
        the first problem: an unknown or missing name, another shape, a non-float tensor for a float
        weight (or another dtype for an integer buffer), a NaN/inf value. Rotary tables (`inv_freq`)
        may be left out: they are derived from the config."""
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise WeightUpdateError("weights must be a dict of tensors")
        targets = self.model.state_dict()
        unknown = sorted(set(state) - set(targets))
        if unknown:
            raise WeightUpdateError(f"{len(unknown)} unknown weight names, e.g. {unknown[:3]}")
        missing = sorted(k for k in set(targets) - set(state) if not k.endswith("inv_freq"))
        if missing:
            raise WeightUpdateError(f"{len(missing)} weights missing, e.g. {missing[:3]}")
        checked = {}
        for name, tensor in state.items():
            target = targets[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise WeightUpdateError(
                    f"{name}: shape {list(tensor.shape)}, the served model's is {list(target.shape)}"
                )
            if target.is_floating_point():
                if tensor.dtype not in UPDATE_FLOAT_DTYPES:
                    raise WeightUpdateError(
                        f"{name}: dtype {str(tensor.dtype).removeprefix('torch.')}, expected one of "
                        "float32, bfloat16, float16"
                    )
                if check_finite and not bool(torch.isfinite(tensor).all()):
                    raise WeightUpdateError(f"{name}: holds NaN or infinite values")
            elif tensor.dtype != target.dtype:
                raise WeightUpdateError(
                    f"{name}: dtype {str(tensor.dtype).removeprefix('torch.')}, the served model's is "
                    f"{str(target.dtype).removeprefix('torch.')}"
                )
            checked[name] = tensor.detach().to(device=target.device, dtype=target.dtype)
        return checked

    def add_observer(self, observer: Callable[[RequestOutput, float], None]) -> None:
        """Call observer(output, seconds since submission) on the engine thread as each request
        finishes, whatever the reason (metrics); an observer that raises is logged and ignored."""
        self._observers.append(observer)

    def stats(self) -> dict:
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "slots": self.cache.slots,
            "max_seq_len": self.cache.max_seq_len,
            "cache_bytes": self.cache.total_bytes,
            "cache_bytes_per_token": self.cache.bytes_per_token,
            "compiled": self.forward.compiled,
            **(self.prefix_cache.stats() if self.prefix_cache is not None else {"prefix_cache_tokens": 0}),
        }

    # ------------------------------------------------------------------ scheduling
    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._aborts)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self.has_work():
                    self._cv.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as e:  # keep serving: fail the requests in flight, not the process
                log.exception("engine step failed")
                self._finish_all("error", f"{type(e).__name__}: {e}")

    def step(self) -> None:
        """One scheduling iteration: aborts, admissions + prefill, one decode step, retirements."""
        with self._model_lock, torch.inference_mode():
            self._handle_aborts()
            self._expire()
            self._retire()
            admitted = self._admit()
            if admitted:
                self._prefill_isolated(admitted)
                self._retire()
            if self.running:
                self._decode()
                self._retire()

    def _handle_aborts(self) -> None:
        with self._cv:
            aborts, self._aborts = self._aborts, set()
            dropped = [r for r in self.waiting if r.id in aborts]
            if dropped:
                self.waiting = deque(r for r in self.waiting if r.id not in aborts)
        for r in dropped:
            self._finish_request(r, "abort")
        for s in self.running:
            if s.req.id in aborts and s.out.finish_reason is None:
                self._finish(s, "abort")

    def _expire(self) -> None:
        """Finish every request past its deadline with "timeout", waiting or running."""
        now = time.perf_counter()
        with self._cv:
            late = [r for r in self.waiting if r.deadline is not None and r.deadline < now]
            if late:
                self.waiting = deque(r for r in self.waiting if r not in late)
        for r in late:
            self._finish_request(r, "timeout", "past its deadline while waiting")
        for s in self.running:
            if s.req.deadline is not None and s.req.deadline < now and s.out.finish_reason is None:
                self._finish(s, "timeout")

    def _admit(self) -> list[_Sequence]:
        """Move waiting requests into free slots. A request whose sequences cannot be built (its seed,
        its grammar) finishes with "error" here and the next one is admitted instead."""
        admitted: list[_Sequence] = []
        refused: list[tuple[_Request, str]] = []
        budget = self.max_prefill_tokens
        with self._cv:
            while self.waiting:
                req = self.waiting[0]
                n = req.params.n
                if len(self.running) + len(admitted) + n > self.cache.slots:
                    break
                if admitted and len(req.prompt) > budget:
                    break
                self.waiting.popleft()
                try:
                    seqs = [_Sequence(req, i, self) for i in range(n)]
                except Exception as e:
                    log.exception("request %s could not be admitted", req.id)
                    refused.append((req, f"{type(e).__name__}: {e}"))
                    continue
                budget -= len(req.prompt)
                for s in seqs:
                    s.slot = len(self.running) + len(admitted)
                    admitted.append(s)
        self.running.extend(admitted)
        for req, message in refused:  # outside the lock: this calls back into the request's owner
            self._finish_request(req, "error", message)
        return admitted

    def _finish_all(self, reason: str, message: str | None = None) -> None:
        """Finish everything queued or running and free every slot: with "error" after a step raised
        outside any one request (the loop then starts clean), with "abort" when the engine stops."""
        with self._cv:
            waiting, self.waiting = list(self.waiting), deque()
        for r in waiting:
            self._finish_request(r, reason, message)
        running, self.running = self.running, []
        for s in running:
            if s.out.finish_reason is None:
                if message:
                    s.req.output.error = s.req.output.error or message
                self._finish(s, reason)
        for req in {id(s.req): s.req for s in running}.values():
            self._done(req)

    def _fail_request(self, req: _Request, message: str) -> None:
        """Finish every unfinished sequence of one running request with "error" (the others run on)."""
        log.warning("request %s failed: %s", req.id, message)
        req.output.error = req.output.error or message
        for s in self.running:
            if s.req is req and s.out.finish_reason is None:
                self._finish(s, "error")

    def _finish_request(self, req: _Request, reason: str, message: str | None = None) -> None:
        """Finish a request that never ran (aborted, refused or timed out while waiting)."""
        if message:
            log.warning("request %s: %s", req.id, message)
            if reason == "error":
                req.output.error = message
        for c in req.output.completions:
            c.finish_reason = reason
            self._notify(req, StreamEvent(c.index, [], "", [], reason))
        self._done(req)

    def _done(self, req: _Request) -> None:
        """The request has finished: wake its waiters, forget it, tell the observers."""
        if req.done.is_set():
            return
        req.done.set()
        self._pending.pop(req.id, None)
        elapsed = time.perf_counter() - req.arrival
        for observer in self._observers:
            try:
                observer(req.output, elapsed)
            except Exception:
                log.exception("engine observer failed")

    def _notify(self, req: _Request, ev: StreamEvent) -> None:
        """Hand an event to the request's callback. A callback that raises (its event loop closed,
        say) is dropped and its request aborted: its owner is gone, and nobody else is affected."""
        if req.on_event is None:
            return
        try:
            req.on_event(ev)
        except Exception:
            log.exception("request %s: its event callback failed; aborting it", req.id)
            req.on_event = None
            with self._cv:
                self._aborts.add(req.id)

    # ------------------------------------------------------------------ the cached forward
    def _prefill_isolated(self, seqs: list[_Sequence]) -> None:
        """Prefill the admitted sequences together; if that raises, again one request at a time, so
        that a request whose prefill fails by itself fails alone (a prefill only writes its own slots'
        cache rows, so a retry starts from a clean state)."""
        try:
            self._prefill(seqs)
            return
        except Exception as e:
            by_request: dict[str, list[_Sequence]] = {}
            for s in seqs:
                by_request.setdefault(s.req.id, []).append(s)
            if len(by_request) == 1:
                log.exception("prefill failed")
                self._fail_request(seqs[0].req, f"{type(e).__name__}: {e}")
                return
            log.warning("batched prefill failed (%s); retrying request by request", e)
        for group in by_request.values():
            try:
                self._prefill(group)
            except Exception as e:
                log.exception("prefill of request %s failed", group[0].req.id)
                self._fail_request(group[0].req, f"{type(e).__name__}: {e}")

    def _prefill(self, seqs: list[_Sequence]) -> None:
        """Prompts of newly admitted sequences, right-padded into one batch, written to their slots.
        Sequences of one request with n > 1 share a prompt: it is computed once and its cache rows
        copied. With the prefix cache, each prompt's longest cached prefix is copied into its slot
        first and only the rest is run; afterwards its whole blocks are kept for later requests."""
        firsts: dict[str, _Sequence] = {}
        unique = [s for s in seqs if firsts.setdefault(s.req.id, s) is s]
        prefix = self.prefix_cache
        starts = [prefix.restore(s.req.prompt, s.slot) if prefix else 0 for s in unique]
        lengths = [len(s.req.prompt) - start for s, start in zip(unique, starts)]
        ids = torch.zeros(len(unique), max(lengths), dtype=torch.long)
        for i, (s, start) in enumerate(zip(unique, starts)):
            ids[i, : lengths[i]] = torch.tensor(s.req.prompt[start:])
        slots = torch.tensor([s.slot for s in unique], device=self.device)
        batch = (ids.to(self.device), torch.tensor(lengths, device=self.device), slots)
        if any(starts):
            logits = self.forward.prefill(*batch, start=torch.tensor(starts, device=self.device))
        else:
            logits = self.forward.prefill(*batch)
        for s in unique:
            s.cached = len(s.req.prompt)
            if prefix is not None:
                prefix.store(s.req.prompt, s.slot)
            s.req.output.time_to_first_token = time.perf_counter() - s.req.arrival
        for s in seqs:
            first = firsts[s.req.id]
            if s is not first:
                self.cache.move(first.slot, s.slot, first.cached)
                s.cached = first.cached
        row = {s.req.id: i for i, s in enumerate(unique)}
        if len(seqs) > len(unique):
            logits = logits[[row[s.req.id] for s in seqs]]
        self._sample(seqs, logits)

    def _decode(self) -> None:
        """One token for each running sequence. They occupy slots 0..n-1 (see _retire), so attention
        reads the plain slice kv[layer, :n, :T] with no gather."""
        seqs = self.running
        cached = [s.cached for s in seqs]
        tokens = torch.tensor([s.last for s in seqs], device=self.device)
        pos = torch.tensor(cached, device=self.device)
        logits = self.forward.decode(tokens, pos, max(cached) + 1)
        for s in seqs:
            s.cached += 1
        self._sample(seqs, logits)

    # ------------------------------------------------------------------ sampling and output
    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Sample one token per row and append it. Never raises: a sequence whose mask, sampling or
        append raises fails its own request (the batch is sampled row by row to find it)."""
        masks: list[torch.Tensor | None] = []
        for s in seqs:
            try:
                masks.append(s.mask())
            except Exception as e:
                masks.append(None)
                self._fail_request(s.req, f"{type(e).__name__}: {e}")
        generators = [s.generator for s in seqs]
        try:
            tokens, records = sample(logits, [s.params for s in seqs], generators, masks, self._rng)
        except Exception:
            log.exception("batched sampling failed; sampling row by row")
            tokens, records = [], []
            for i, s in enumerate(seqs):
                try:
                    tok, rec = sample(logits[i : i + 1], [s.params], [s.generator], [masks[i]], self._rng)
                    tokens.append(tok[0])
                    records.append(rec[0])
                except Exception as e:
                    tokens.append(-1)
                    records.append(None)
                    self._fail_request(s.req, f"{type(e).__name__}: {e}")
        for s, tok, rec in zip(seqs, tokens, records):
            if s.out.finish_reason is not None:  # failed above, or a sibling of one that did
                continue
            try:
                self._append(s, tok, rec)
            except Exception as e:
                log.exception("request %s: appending a token failed", s.req.id)
                self._fail_request(s.req, f"{type(e).__name__}: {e}")

    def _append(self, s: _Sequence, tok: int, rec: TokenLogprob | None) -> None:
        s.last = tok
        s.out.token_ids.append(tok)
        lps = [rec] if rec is not None else []
        s.out.logprobs.extend(lps)
        if s.constraint is not None:
            s.constraint.advance(tok)
        if tok in s.stop_ids:
            self._emit(s, [tok], "", lps)
            self._finish(s, "stop")
            return
        if not s.hidden(tok):
            s.held += s.decoder.push(tok)
        text, stopped = self._release_text(s)
        self._emit(s, [tok], text, lps)
        if stopped:
            self._finish(s, "stop", flush=False)
        elif len(s.out.token_ids) >= s.params.max_tokens:
            self._finish(s, "length")

    def _release_text(self, s: _Sequence) -> tuple[str, bool]:
        """Text that can be emitted now, and whether a stop string ended the completion. A tail that
        could be the start of a stop string is held back until it can be decided."""
        if not s.params.stop:
            text, s.held = s.held, ""
            return text, False
        already = len(s.out.text)
        full = s.out.text + s.held
        hits = [full.find(stop, max(0, already - len(stop) + 1)) for stop in s.params.stop]
        hits = [h for h in hits if h >= 0]
        if hits:
            text = full[already : min(hits)]
            s.held = ""
            return text, True
        keep = 0
        for stop in s.params.stop:
            for k in range(min(len(stop) - 1, len(s.held)), 0, -1):
                if s.held.endswith(stop[:k]):
                    keep = max(keep, k)
                    break
        text = s.held[: len(s.held) - keep]
        s.held = s.held[len(s.held) - keep :]
        return text, False

    def _flush_text(self, s: _Sequence) -> str:
        text, s.held = s.held + s.decoder.flush(), ""
        return text

    def _emit(self, s: _Sequence, toks: list[int], text: str, lps: list[TokenLogprob]) -> None:
        s.out.text += text
        if toks or text:
            self._notify(s.req, StreamEvent(s.index, toks, text, lps))

    def _finish(self, s: _Sequence, reason: str, flush: bool = True) -> None:
        """flush=False when a stop string ended it: the held text is the stop string, not output."""
        tail = ""
        if flush and reason != "error":  # a failed sequence's decoder state may be what failed
            try:
                tail = self._flush_text(s)
            except Exception:
                log.exception("request %s: flushing its text failed", s.req.id)
        s.out.text += tail
        s.out.finish_reason = reason
        self._notify(s.req, StreamEvent(s.index, [], tail, [], reason))

    def _retire(self) -> None:
        """Drop finished sequences, keeping the running ones in slots 0..n-1 (the last one moves
        into each hole)."""
        i = 0
        while i < len(self.running):
            s = self.running[i]
            if s.out.finish_reason is None:
                i += 1
                continue
            last = self.running.pop()
            if last is not s:
                self.cache.move(last.slot, s.slot, last.cached)
                last.slot = s.slot
                self.running[i] = last
            if s.req.output.finished:
                self._done(s.req)
