"""`openk2 serve CHECKPOINT`: the OpenAI-compatible server (FastAPI + uvicorn) for one checkpoint."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch


def load_engine(
    checkpoint: str, max_batch: int, max_seq_len: int | None, dtype: str | None, compile: bool = False
):
    from openk2.checkpoint import load
    from openk2.serve.engine import Engine

    try:  # a checkpoint directory, or a run directory (its latest checkpoint)
        model, tokenizer = load(checkpoint, dtype=getattr(torch, dtype) if dtype else None)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    return Engine(model, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len, compile=compile)


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
    parser.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from openk2.serve.api import create_app

    logging.basicConfig(level=args.log_level.upper())
    engine = load_engine(args.checkpoint, args.max_batch, args.max_seq_len, args.dtype, args.compile)
    name = args.served_model_name or Path(args.checkpoint).resolve().name
    app = create_app(engine, name, api_key=args.api_key, constrained_tools=not args.no_constrained_tools)
    print(f"serving {name} on http://{args.host}:{args.port}/v1 ({engine.stats()})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
