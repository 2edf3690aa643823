"""`openk2 info`: sizes of a model computed from its config alone (no weights needed).

Counts follow the published K2 figures: embeddings and the LM head are counted, and so is each MoE
layer's `e_score_correction_bias` (it is stored in the checkpoint). "Activated" counts what one token
touches: the top-k routed experts instead of all of them.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass

from openk2.config import ModelConfig


@dataclass
class ParameterCounts:
    total: int
    activated: int
    embedding: int
    attention: int
    dense_mlp: int
    routed_experts: int
    shared_experts: int
    router: int
    norms: int


def count_parameters(c: ModelConfig) -> ParameterCounts:
    d, h = c.hidden_size, c.num_attention_heads
    if c.q_lora_rank is None:
        q = d * h * c.qk_head_dim
    else:
        q = d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * c.qk_head_dim
    kv = d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
    kv += c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
    attn_per_layer = q + kv + h * c.v_head_dim * d
    n_moe = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    n_dense = c.num_hidden_layers - n_moe
    expert = 3 * d * c.moe_intermediate_size
    embedding = c.vocab_size * d * (1 if c.tie_word_embeddings else 2)
    attention = attn_per_layer * c.num_hidden_layers
    dense_mlp = n_dense * 3 * d * c.intermediate_size
    routed = n_moe * c.n_routed_experts * expert
    shared = n_moe * c.n_shared_experts * expert
    router = n_moe * (c.n_routed_experts * d + c.n_routed_experts)
    norms = 2 * d * c.num_hidden_layers + d
    total = embedding + attention + dense_mlp + routed + shared + router + norms
    # A token touches k routed experts; the selection-only bias does no arithmetic on it.
    activated = total - routed - n_moe * c.n_routed_experts + n_moe * c.num_experts_per_tok * expert
    return ParameterCounts(total, activated, embedding, attention, dense_mlp, routed, shared, router, norms)


def kv_cache_bytes_per_token(c: ModelConfig, bytes_per_value: int = 2) -> dict[str, int]:
    """Absorbed MLA latent cache vs. a plain multi-head cache of the same heads (K and V per head)."""
    latent = c.num_hidden_layers * c.kv_cache_dim * bytes_per_value
    mha = c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * bytes_per_value
    return {"mla_latent": latent, "multi_head": mha}


def flops_per_token(c: ModelConfig, context: int = 4096) -> dict[str, float]:
    """Forward matmul FLOPs per token (2 per multiply-add) at a given average attended context; the
    embedding lookup costs none, the LM head does. Training is ~3x forward."""
    p = count_parameters(c)
    matmul_params = p.activated - p.embedding // (1 if c.tie_word_embeddings else 2) - p.norms
    attn = 2 * c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * context
    forward = 2 * matmul_params + attn
    return {"forward": float(forward), "train": 3.0 * forward, "context": context}


def describe(c: ModelConfig, context: int = 4096) -> dict:
    p = count_parameters(c)
    return {
        "model_type": c.model_type,
        "parameters": asdict(p),
        "flops_per_token": flops_per_token(c, context),
        "kv_cache_bytes_per_token_bf16": kv_cache_bytes_per_token(c),
        "weights_bytes": {"bf16": 2 * p.total, "fp8": fp8_weight_bytes(c)},
    }


def fp8_weight_bytes(c: ModelConfig) -> int:
    """FP8 checkpoint size: e4m3 projection and expert matrices plus one fp32 scale per 128x128 block;
    embeddings, LM head, router and norms stay bf16 (the router bias fp32)."""
    p = count_parameters(c)
    high_precision = p.embedding + p.norms + p.router
    fp8 = p.total - high_precision
    scales = fp8 // (128 * 128)  # close enough for a size estimate (ragged edge blocks ignored)
    return fp8 + 4 * scales + 2 * high_precision


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
