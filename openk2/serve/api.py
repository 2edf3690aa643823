"""OpenAI-compatible HTTP API over an `Engine`: /v1/models, /v1/models/{id}, /v1/chat/completions,
/v1/completions, plus /tokenize and /detokenize (tokenization.py), /metrics (metrics.py) and /health.

A chat request is validated and mapped onto the engine by `openk2.serve.openai_chat` (the one place
that maps the OpenAI chat API, also used by the in-process client backend), and its output is turned
back into messages and deltas there; this module adds HTTP: the body, ids, usage, logprobs and the
event stream. Every bad input becomes OpenAI's error shape `{"error": {"message", "type", "param",
"code"}}` with a 4xx status and the `param` that is wrong; this module never writes a K2 marker.

With a `weight_update_token`, `POST /weights` replaces the served weights with a safetensors payload
(RL weight sync into a rollout server, `openk2.rl.weight_sync`); see `weight_update_route`.

`create_app` also sets the operational limits (see docs/serving.md, "Operation"): a body-size limit
answered with 413 before anything is read, JSON nesting and NaN refused with 400 (body.py), the API key
and CORS as plain ASGI middlewares (so a client that leaves is seen and its generation aborted), and
OpenAI-shaped JSON for every error, 404/405 (with `Allow`) and unexpected 500s included.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from openk2.serve.body import MAX_JSON_DEPTH, read_json_object
from openk2.serve.engine import Engine, EngineFullError, StreamEvent
from openk2.serve.errors import APIError, error_response
from openk2.serve.metrics import RequestCountMiddleware, ServerMetrics
from openk2.serve.middleware import DEFAULT_MAX_BODY_BYTES, APIKeyMiddleware, BodyLimitMiddleware
from openk2.serve.openai_chat import (
    RequestError,
    check_fits,
    field_of,
    include_usage,
    prepare_chat,
    response_format_grammar,
    sampling_params,
)
from openk2.serve.sampling import MAX_CHOICES, SamplingParams, TokenLogprob
from openk2.serve.tokenization import tokenization_router

# paths that need the API key when the server has one (/health and /metrics stay open, as in vLLM)
PROTECTED_PREFIXES = ("/v1", "/tokenize", "/detokenize")
# the weight-update endpoint (off unless the server has a weight-update token, which it checks itself)
WEIGHTS_PATH = "/weights"


# ---------------------------------------------------------------------------------------------- the app
def create_app(
    engine: Engine,
    model_name: str,
    api_key: str | None = None,
    constrained_tools: bool = True,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    cors_origins: list[str] | None = None,
    reasoning: bool = False,
    weight_update_token: str | None = None,
    max_weight_bytes: int | None = None,
) -> FastAPI:
    """The FastAPI app; starts the engine thread on startup and stops it on shutdown.

    constrained_tools=False leaves tool_choice "required" / a named function to the model alone (no
    grammar): the reply is whatever it wrote, tool calls or not, which is how an evaluation measures
    a model's unaided tool-call conformance through the server. A body over max_body_bytes is answered
    413 unread. cors_origins (e.g. ["https://app.example"], or ["*"]) installs CORS; without it no
    CORS header is ever sent. The queue size and the per-request deadline are the engine's
    (`Engine(max_queue=..., request_timeout=...)`). reasoning=True serves a K2-Thinking checkpoint:
    its template, and `reasoning_content` in replies and deltas (openai_chat.py). weight_update_token
    turns on `POST /weights` (weight_update_route), whose body may be up to max_weight_bytes (default:
    the served model in float32 plus room for the safetensors header)."""
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
    path_limits = {}
    if weight_update_token is not None:
        if not weight_update_token.strip():
            raise ValueError("the weight-update token must not be empty")
        max_weight_bytes = max_weight_bytes or default_max_weight_bytes(engine)
        if max_weight_bytes < 1:
            raise ValueError(f"max_weight_bytes must be positive, got {max_weight_bytes}")
        path_limits[WEIGHTS_PATH] = max_weight_bytes
    tokenizer = engine.tokenizer
    grammars = engine.grammars  # built once here, not on the first constrained request

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="openk2", lifespan=lifespan)
    metrics = ServerMetrics(engine)
    _install_middleware(app, metrics, api_key, max_body_bytes, cors_origins, path_limits)
    _install_error_handlers(app)
    app.include_router(tokenization_router(tokenizer, model_name, engine.max_seq_len))
    if weight_update_token is not None:
        weight_update_route(app, engine, weight_update_token)

    async def read_body(request: Request) -> dict:
        body = await read_json_object(request)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "'model' is required", "model")
        if model != model_name:
            message = f"the model '{model}' does not exist; this server serves '{model_name}'"
            raise APIError(404, message, "model", "model_not_found")
        return body

    async def events(
        prompts: list[list[int]], params: SamplingParams
    ) -> AsyncIterator[tuple[int, StreamEvent]]:
        """Merge the event streams of several prompts; leaving early aborts all of them."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, prompt: list[int]) -> None:
            try:
                async for ev in engine.stream(prompt, params):
                    queue.put_nowait((i, ev))
            except EngineFullError as e:
                queue.put_nowait((i, APIError(503, str(e), code="overloaded")))
            finally:
                queue.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
        try:
            open_streams = len(tasks)
            while open_streams:
                i, ev = await queue.get()
                if ev is None:
                    open_streams -= 1
                elif isinstance(ev, APIError):
                    raise ev
                else:
                    _raise_if_failed(ev, engine)
                    yield i, ev
        finally:
            for t in tasks:
                t.cancel()

    async def collect(request: Request, prompts: list[list[int]], params: SamplingParams) -> list[dict]:
        """Non-streamed: run to the end, but abort if the client goes away meanwhile."""
        results = [
            {"tokens": [], "text": [], "logprobs": [], "finish": None} for _ in range(len(prompts) * params.n)
        ]

        async def run() -> None:
            async for i, ev in events(prompts, params):
                r = results[i * params.n + ev.index]
                r["tokens"] += ev.token_ids
                r["text"].append(ev.text)
                r["logprobs"] += ev.logprobs
                r["finish"] = ev.finish_reason or r["finish"]

        task = asyncio.create_task(run())
        while not task.done():
            await asyncio.wait({task}, timeout=0.2)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client disconnected")
        task.result()
        for r in results:
            r["text"] = "".join(r["text"])
            if r["finish"] == "error":
                raise APIError(500, "the engine failed while generating; see the server log")
        return results

    def token_str(token_id: int) -> str:
        return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")

    def chat_logprobs(lps: list[TokenLogprob]) -> dict:
        def one(tid: int, lp: float) -> dict:
            return {"token": token_str(tid), "logprob": lp, "bytes": list(tokenizer.token_bytes(tid))}

        return {
            "content": [
                {**one(x.token_id, x.logprob), "top_logprobs": [one(t, v) for t, v in x.top]} for x in lps
            ]
        }

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    # ------------------------------------------------------------------ endpoints
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "constrained_tools": constrained_tools, **engine.stats()}

    card = {
        "id": model_name,
        "object": "model",
        "created": 0,
        "owned_by": "openk2",
        "max_model_len": engine.max_seq_len,
    }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            message = f"the model {model_id!r:.80} does not exist; this server serves '{model_name}'"
            raise APIError(404, message, "model", "model_not_found")
        return card

    @app.get("/metrics")
    async def prometheus_metrics():
        content, media_type = metrics.exposition()
        return Response(content, media_type=media_type)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        # rendering and tokenising a long conversation stays off the event loop
        plan = await run_in_threadpool(prepare_chat, body, engine, constrained_tools, reasoning)
        prompt, params = plan.prompt, plan.params
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": model_name}

        if not body.get("stream"):
            results = await collect(request, [prompt], params)
            choices = []
            for i, r in enumerate(results):
                message, finish = plan.reply(r["text"], r["finish"])
                lp = chat_logprobs(r["logprobs"]) if params.logprobs else None
                choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": finish})
            n_out = sum(len(r["tokens"]) for r in results)
            return {
                **head,
                "object": "chat.completion",
                "choices": choices,
                "usage": usage(len(prompt), n_out),
            }

        async def sse() -> AsyncIterator[str]:
            def chunk(choices: list[dict], **extra) -> str:
                return (
                    "data: "
                    + json.dumps({**head, "object": "chat.completion.chunk", "choices": choices, **extra})
                    + "\n\n"
                )

            replies = [plan.stream() for _ in range(params.n)]
            n_out = 0
            for i in range(params.n):
                role = {"role": "assistant", "content": ""}
                yield chunk([{"index": i, "delta": role, "logprobs": None, "finish_reason": None}])
            try:
                async for _, ev in events([prompt], params):
                    n_out += len(ev.token_ids)
                    reply = replies[ev.index]
                    deltas = reply.feed(ev.text, finished=ev.finish_reason is not None)
                    lp = chat_logprobs(ev.logprobs) if params.logprobs and ev.logprobs else None
                    if lp is not None and not deltas:
                        deltas = [{"content": ""}]
                    for d in deltas:
                        yield chunk([{"index": ev.index, "delta": d, "logprobs": lp, "finish_reason": None}])
                        lp = None
                    if ev.finish_reason:
                        finish = reply.finish_reason(ev.finish_reason)
                        yield chunk(
                            [{"index": ev.index, "delta": {}, "logprobs": None, "finish_reason": finish}]
                        )
            except APIError as e:
                yield "data: " + json.dumps(e.body()) + "\n\n"
            if plan.include_usage:
                yield chunk([], usage=usage(len(prompt), n_out))
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompts = await run_in_threadpool(_completion_prompts, body.get("prompt"), tokenizer)
        for key in ("suffix", "best_of"):
            if body.get(key) not in (None, 1) or (key == "suffix" and body.get(key)):
                raise APIError(400, f"'{key}' is not supported", key)
        echo = bool(field_of(body, "echo", bool, False))
        # vLLM's extension: each choice also carries its sampled token ids (RL rollouts through a
        # server need the exact tokens, which text and logprob strings do not give back)
        return_token_ids = bool(field_of(body, "return_token_ids", bool, False))
        if return_token_ids and body.get("stream"):
            raise APIError(400, "'return_token_ids' is only supported without 'stream'", "return_token_ids")
        params = sampling_params(body, 16, engine.vocab_size)
        top = field_of(body, "logprobs", int)
        if top is not None:
            if not 0 <= top <= 20:
                raise APIError(400, "'logprobs' must be in [0, 20]", "logprobs")
            params.logprobs, params.top_logprobs = True, top
            if echo:
                raise APIError(400, "'echo' together with 'logprobs' is not supported", "echo")
        params.grammar = response_format_grammar(body.get("response_format"), grammars)
        if len(prompts) * params.n > MAX_CHOICES:
            asked = f"{len(prompts)} x {params.n}"
            message = f"at most {MAX_CHOICES} completions per request (prompts x n), got {asked}"
            raise APIError(400, message, "prompt")
        for p in prompts:
            check_fits(engine, p, params, "prompt")
        usage_wanted = include_usage(body)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
        n_prompt = sum(len(p) for p in prompts)

        def legacy_logprobs(lps: list[TokenLogprob], offset: int) -> dict:
            tokens = [token_str(x.token_id) for x in lps]
            # skipped special tokens add nothing to the text, so they do not move the offset
            lengths = [0 if tokenizer.is_special(x.token_id) else len(t) for x, t in zip(lps, tokens)]
            offsets = [offset + sum(lengths[:k]) for k in range(len(tokens))]
            return {
                "tokens": tokens,
                "token_logprobs": [x.logprob for x in lps],
                "top_logprobs": [{token_str(t): v for t, v in x.top} for x in lps],
                "text_offset": offsets,
            }

        if not body.get("stream"):
            results = await collect(request, prompts, params)
            choices = []
            for k, r in enumerate(results):
                prefix = tokenizer.decode(prompts[k // params.n]) if echo else ""
                lp = legacy_logprobs(r["logprobs"], 0) if params.logprobs else None
                choices.append(
                    {"index": k, "text": prefix + r["text"], "logprobs": lp, "finish_reason": r["finish"]}
                )
                if return_token_ids:
                    choices[-1]["token_ids"] = r["tokens"]
            n_out = sum(len(r["tokens"]) for r in results)
            return {**head, "choices": choices, "usage": usage(n_prompt, n_out)}

        async def sse() -> AsyncIterator[str]:
            n_out = 0
            offsets = [0] * (len(prompts) * params.n)
            try:
                if echo:
                    for k in range(len(offsets)):
                        text = tokenizer.decode(prompts[k // params.n])
                        c = {"index": k, "text": text, "logprobs": None, "finish_reason": None}
                        yield "data: " + json.dumps({**head, "choices": [c]}) + "\n\n"
                async for i, ev in events(prompts, params):
                    k = i * params.n + ev.index
                    n_out += len(ev.token_ids)
                    lp = legacy_logprobs(ev.logprobs, offsets[k]) if params.logprobs and ev.logprobs else None
                    offsets[k] += len(ev.text)
                    if ev.text or lp or ev.finish_reason:
                        c = {"index": k, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}
                        yield "data: " + json.dumps({**head, "choices": [c]}) + "\n\n"
            except APIError as e:
                yield "data: " + json.dumps(e.body()) + "\n\n"
            if usage_wanted:
                yield "data: " + json.dumps({**head, "choices": [], "usage": usage(n_prompt, n_out)}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


def _install_middleware(
    app: FastAPI,
    metrics: ServerMetrics,
    api_key: str | None,
    max_body_bytes: int,
    cors_origins: list[str] | None,
    path_limits: dict[str, int] | None = None,
) -> None:
    """Plain ASGI middlewares only (see middleware.py), outermost last: the request counter sees
    every answer (413 and 401 included), CORS answers preflights before the key is asked for, the
    body limit runs before anything reads the body."""
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key, prefixes=PROTECTED_PREFIXES)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, path_limits=path_limits)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            allow_credentials="*" not in cors_origins,
        )
    app.add_middleware(RequestCountMiddleware, metrics=metrics, routes=app.router.routes)


def default_max_weight_bytes(engine: Engine) -> int:
    """The largest weight payload accepted by default: every served tensor in float32, plus 64 KiB and
    256 bytes a tensor for the safetensors header."""
    tensors = engine.model.state_dict().values()
    return sum(4 * t.numel() + 256 for t in tensors) + 64 * 1024


def weight_update_route(app: FastAPI, engine: Engine, token: str) -> None:
    """`POST /weights`, `Authorization: Bearer TOKEN`, body: a safetensors file of the full state dict
    (float tensors in float32, bfloat16 or float16; cast to the served dtype). The payload is parsed and
    checked in full (names, shapes, dtypes, finite values; its size by the body limit) before one
    tensor is copied, and the copy lands between two engine steps (`Engine.load_weights`), so a bad
    payload is a 4xx naming the problem with the old weights still served, and no request ever runs on
    half-updated weights. Answers {"tensors", "bytes", "load_seconds", "version"}; `version` counts the
    updates this server has applied."""
    import hmac

    from safetensors.torch import load as load_safetensors

    from openk2.serve.engine import WeightUpdateError

    expected = f"Bearer {token}".encode()
    applied = {"version": 0}
    one_at_a_time = threading.Lock()  # two pushes never interleave their checks and copies

    def apply(payload: bytes) -> dict:
        with one_at_a_time:
            return apply_one(payload)

    def apply_one(payload: bytes) -> dict:
        try:
            state = load_safetensors(payload)
        except Exception as e:  # the parser raises SafetensorError, and others on odd headers
            raise APIError(400, f"the body is not a safetensors file ({e})", code="invalid_weights") from None
        try:
            seconds = engine.load_weights(state)
        except WeightUpdateError as e:
            raise APIError(422, f"weights refused, nothing changed: {e}", code="invalid_weights") from None
        applied["version"] += 1
        return {"tensors": len(state), "bytes": len(payload), "load_seconds": seconds,
                "version": applied["version"]}  # fmt: skip

    @app.post(WEIGHTS_PATH)
    async def update_weights(request: Request):
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):  # constant time: no token by timing
            raise APIError(401, "invalid or missing weight-update token", code="invalid_api_key")
        payload = await request.body()
        if not payload:
            raise APIError(400, "the body is empty; send a safetensors file", code="invalid_weights")
        return await run_in_threadpool(apply, payload)


def _install_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: APIError as raised, Starlette's 404/405 (405 keeps its `Allow`
    header), a RecursionError (only deep input causes one) as 400, anything else as a JSON 500."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        return error_response(APIError(e.status, e.message, e.param, e.code))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(APIError(e.status_code, str(e.detail), headers=e.headers))

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, e: RecursionError):
        return error_response(APIError(400, f"the request nests deeper than {MAX_JSON_DEPTH} levels"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        message = f"internal server error ({type(e).__name__}); see the server log"
        return error_response(APIError(500, message, code="internal_error"))


def _raise_if_failed(ev: StreamEvent, engine: Engine) -> None:
    """A completion the engine ended with "timeout" or "error" fails the whole HTTP request."""
    if ev.finish_reason == "timeout":
        message = (
            f"the request did not finish within the server's request timeout of {engine.request_timeout:g} s"
        )
        raise APIError(408, message, code="request_timeout")
    if ev.finish_reason == "error":
        raise APIError(500, "the engine failed while generating; see the server log", code="engine_error")


def _completion_prompts(prompt: Any, tokenizer) -> list[list[int]]:
    """prompt: a string, a list of strings, a list of token ids, or a list of such lists."""

    def one(p: Any) -> list[int]:
        if isinstance(p, str):
            if not p:
                raise APIError(400, "'prompt' must not be empty", "prompt")
            return tokenizer.encode(p)
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return p
        raise APIError(400, "'prompt' must be a string, a list of strings or a list of token ids", "prompt")

    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > MAX_CHOICES:  # refused before any tokenising
            raise APIError(400, f"at most {MAX_CHOICES} prompts per request, got {len(prompt)}", "prompt")
        return [one(p) for p in prompt]
    return [one(prompt)]
