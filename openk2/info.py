"""`openk2 info`: sizes of a model computed from its config alone (no weights needed), printed as a
table or JSON. The arithmetic lives in openk2/model/size.py."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict

from openk2.config import ModelConfig
from openk2.model.size import count_parameters, flops_per_token, fp8_weight_bytes, kv_cache_bytes_per_token


def describe(c: ModelConfig, context: int = 4096) -> dict:
    p = count_parameters(c)
    return {
        "model_type": c.model_type,
        "parameters": asdict(p),
        "flops_per_token": flops_per_token(c, context),
        "kv_cache_bytes_per_token_bf16": kv_cache_bytes_per_token(c),
        "weights_bytes": {"bf16": 2 * p.total, "fp8": fp8_weight_bytes(c)},
    }


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="kimi-k2", help="kimi-k2, deepseek-v3, small or tiny")
    src.add_argument("--model", help="a checkpoint or run directory, or a config.json, instead of a preset")
    src.add_argument("--config", help="same as --model (a TOML/JSON file of flags is read as options)")
    p.add_argument("--context", type=int, default=4096, help="attended context for the FLOPs estimate")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def load_config(path: str) -> ModelConfig:
    """The model config of a config.json, a checkpoint directory or a run directory."""
    from openk2.checkpoint import resolve_checkpoint

    if os.path.isdir(path):
        path = str(resolve_checkpoint(path))
    return ModelConfig.from_pretrained(path)


def run(args: argparse.Namespace) -> int:
    if args.context < 1:
        raise ValueError(f"--context must be >= 1, got {args.context}")
    source = args.model or args.config
    c = load_config(source) if source else ModelConfig.from_preset(args.preset)
    info = describe(c, args.context)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    p, cache = info["parameters"], info["kv_cache_bytes_per_token_bf16"]
    weights = info["weights_bytes"]
    rows = [
        ("total parameters", f"{p['total']:,}", _fmt(p["total"])),
        ("activated parameters / token", f"{p['activated']:,}", _fmt(p["activated"])),
        (f"forward FLOPs / token (ctx {args.context})", f"{info['flops_per_token']['forward']:.4g}", ""),
        ("train FLOPs / token", f"{info['flops_per_token']['train']:.4g}", ""),
        ("KV cache bytes / token, MLA latent (bf16)", f"{cache['mla_latent']:,}", ""),
        (
            "KV cache bytes / token, multi-head (bf16)",
            f"{cache['multi_head']:,}",
            f"{cache['multi_head'] / cache['mla_latent']:.1f}x latent",
        ),
        ("weights, bf16", f"{weights['bf16']:,}", _fmt(weights["bf16"]) + "B"),
        ("weights, fp8 + scales", f"{weights['fp8']:,}", _fmt(weights["fp8"]) + "B"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{source or args.preset} ({c.model_type})")
    for name, exact, short in rows:
        print(f"  {name:<{width}}  {exact:>22}  {short}")
    return 0
