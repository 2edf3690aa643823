"""`openk2 serve CHECKPOINT`: the OpenAI-compatible server (FastAPI + uvicorn) for one checkpoint.

The limits default to values that protect a public server (docs/serving.md, "Operation"): a queue of
256 waiting requests (503 past it), a 600 s deadline per request, a 4 MiB request body, no CORS.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from openk2.serve.middleware import DEFAULT_MAX_BODY_BYTES

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
):
    from openk2.checkpoint import load
    from openk2.serve.engine import Engine

    try:  # a checkpoint directory, or a run directory (its latest checkpoint)
        model, tokenizer = load(checkpoint, dtype=getattr(torch, dtype) if dtype else None)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    return Engine(
        model,
        tokenizer,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        compile=compile,
        max_queue=max_queue,
        request_timeout=request_timeout,
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
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
    parser.add_argument("checkpoint", help="checkpoint directory, or run directory (its latest checkpoint)")
    parser.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (cache slots)")
    parser.add_argument(
        "--max-seq-len", type=int, default=None, help="tokens per cache slot (prompt + output)"
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
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
    parser.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from openk2.serve.api import create_app

    logging.basicConfig(level=args.log_level.upper())
    if args.max_queue < 0:
        raise SystemExit(f"error: --max-queue must be >= 0, got {args.max_queue}")
    engine = load_engine(
        args.checkpoint,
        args.max_batch,
        args.max_seq_len,
        args.dtype,
        args.compile,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout or None,
    )
    name = args.served_model_name or Path(args.checkpoint).resolve().name
    app = create_app(
        engine,
        name,
        api_key=args.api_key,
        constrained_tools=not args.no_constrained_tools,
        max_body_bytes=args.max_body_bytes,
        cors_origins=args.cors_origin,
    )
    print(f"serving {name} on http://{args.host}:{args.port}/v1 ({engine.stats()})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
