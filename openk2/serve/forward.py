"""The engine's cached forward: the model's own weights, rearranged once for inference.

Decoding a few tokens on a CPU (or a small model anywhere) is bound by the number of kernels per
step and by weight reads, not by FLOPs. So, next to the model's modules:

* MLA is run against the latent cache with its weights pre-absorbed. Per head, the query's nope
  part only ever meets the cache through W_uk, so W_uk^T W_qb_nope (times the softmax scale) is one
  matrix: the query projection then yields [q_latent ; q_rope] directly, and the score against a
  cache row [c_kv ; k_rope] is a single dot product (one bmm for all heads and positions). Likewise
  o_proj W_uv is one (dim, heads * kv_lora_rank) matrix applied to the attention-weighted latent.
  Folding is used when it at most doubles the weights it replaces (true for `small`/`tiny`, where
  it removes four kernels per layer); for K2's shapes it would triple them, so there W_uk and W_uv
  stay separate batched matmuls and the weights stay as they are.
* MoE decode: one token loops over its k experts with the indices on the host (no sort, no
  scatter); more tokens are sorted by expert, one matmul per chosen expert. Measured against
  gathering the chosen experts' weights for a bmm (a copy of k weight matrices per token) and
  against a dense pass over all experts, the loop won at 1 and at 16 tokens on CPU (numbers in
  docs/serving.md).

`refresh()` recomputes the absorbed weights; the engine calls it after `load_weights`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openk2.model.layers import swiglu
from openk2.model.mla import MLA
from openk2.model.moe import MoE
from openk2.model.rope import apply_rotary
from openk2.model.transformer import Transformer
from openk2.serve.cache import LatentCache

FOLD_MAX_GROWTH = 2.0  # fold W_uk / W_uv only if the folded matrices are at most this much larger


class AbsorbedMLA:
    """One layer's MLA for the latent cache, W_uk folded into the query and W_uv into the output."""

    def __init__(self, attn: MLA, fold: bool | None = None):
        self.attn = attn
        h, r, nope, v = attn.n_heads, attn.kv_lora_rank, attn.nope_dim, attn.v_dim
        q_in = attn.q_lora_rank or attn.q_proj.in_features
        dim = attn.o_proj.out_features
        replaced = q_in * h * nope + h * nope * r + h * v * r + dim * h * v
        folded = q_in * h * r + dim * h * r
        self.fold = folded <= FOLD_MAX_GROWTH * replaced if fold is None else fold
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        a = self.attn
        h, r, nope, rope, v = a.n_heads, a.kv_lora_rank, a.nope_dim, a.rope_dim, a.v_dim
        w_q = a.q_proj.weight if a.q_lora_rank is None else a.q_b_proj.weight
        dtype = w_q.dtype
        w_uk, w_uv = (w.float() for w in a.absorbed_weights())  # (H, nope, r), (H, v, r)
        if self.fold:
            w_q = w_q.float().view(h, nope + rope, -1)
            q_latent = torch.einsum("hnr,hnq->hrq", w_uk, w_q[:, :nope])
            w_q = torch.cat((q_latent, w_q[:, nope:]), dim=1) * a.softmax_scale
            self.w_q = w_q.reshape(h * (r + rope), -1).to(dtype)
            w_o = a.o_proj.weight.float().view(-1, h, v)
            self.w_o = torch.einsum("dhv,hvr->dhr", w_o, w_uv).reshape(-1, h * r).to(dtype)
        else:
            self.w_uk = w_uk.to(dtype)  # (H, nope, r)
            self.w_uv = w_uv.transpose(1, 2).contiguous().to(dtype)  # (H, r, v)

    def attend(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """x (B, S, D) against cache rows (B, T, r + rope) that already hold x's entries; bias from
        `attention_bias` (0 = may attend, -inf = may not)."""
        a = self.attn
        b, s, _ = x.shape
        h, r = a.n_heads, a.kv_lora_rank
        cq = a.q_a_layernorm(a.q_a_proj(x)) if a.q_lora_rank is not None else x
        if self.fold:
            q = F.linear(cq, self.w_q).view(b, s, h, r + a.rope_dim)
            q_latent, q_rope = q.split([r, a.rope_dim], dim=-1)
            scale = 1.0
        else:
            w = a.q_proj.weight if a.q_lora_rank is None else a.q_b_proj.weight
            q = F.linear(cq, w).view(b * s, h, a.qk_dim).transpose(0, 1)
            q_nope, q_rope = q.split([a.nope_dim, a.rope_dim], dim=-1)
            q_latent = torch.bmm(q_nope, self.w_uk).transpose(0, 1).view(b, s, h, r)
            q_rope = q_rope.transpose(0, 1).view(b, s, h, a.rope_dim)
            scale = a.softmax_scale
        q = torch.cat((q_latent, apply_rotary(q_rope, cos, sin)), dim=-1).view(b, s * h, -1)
        scores = torch.baddbmm(bias, q, cache.transpose(1, 2), alpha=scale)  # (B, S*H, T)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype)
        o = torch.bmm(probs, cache[..., :r])  # (B, S*H, r): the attention-weighted latent
        if self.fold:
            return F.linear(o.view(b, s, h * r), self.w_o, a.o_proj.bias)
        o = torch.bmm(o.view(b * s, h, r).transpose(0, 1), self.w_uv)  # (H, B*S, v)
        return a.o_proj(o.transpose(0, 1).reshape(b, s, h * a.v_dim))


def attention_bias(allowed: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Bool (B, S, T), True = may attend -> additive bias (B, S * heads, T), or (B, 1, T) when S == 1
    (broadcast over heads for free)."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    bias.masked_fill_(~allowed, float("-inf"))
    if allowed.shape[1] == 1:
        return bias
    return bias.repeat_interleave(heads, dim=1)


def moe_forward(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE block for inference: a host-side loop over the chosen experts for a single token;
    for more, the (token, expert) pairs sorted by expert and one matmul per chosen expert. Unlike
    the training path it indexes only the experts that were chosen (no unbind of all of them)."""
    if moe.dispatcher is not None:
        return moe(x)
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    weights, ids, _ = moe.gate(flat)
    ex = moe.experts
    if flat.shape[0] == 1:
        routed = None
        for e, w in zip(ids[0].tolist(), weights[0].tolist()):
            y = swiglu(flat @ ex.gate_proj[e].T, flat @ ex.up_proj[e].T) @ ex.down_proj[e].T
            routed = y * w if routed is None else routed + y * w
    else:  # (token, expert) pairs sorted by expert: one matmul per expert that was chosen
        k = ids.shape[1]
        order = ids.flatten().argsort(stable=True)
        token = order // k
        xs = flat[token]
        outs, start = [], 0
        for e, count in enumerate(torch.bincount(ids.flatten(), minlength=moe.n_experts).tolist()):
            if count:
                xe = xs[start : start + count]
                outs.append(swiglu(xe @ ex.gate_proj[e].T, xe @ ex.up_proj[e].T) @ ex.down_proj[e].T)
                start += count
        y = torch.cat(outs) * weights.flatten()[order].unsqueeze(-1).to(flat.dtype)
        routed = torch.zeros_like(flat).index_add_(0, token, y)
    out = routed.view(shape)
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(x)
    return out


class CachedForward:
    """Prefill and decode of the whole model against a LatentCache."""

    def __init__(self, model: Transformer, cache: LatentCache, fold: bool | None = None):
        self.model = model
        self.cache = cache
        self.blocks = list(model.layers.values())
        self.attn = [AbsorbedMLA(blk.self_attn, fold) for blk in self.blocks]
        self.heads = model.config.num_attention_heads
        p = model.lm_head.weight
        self.device, self.dtype = p.device, p.dtype
        # cos/sin for every cache position, looked up instead of recomputed each step
        self.cos, self.sin = model.rotary(torch.arange(cache.max_seq_len, device=self.device))
        self._rows = torch.arange(cache.slots, device=self.device) * cache.max_seq_len

    def refresh(self) -> None:
        """Recompute the absorbed weights after the model's weights changed."""
        for a in self.attn:
            a.refresh()

    def _block(self, layer: int, x, cos, sin, write, cache_of, bias) -> torch.Tensor:
        blk = self.blocks[layer]
        h = blk.input_layernorm(x)
        entry = blk.self_attn.compress(h, cos, sin)
        write(layer, entry)
        x = x + self.attn[layer].attend(h, cos, sin, cache_of(layer, entry), bias)
        y = blk.post_attention_layernorm(x)
        return x + (moe_forward(blk.mlp, y) if isinstance(blk.mlp, MoE) else blk.mlp(y))

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """ids (B, T) right-padded prompts of `lengths`, written to cache `slots` -> logits (B, V) of
        each prompt's last token."""
        b, t = ids.shape
        kv = self.cache.kv
        first = int(slots[0])
        contiguous = bool((slots == torch.arange(first, first + b, device=slots.device)).all())
        pos = torch.arange(t, device=self.device)
        allowed = (pos[None, None, :] <= pos[None, :, None]) & (pos[None, None, :] < lengths[:, None, None])
        bias = attention_bias(allowed, self.heads, self.dtype)
        cos, sin = self.cos[:t], self.sin[:t]

        def write(layer: int, entry: torch.Tensor) -> None:
            if contiguous:
                kv[layer, first : first + b, :t] = entry
            else:
                kv[layer, slots, :t] = entry

        x = self.model.embed_tokens(ids)
        for layer in range(len(self.blocks)):
            x = self._block(layer, x, cos, sin, write, lambda _, entry: entry, bias)
        last = x[torch.arange(b, device=self.device), lengths - 1]
        return self.model.lm_head(self.model.norm(last))

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, length: int) -> torch.Tensor:
        """One new token per sequence in cache slots 0..n-1: tokens (n,) at positions pos (n,), the
        longest sequence then being `length` rows -> logits (n, V)."""
        n = tokens.shape[0]
        flat = self.cache.kv.view(self.cache.num_layers, -1, self.cache.dim)
        rows = self._rows[:n] + pos  # each new entry's row in the flattened (slot, position) axis
        allowed = torch.arange(length, device=self.device)[None, None, :] <= pos[:, None, None]
        bias = attention_bias(allowed, self.heads, self.dtype)
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)  # (n, 1, rope/2)
        kv = self.cache.kv

        def write(layer: int, entry: torch.Tensor) -> None:
            flat[layer].index_copy_(0, rows, entry[:, 0])

        x = self.model.embed_tokens(tokens.unsqueeze(1))
        for layer in range(len(self.blocks)):
            x = self._block(layer, x, cos, sin, write, lambda i, _: kv[i, :n, :length], bias)
        return self.model.lm_head(self.model.norm(x[:, 0]))
