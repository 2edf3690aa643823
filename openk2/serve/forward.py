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
  scatter); more tokens take the model's path (sorted by expert, one matmul per expert). Against
  gathering the chosen experts' weights for a bmm (a copy of k weight matrices per token) and
  against a dense pass over all experts, the loop won at 1 and at 16 tokens on CPU (numbers in
  docs/serving.md).
* Fewer kernels per layer: q_a and kv_a as one matmul, the queries' and the key's rope dims rotated
  together as one complex multiply, RMSNorm as one kernel in float32, routing without the float
  copies and the scores only training needs, MLPs without module dispatch. (torch.compile of the
  decode step was tried: a minute of compilation, graph breaks at the host-side expert ids, and no
  faster than this in steady state on CPU.)

`refresh()` recomputes the absorbed weights; the engine calls it after `load_weights`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openk2.model.layers import MLP, RMSNorm, swiglu
from openk2.model.mla import MLA
from openk2.model.moe import MoE
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
        # Both down-projections of x ([q_a ; kv_a]) as one matmul.
        downs = [a.kv_a_proj_with_mqa] if a.q_lora_rank is None else [a.q_a_proj, a.kv_a_proj_with_mqa]
        self.w_down = torch.cat([m.weight for m in downs])
        self.b_down = torch.cat([m.bias for m in downs]) if downs[0].bias is not None else None
        self.splits = [r, rope] if a.q_lora_rank is None else [a.q_lora_rank, r, rope]
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
            self.w_q = w_q
            self.w_uk = w_uk.to(dtype)  # (H, nope, r)
            self.w_uv = w_uv.transpose(1, 2).contiguous().to(dtype)  # (H, r, v)

    def project(self, x: torch.Tensor, cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, D) -> queries (B, S * H, r + rope) for `attend`, and x's cache entries
        [RMSNorm(c_kv) ; rope(k_rope)] (B, S, r + rope). cis: rotations (B or 1, S, 1, rope/2)."""
        a = self.attn
        b, s, _ = x.shape
        h, r, rope = a.n_heads, a.kv_lora_rank, a.rope_dim
        down = F.linear(x, self.w_down, self.b_down).split(self.splits, dim=-1)
        cq = rms_norm(a.q_a_layernorm, down[0]) if a.q_lora_rank is not None else x
        c_kv, k_rope = down[-2:]
        if self.fold:
            q = F.linear(cq, self.w_q).view(b, s, h, r + rope)
            q_latent, q_rope = q[..., :r], q[..., r:]
        else:
            q = F.linear(cq, self.w_q).view(b * s, h, a.qk_dim).transpose(0, 1)
            q_latent = torch.bmm(q[..., : a.nope_dim], self.w_uk).transpose(0, 1).view(b, s, h, r)
            q_rope = q[..., a.nope_dim :].transpose(0, 1).view(b, s, h, rope)
        # the queries' and the shared key's rope dims rotate together, as h + 1 heads
        rotated = rotate(torch.cat((q_rope, k_rope.unsqueeze(2)), dim=2), cis)
        entry = torch.cat((rms_norm(a.kv_a_layernorm, c_kv), rotated[:, :, h]), dim=-1)
        return torch.cat((q_latent, rotated[:, :, :h]), dim=-1).view(b, s * h, r + rope), entry

    def attend(self, q: torch.Tensor, cache: torch.Tensor, bias: torch.Tensor, s: int) -> torch.Tensor:
        """Queries from `project` (B, S * H, r + rope) against cache rows (B, T, r + rope) that already
        hold the new entries; bias from `attention_bias` (0 = may attend, -inf = may not)."""
        a = self.attn
        b, h, r = q.shape[0], a.n_heads, a.kv_lora_rank
        scale = 1.0 if self.fold else a.softmax_scale  # folded into w_q
        scores = torch.baddbmm(bias, q, cache.transpose(1, 2), alpha=scale)  # (B, S*H, T)
        if scores.dtype == torch.float32:
            probs = scores.softmax(dim=-1)
        else:
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.bmm(probs, cache[..., :r])  # (B, S*H, r): the attention-weighted latent
        if self.fold:
            return F.linear(o.view(b, s, h * r), self.w_o, a.o_proj.bias)
        o = torch.bmm(o.view(b * s, h, r).transpose(0, 1), self.w_uv)  # (H, B*S, v)
        return a.o_proj(o.transpose(0, 1).reshape(b, s, h * a.v_dim))


def rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm as one kernel when nothing needs casting (float32)."""
    if x.dtype != torch.float32:
        return norm(x)
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


def rotate(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` as one complex multiply: interleaved pairs of x (..., rope) times cos + i sin.
    The pairs come back in place (interleaved), not de-interleaved as the model writes them; q and
    k are permuted alike either way, and only this module reads the cache it writes."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * cis).flatten(-2).to(x.dtype)


def attention_bias(allowed: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Bool (B, S, T), True = may attend -> additive bias (B, S * heads, T), or (B, 1, T) when S == 1
    (broadcast over heads for free)."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    bias.masked_fill_(~allowed, float("-inf"))
    if allowed.shape[1] == 1:
        return bias
    return bias.repeat_interleave(heads, dim=1)


def moe_forward(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE block for inference: a host-side loop over the chosen experts for a single token; for
    more, the model's grouped path (which is as fast as indexing only the chosen experts when most
    of them are chosen, as with 16 tokens on 16 experts)."""
    if moe.dispatcher is not None:
        return moe(x)
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    weights, ids = route(moe, flat)
    ex = moe.experts
    if flat.shape[0] == 1:
        routed = None
        for e, w in zip(ids[0].tolist(), weights[0].tolist()):
            y = F.linear(
                swiglu(F.linear(flat, ex.gate_proj[e]), F.linear(flat, ex.up_proj[e])), ex.down_proj[e]
            )
            routed = y.mul_(w) if routed is None else routed.add_(y, alpha=w)
    else:  # the model's path: (token, expert) pairs sorted by expert, one matmul per expert
        routed = moe.routed_local(flat, weights, ids, torch.bincount(ids.flatten(), minlength=moe.n_experts))
    out = routed.view(shape)
    if moe.shared_experts is not None:
        out = out + mlp(moe.shared_experts, x)
    return out


def route(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`Gate.forward` without what only training needs (the scores, the float copies of float32
    tensors, the detach); group-limited routing goes to the gate itself."""
    gate = moe.gate
    if gate.n_group > 1 or x.dtype != torch.float32:
        return gate(x)[:2]
    scores = F.linear(x, gate.weight).sigmoid_()
    ids = (scores + gate.e_score_correction_bias).topk(gate.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if gate.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * gate.scaling, ids


def mlp(m: MLP, x: torch.Tensor) -> torch.Tensor:
    """`MLP.forward` without the four module calls."""
    return F.linear(
        swiglu(F.linear(x, m.gate_proj.weight), F.linear(x, m.up_proj.weight)), m.down_proj.weight
    )


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
        # rotations (cos + i sin) for every cache position, looked up instead of recomputed each step
        cos, sin = model.rotary(torch.arange(cache.max_seq_len, device=self.device))
        self.cis = torch.complex(cos, sin)
        self._rows = torch.arange(cache.slots, device=self.device) * cache.max_seq_len

    def refresh(self) -> None:
        """Recompute the absorbed weights after the model's weights changed."""
        for a in self.attn:
            a.refresh()

    def _block(self, layer: int, x, cis, write, cache_of, bias) -> torch.Tensor:
        blk, attn = self.blocks[layer], self.attn[layer]
        q, entry = attn.project(rms_norm(blk.input_layernorm, x), cis)
        write(layer, entry)
        x = x + attn.attend(q, cache_of(layer, entry), bias, x.shape[1])
        y = rms_norm(blk.post_attention_layernorm, x)
        return x + (moe_forward(blk.mlp, y) if isinstance(blk.mlp, MoE) else mlp(blk.mlp, y))

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
        cis = self.cis[:t].unsqueeze(-2)  # (T, 1, rope/2)

        def write(layer: int, entry: torch.Tensor) -> None:
            if contiguous:
                kv[layer, first : first + b, :t] = entry
            else:
                kv[layer, slots, :t] = entry

        x = self.model.embed_tokens(ids)
        for layer in range(len(self.blocks)):
            x = self._block(layer, x, cis, write, lambda _, entry: entry, bias)
        last = x[torch.arange(b, device=self.device), lengths - 1]
        return self.model.lm_head(rms_norm(self.model.norm, last))

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, length: int) -> torch.Tensor:
        """One new token per sequence in cache slots 0..n-1: tokens (n,) at positions pos (n,), the
        longest sequence then being `length` rows -> logits (n, V)."""
        n = tokens.shape[0]
        flat = self.cache.kv.view(self.cache.num_layers, -1, self.cache.dim)
        rows = self._rows[:n] + pos  # each new entry's row in the flattened (slot, position) axis
        allowed = torch.arange(length, device=self.device)[None, None, :] <= pos[:, None, None]
        bias = attention_bias(allowed, self.heads, self.dtype)
        cis = self.cis[pos][:, None, None]  # (n, 1, 1, rope/2)
        kv = self.cache.kv

        def write(layer: int, entry: torch.Tensor) -> None:
            flat[layer].index_copy_(0, rows, entry[:, 0])

        x = self.model.embed_tokens(tokens.unsqueeze(1))
        for layer in range(len(self.blocks)):
            x = self._block(layer, x, cis, write, lambda i, _: kv[i, :n, :length], bias)
        return self.model.lm_head(rms_norm(self.model.norm, x[:, 0]))
