"""Multi-head Latent Attention (MLA), the attention of DeepSeek-V3 and Kimi K2.

Queries go through a low-rank bottleneck: q = W_qb RMSNorm(W_qa x). Keys and values come from one
shared latent c_kv = RMSNorm(first kv_lora_rank dims of W_kva x); the other qk_rope_head_dim dims of
W_kva x are one rotary key k_rope shared by all heads. Per head:

    q_h = [q_nope_h ; rope(q_rope_h)]          k_h = [W_uk_h c_kv ; rope(k_rope)]          v_h = W_uv_h c_kv

where W_kvb = [W_uk ; W_uv] per head. Both ways of running it share `MLA.rotate_and_entry` (the
rotation and the cache entry [RMSNorm(c_kv) ; rope(k_rope)]):

* `MLA.forward` (training, and any forward without a cache): expand k and v per head and run ordinary
  attention. Optionally records each head's largest pre-softmax logit, which QK-Clip needs; that path
  computes the logits explicitly (the same logits the softmax uses, so there is no second pass).
* `LatentAttention` (inference against the latent cache): W_uk is absorbed into the query and W_uv
  into the output, so attention runs directly against cached entries: kv_lora_rank + qk_rope_head_dim
  values per token per layer instead of num_heads * (qk_head_dim + v_head_dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openk2.config import ModelConfig
from openk2.model.layers import Linear, RMSNorm, linear, softmax
from openk2.model.rope import apply_rotary

FOLD_MAX_GROWTH = 2.0  # fold W_uk / W_uv only if the folded matrices are at most this much larger


class MLA(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.qk_dim = config.qk_head_dim
        self.softmax_scale = config.softmax_scale
        dim, bias = config.hidden_size, config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = Linear(dim, self.n_heads * self.qk_dim, bias=False)
        else:
            self.q_a_proj = Linear(dim, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = Linear(self.q_lora_rank, self.n_heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(dim, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = Linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(self.n_heads * self.v_dim, dim, bias=bias)
        # QK-Clip statistics: the largest pre-softmax logit of each head in the last forward.
        self.record_max_logits = False
        self.max_logits: torch.Tensor | None = None

    # ------------------------------------------------------------------ shared by both paths
    def rotate_and_entry(
        self,
        q_rope: torch.Tensor,
        c_kv: torch.Tensor,
        k_rope: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q_rope (B, S, H, rope), c_kv (B, S, r), k_rope (B, S, rope) -> rotated q_rope (B, S, H, rope)
        and the cache entry [RMSNorm(c_kv) ; rope(k_rope)] (B, S, r + rope). The queries' rope dims and
        the shared key rotate together, as H + 1 heads (one rotation instead of two)."""
        h = self.n_heads
        rotated = apply_rotary(torch.cat((q_rope, k_rope.unsqueeze(2)), dim=2), cos, sin)
        return rotated[:, :, :h], torch.cat((self.kv_a_layernorm(c_kv), rotated[:, :, h]), dim=-1)

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, S, D) -> q_nope (B, S, H, nope), rotated q_rope (B, S, H, rope) and x's cache entries
        (B, S, r + rope)."""
        b, s, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(b, s, self.n_heads, self.qk_dim).split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        q_rope, entry = self.rotate_and_entry(q_rope, c_kv, k_rope, cos, sin)
        return q_nope, q_rope, entry

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_uk (H, nope, r) and W_uv (H, v, r) slices of kv_b_proj."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    # ------------------------------------------------------------------ training / no-cache path
    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, S, D); mask (B, 1, S, S) bool (True = may attend) or None for plain causal."""
        b, s, _ = x.shape
        q_nope, q_rope, latent = self.project(x, cos, sin)
        c_kv, k_rope = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(b, s, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)  # (B, H, S, qk)
        k = torch.cat((k_nope, k_rope.unsqueeze(2).expand(-1, -1, self.n_heads, -1)), dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        if self.record_max_logits:
            out = self._eager_attention(q, k, v, mask)
        elif mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.n_heads * self.v_dim))

    def _eager_attention(self, q, k, v, mask) -> torch.Tensor:
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.softmax_scale  # (B, H, S, S)
        if mask is None:
            s = q.shape[-2]
            mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        self.max_logits = scores.detach().amax(dim=(0, 2, 3)).float()
        return torch.matmul(softmax(scores).to(v.dtype), v)


# ---------------------------------------------------------------------------------------------------
# Inference against the latent cache


def attention_bias(allowed: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Bool (B, S, T), True = may attend -> additive bias (B, S * heads, T) for `LatentAttention`, or
    (B, 1, T) when S == 1 (broadcast over heads for free)."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    bias.masked_fill_(~allowed, float("-inf"))
    if allowed.shape[1] == 1:
        return bias
    return bias.repeat_interleave(heads, dim=1)


class LatentAttention:
    """One layer's MLA run against latent cache entries, with W_uk absorbed into the query and W_uv
    into the output.

    Per head, the query's nope part only ever meets the cache through W_uk, so W_uk^T W_qb_nope (times
    the softmax scale) can be one matrix: the query projection then yields [q_latent ; q_rope] directly,
    and the score against a cache entry [c_kv ; k_rope] is a single dot product (one bmm for all heads
    and positions). Likewise o_proj W_uv is one (dim, heads * kv_lora_rank) matrix applied to the
    attention-weighted latent. Folding is used when it at most doubles the weights it replaces (true
    for `small`/`tiny`, where it removes four kernels per layer); for K2's shapes it would triple them,
    so there W_uk and W_uv stay separate batched matmuls. The two down-projections of x ([q_a ; kv_a])
    run as one matmul. These are rearrangements of the MLA's weights, made once by `refresh()`, which
    must run again whenever the weights change.
    """

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

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, D) -> queries (B, S * H, r + rope) for `attend`, and x's cache entries
        (B, S, r + rope). cos, sin: (B or 1, S, rope/2) or (S, rope/2)."""
        a = self.attn
        b, s, _ = x.shape
        h, r, rope = a.n_heads, a.kv_lora_rank, a.rope_dim
        down = linear(x, self.w_down, self.b_down).split(self.splits, dim=-1)
        cq = a.q_a_layernorm(down[0]) if a.q_lora_rank is not None else x
        c_kv, k_rope = down[-2:]
        if self.fold:
            q = linear(cq, self.w_q).view(b, s, h, r + rope)
            q_latent, q_rope = q[..., :r], q[..., r:]
        else:
            q = linear(cq, self.w_q).view(b * s, h, a.qk_dim).transpose(0, 1)
            q_latent = torch.bmm(q[..., : a.nope_dim], self.w_uk).transpose(0, 1).view(b, s, h, r)
            q_rope = q[..., a.nope_dim :].transpose(0, 1).view(b, s, h, rope)
        q_rope, entry = a.rotate_and_entry(q_rope, c_kv, k_rope, cos, sin)
        return torch.cat((q_latent, q_rope), dim=-1).view(b, s * h, r + rope), entry

    def attend(self, q: torch.Tensor, cache: torch.Tensor, bias: torch.Tensor, s: int) -> torch.Tensor:
        """Queries from `project` (B, S * H, r + rope) against cache entries (B, T, r + rope) that already
        hold the new ones; bias from `attention_bias` (0 = may attend, -inf = may not) -> (B, S, D)."""
        r = self.attn.kv_lora_rank
        scale = 1.0 if self.fold else self.attn.softmax_scale  # folded into w_q
        probs = softmax(torch.baddbmm(bias, q, cache.transpose(1, 2), alpha=scale))  # (B, S*H, T)
        return self.output(torch.bmm(probs, cache[..., :r]), s)  # the attention-weighted latent

    def attend_new(self, q: torch.Tensor, entry: torch.Tensor, old: torch.Tensor, bias: torch.Tensor):
        """One new token per sequence: queries (B, H, r + rope) against the entries written before this
        step, old (B, T, r + rope) with bias (B, 1, T), and against the token's own entry (B, r + rope),
        which is not in the cache yet: its score is one more column of the same softmax. -> (B, 1, D)"""
        r = self.attn.kv_lora_rank
        scale = 1.0 if self.fold else self.attn.softmax_scale
        own = torch.bmm(q, entry.unsqueeze(-1))  # (B, H, 1)
        scores = torch.cat((torch.baddbmm(bias, q, old.transpose(1, 2), alpha=scale), own * scale), dim=-1)
        probs = softmax(scores)
        o = torch.baddbmm(probs[..., -1:] * entry[:, None, :r], probs[..., :-1], old[..., :r])
        return self.output(o, 1)

    def output(self, o: torch.Tensor, s: int) -> torch.Tensor:
        """Attention-weighted latents (B, S * H, r) -> the attention block's output (B, S, D)."""
        a = self.attn
        b, h, r = o.shape[0], a.n_heads, a.kv_lora_rank
        if self.fold:
            return linear(o.reshape(b, s, h * r), self.w_o, a.o_proj.bias)
        o = torch.bmm(o.reshape(b * s, h, r).transpose(0, 1), self.w_uv)  # (H, B*S, v)
        return linear(o.transpose(0, 1).reshape(b, s, h * a.v_dim), a.o_proj.weight, a.o_proj.bias)
