"""Multi-head Latent Attention (MLA), the attention of DeepSeek-V3 and Kimi K2.

Queries go through a low-rank bottleneck: q = W_qb RMSNorm(W_qa x). Keys and values come from one
shared latent c_kv = RMSNorm(first kv_lora_rank dims of W_kva x); the other qk_rope_head_dim dims of
W_kva x are one rotary key k_rope shared by all heads. Per head:

    q_h = [q_nope_h ; rope(q_rope_h)]          k_h = [W_uk_h c_kv ; rope(k_rope)]          v_h = W_uv_h c_kv

where W_kvb = [W_uk ; W_uv] per head. Two ways to run it:

* `forward` (training, prefill without cache): expand k and v per head and run ordinary attention.
  Optionally records each head's largest pre-softmax logit, which QK-Clip needs; that path computes
  the logits explicitly (they are the same logits the softmax uses, so there is no second pass).
* `forward_latent` (inference): W_uk is absorbed into the query and W_uv into the output, so attention
  runs directly against cached (c_kv, k_rope) pairs: kv_lora_rank + qk_rope_head_dim values per token
  per layer instead of num_heads * (qk_head_dim + v_head_dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openk2.config import ModelConfig
from openk2.model.layers import RMSNorm
from openk2.model.rope import apply_rotary


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
            self.q_proj = nn.Linear(dim, self.n_heads * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, dim, bias=bias)
        # QK-Clip statistics: the largest pre-softmax logit of each head in the last forward.
        self.record_max_logits = False
        self.max_logits: torch.Tensor | None = None

    # ------------------------------------------------------------------ shared pieces
    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (B, S, D) -> q_nope (B, S, H, nope), rotated q_rope (B, S, H, rope)."""
        b, s, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, s, self.n_heads, self.qk_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rotary(q_rope, cos, sin)

    def compress(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, S, D) -> the inference cache entry [RMSNorm(c_kv) ; rope(k_rope)], (B, S, r + rope)."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_rope = apply_rotary(k_rope.unsqueeze(2), cos, sin).squeeze(2)
        return torch.cat((self.kv_a_layernorm(c_kv), k_rope), dim=-1)

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
        q_nope, q_rope = self.queries(x, cos, sin)
        latent = self.compress(x, cos, sin)
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
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        return torch.matmul(probs, v)

    # ------------------------------------------------------------------ inference path (absorbed)
    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_uk (H, nope, r) and W_uv (H, v, r) slices of kv_b_proj."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def forward_latent(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention of new tokens x (B, S, D) against a latent cache (B, T, r + rope) that already holds
        them (write `compress(x)` into the cache first). mask (B, S, T) bool, True = may attend."""
        b, s, _ = x.shape
        q_nope, q_rope = self.queries(x, cos, sin)
        w_uk, w_uv = self.absorbed_weights()
        q_latent = torch.einsum("bshn,hnr->bshr", q_nope, w_uk)  # absorb W_uk into the query
        c_kv, k_rope = cache.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        scores = torch.einsum("bshr,btr->bhst", q_latent, c_kv)
        scores = (scores + torch.einsum("bshp,btp->bhst", q_rope, k_rope)) * self.softmax_scale
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype)
        o_latent = torch.einsum("bhst,btr->bshr", probs, c_kv)
        out = torch.einsum("bshr,hvr->bshv", o_latent, w_uv)  # absorb W_uv into the output
        return self.o_proj(out.reshape(b, s, self.n_heads * self.v_dim))
