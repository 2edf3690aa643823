"""`openk2 serve MODEL`: the OpenAI-compatible server (FastAPI + uvicorn) for one checkpoint.

The limits default to values that protect a public server (docs/serving.md, "Operation"): a queue of
256 waiting requests (503 past it), a 600 s deadline per request, a 4 MiB request body, no CORS.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
from pathlib import Path

import torch

from openk2.serve.middleware import DEFAULT_MAX_BODY_BYTES

WEIGHT_TOKEN_ENV = "OPENK2_WEIGHT_UPDATE_TOKEN"
DEFAULT_MAX_QUEUE = 256
DEFAULT_REQUEST_TIMEOUT = 600.0


def load_engine(
    checkpoint: str,
    max_batch: int,
    max_seq_len: int | None,
    dtype: str | None,
    compile: bool = False,
    max_queue: int = DEFAULT_MAX_QUEUE,
    request_timeout: float | None = None,
    prefix_cache_tokens: int | None = None,
):
    """The serving engine over a checkpoint directory or a run directory (its latest checkpoint).
    prefix_cache_tokens: None = the engine's default, 0 = no prefix cache."""
    from openk2.checkpoint import load
    from openk2.serve.engine import DEFAULT_PREFIX_CACHE_TOKENS, Engine

    if max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
    if max_seq_len is not None and max_seq_len < 2:
        raise ValueError(f"--max-seq-len must be >= 2, got {max_seq_len}")
    if prefix_cache_tokens is None:
        prefix_cache_tokens = DEFAULT_PREFIX_CACHE_TOKENS
    model, tokenizer = load(checkpoint, dtype=getattr(torch, dtype) if dtype else None)
    return Engine(
        model,
        tokenizer,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        compile=compile,
        max_queue=max_queue,
        request_timeout=request_timeout,
        prefix_cache_tokens=prefix_cache_tokens,
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _seconds(text: str) -> float:
    """Positive seconds, or 0 / 'none' for no deadline."""
    if text.lower() in ("0", "none"):
        return 0.0
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be positive seconds (or 0 for none), got {text}")
    return value


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", nargs="?", metavar="MODEL", help="checkpoint or run directory (same as --model)"
    )
    parser.add_argument("--model", help="checkpoint directory, or run directory (its latest checkpoint)")
    parser.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (cache slots)")
    parser.add_argument(
        "--max-seq-len", type=int, default=None, help="tokens per cache slot (prompt + output)"
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="weights and KV cache dtype (default: the checkpoint's); bfloat16 halves the bytes a decode "
        "step reads (docs/serving.md, Performance, has its speed and its agreement with float32)",
    )
    prefix = parser.add_mutually_exclusive_group()
    prefix.add_argument(
        "--prefix-cache-tokens",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="tokens of shared prompt prefixes (system prompt, tools) whose cache rows are kept for later "
        "requests (default 8192; 0 = off, as --no-prefix-cache)",
    )
    prefix.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache_tokens",
        action="store_const",
        const=0,
        help="recompute every prompt in full",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run the decode step through torch.compile (needs a C++ compiler on CPU; ~1 min at the "
        "first start, seconds later): about 2x faster decoding on CPU",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="model id clients send (default: dir name)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    parser.add_argument(
        "--no-constrained-tools",
        action="store_true",
        help="do not enforce tool_choice 'required' / a named function with a grammar: the model alone "
        "decides, and the reply reports what it wrote (to measure unconstrained tool calling)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help="requests that may wait for a cache slot; past it a request is answered 503 at once "
        f"(default {DEFAULT_MAX_QUEUE})",
    )
    parser.add_argument(
        "--request-timeout",
        type=_seconds,
        default=DEFAULT_REQUEST_TIMEOUT,
        help="seconds a request may take from arrival to its last token, queueing included; past it "
        "it is ended (HTTP 408, or an error event in a stream) and its slots freed; 0 = no deadline "
        f"(default {DEFAULT_REQUEST_TIMEOUT:g})",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body; a larger one is answered 413 before it is read "
        f"(default {DEFAULT_MAX_BODY_BYTES}, 4 MiB)",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=None,
        metavar="ORIGIN",
        help="allow browser requests from ORIGIN (repeatable; '*' for any); without it no CORS headers",
    )
    parser.add_argument(
        "--reasoning-parser",
        choices=["none", "kimi_k2"],
        default="none",
        help="kimi_k2: a K2-Thinking checkpoint: render with the Thinking template and return its "
        "<think> block as reasoning_content (as vLLM's --reasoning-parser kimi_k2)",
    )
    parser.add_argument(
        "--weight-update-token",
        default=os.environ.get(WEIGHT_TOKEN_ENV) or None,
        metavar="TOKEN",
        help="turn on POST /weights (replace the served weights with a safetensors payload, for RL "
        "rollout servers) for requests with 'Authorization: Bearer TOKEN'; off by default "
        f"(default: ${WEIGHT_TOKEN_ENV}, which keeps the token out of the process list)",
    )
    parser.add_argument(
        "--max-weight-bytes",
        type=_positive_int,
        default=None,
        help="largest POST /weights body (default: the served model in float32 plus header room)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"]
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, bound before the model loads so a busy port fails at once."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: {e.strerror}") from None
    sock = socket.socket(info[0], info[1], info[2])
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise OSError(f"port {port} on {host} is already in use; pick another with --port") from None
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def summary(engine, name: str, checkpoint: Path, url: str, api_key: bool, constrained: bool) -> str:
    """What `openk2 serve` is serving, in a few plain lines."""
    stats = engine.stats()
    params = sum(p.numel() for p in engine.model.parameters())
    key = "required (Authorization: Bearer ...)" if api_key else "none"
    return "\n".join(
        [
            f"openk2 serve: {name}",
            f"  checkpoint   {checkpoint}",
            f"  model        {params / 1e6:,.1f}M parameters, {str(engine.dtype).removeprefix('torch.')} "
            f"on {engine.device}",
            f"  engine       {stats['slots']} slots x {stats['max_seq_len']:,} tokens, KV cache "
            f"{_mib(stats['cache_bytes'])} ({stats['cache_bytes_per_token']:,} B/token), "
            f"compiled: {'yes' if stats['compiled'] else 'no'}, prefix cache: "
            + (f"{stats['prefix_cache_tokens']:,} tokens" if stats["prefix_cache_tokens"] else "off"),
            f"  tool calls   {'constrained when forced' if constrained else 'unconstrained'}; API key: {key}",
            f"  listening    {url}  (try: curl {url}/models)",
        ]
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from openk2.checkpoint import resolve_checkpoint
    from openk2.serve.api import create_app

    logging.basicConfig(level=args.log_level.upper())
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    sock = bind(args.host, args.port)
    try:
        checkpoint = resolve_checkpoint(args.model)
        engine = load_engine(
            str(checkpoint),
            args.max_batch,
            args.max_seq_len,
            args.dtype,
            args.compile,
            max_queue=args.max_queue,
            request_timeout=args.request_timeout or None,
            prefix_cache_tokens=args.prefix_cache_tokens,
        )
        name = args.served_model_name or Path(args.model).resolve().name
        constrained = not args.no_constrained_tools
        app = create_app(
            engine,
            name,
            api_key=args.api_key,
            constrained_tools=constrained,
            max_body_bytes=args.max_body_bytes,
            cors_origins=args.cors_origin,
            reasoning=args.reasoning_parser == "kimi_k2",
            weight_update_token=args.weight_update_token,
            max_weight_bytes=args.max_weight_bytes,
        )
        port = sock.getsockname()[1]
        url = f"http://{args.host}:{port}/v1"
        print(summary(engine, name, checkpoint, url, bool(args.api_key), constrained), flush=True)
        if args.weight_update_token:
            print(f"  weights      POST http://{args.host}:{port}/weights accepted (weight-update token)")
        config = uvicorn.Config(app, host=args.host, port=port, log_level=args.log_level)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0
