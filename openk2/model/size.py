"""Sizes of a model computed from its config alone (no weights needed): parameters, FLOPs per token,
KV-cache and checkpoint bytes.

Counts follow the published K2 figures: embeddings and the LM head are counted, and so is each MoE
layer's `e_score_correction_bias` (it is stored in the checkpoint). "Activated" counts what one token
touches: the top-k routed experts instead of all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def fp8_weight_bytes(c: ModelConfig) -> int:
    """FP8 checkpoint size: e4m3 projection and expert matrices plus one fp32 scale per 128x128 block;
    embeddings, LM head, router and norms stay bf16 (the router bias fp32)."""
    p = count_parameters(c)
    high_precision = p.embedding + p.norms + p.router
    fp8 = p.total - high_precision
    scales = fp8 // (128 * 128)  # close enough for a size estimate (ragged edge blocks ignored)
    return fp8 + 4 * scales + 2 * high_precision
