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
  together, RMSNorm as one call, routing without the float copies and the scores only training
  needs, MLPs without module dispatch.
* The decode step is a pure function (`step`): it reads the cache rows written before it and
  returns the new rows, which `decode` writes afterwards, so the new token's own key is scored
  apart from the old rows (one softmax over both). Being pure, it can be handed whole to
  `torch.compile` (`compile=True`): inductor fuses the ~600 small kernels of a step into a few
  dozen, runs single-row matmuls as its own vectorised loops and the MoE as one loop over the
  chosen experts' weights, read in place (the eager path's host-side expert ids would break the
  graph). One graph serves one running sequence, a second any larger batch and cache length; both
  compile at start-up (benchmarks/bench_decode_floor.py prints how long; inductor caches them on
  disk afterwards). A step that mutated the cache inside the graph was tried first: inductor then
  copied the whole pool per layer.

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

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, D) -> queries (B, S * H, r + rope) for `attend`, and x's cache entries
        [RMSNorm(c_kv) ; rope(k_rope)] (B, S, r + rope). cos, sin: (B or 1, S, 1, rope/2)."""
        a = self.attn
        b, s, _ = x.shape
        h, r, rope = a.n_heads, a.kv_lora_rank, a.rope_dim
        down = linear(x, self.w_down, self.b_down).split(self.splits, dim=-1)
        cq = rms_norm(a.q_a_layernorm, down[0]) if a.q_lora_rank is not None else x
        c_kv, k_rope = down[-2:]
        if self.fold:
            q = linear(cq, self.w_q).view(b, s, h, r + rope)
            q_latent, q_rope = q[..., :r], q[..., r:]
        else:
            q = linear(cq, self.w_q).view(b * s, h, a.qk_dim).transpose(0, 1)
            q_latent = torch.bmm(q[..., : a.nope_dim], self.w_uk).transpose(0, 1).view(b, s, h, r)
            q_rope = q[..., a.nope_dim :].transpose(0, 1).view(b, s, h, rope)
        # the queries' and the shared key's rope dims rotate together, as h + 1 heads
        rotated = rotate(torch.cat((q_rope, k_rope.unsqueeze(2)), dim=2), cos, sin)
        entry = torch.cat((rms_norm(a.kv_a_layernorm, c_kv), rotated[:, :, h]), dim=-1)
        return torch.cat((q_latent, rotated[:, :, :h]), dim=-1).view(b, s * h, r + rope), entry

    def attend(self, q: torch.Tensor, cache: torch.Tensor, bias: torch.Tensor, s: int) -> torch.Tensor:
        """Queries from `project` (B, S * H, r + rope) against cache rows (B, T, r + rope) that already
        hold the new entries; bias from `attention_bias` (0 = may attend, -inf = may not)."""
        a = self.attn
        r = a.kv_lora_rank
        scale = 1.0 if self.fold else a.softmax_scale  # folded into w_q
        probs = softmax(torch.baddbmm(bias, q, cache.transpose(1, 2), alpha=scale))  # (B, S*H, T)
        return self.output(torch.bmm(probs, cache[..., :r]), s)  # the attention-weighted latent

    def attend_new(self, q: torch.Tensor, entry: torch.Tensor, old: torch.Tensor, bias: torch.Tensor):
        """One new token per sequence: queries (B, H, r + rope) against the rows written before this
        step, old (B, T, r + rope) with bias (B, 1, T), and against the token's own entry (B, r + rope),
        which is not in the cache yet: its score is one more column of the same softmax."""
        r = self.attn.kv_lora_rank
        scale = 1.0 if self.fold else self.attn.softmax_scale
        own = torch.bmm(q, entry.unsqueeze(-1))  # (B, H, 1)
        scores = torch.cat((torch.baddbmm(bias, q, old.transpose(1, 2), alpha=scale), own * scale), dim=-1)
        probs = softmax(scores)
        o = torch.baddbmm(probs[..., -1:] * entry[:, None, :r], probs[..., :-1], old[..., :r])
        return self.output(o, 1)

    def output(self, o: torch.Tensor, s: int) -> torch.Tensor:
        """Attention-weighted latents (B, S * H, r) -> the block's output (B, S, D)."""
        a = self.attn
        b, h, r = o.shape[0], a.n_heads, a.kv_lora_rank
        if self.fold:
            return linear(o.reshape(b, s, h * r), self.w_o, a.o_proj.bias)
        o = torch.bmm(o.reshape(b * s, h, r).transpose(0, 1), self.w_uv)  # (H, B*S, v)
        return linear(o.transpose(0, 1).reshape(b, s, h * a.v_dim), a.o_proj.weight, a.o_proj.bias)


def softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, computed in float32 and returned in the scores' dtype."""
    if scores.dtype == torch.float32:
        return scores.softmax(dim=-1)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


def rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm as one kernel when nothing needs casting (float32)."""
    if x.dtype != torch.float32:
        return norm(x)
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` with the pairs left in place: interleaved pairs (a, b) of x (..., rope) become
    (a cos - b sin, a sin + b cos), not de-interleaved as the model writes them; q and k are permuted
    alike either way, and only this module reads the cache it writes. Eager: one complex multiply (two
    kernels); under torch.compile, real arithmetic (inductor does not generate code for complex)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    if not torch.compiler.is_compiling():
        rotated = torch.view_as_complex(pairs) * torch.complex(cos, sin)
        return torch.view_as_real(rotated).flatten(-2).to(x.dtype)
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except that a single row under torch.compile is written as a matrix-vector product,
    which inductor turns into its own vectorised loop (a (1, K) matmul stays a library call)."""
    if torch.compiler.is_compiling() and x.numel() == x.shape[-1]:
        y = (weight @ x.reshape(-1)).view(*x.shape[:-1], -1)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


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
    of them are chosen, as with 16 tokens on 16 experts). Under torch.compile: `experts_in_place`."""
    if moe.dispatcher is not None:
        return moe(x)
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    weights, ids = route(moe, flat)
    ex = moe.experts
    if torch.compiler.is_compiling():
        routed = experts_in_place(moe, flat, weights, ids)
    elif flat.shape[0] == 1:
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


def experts_in_place(moe: MoE, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Every (token, expert) pair as multiply-and-sum against the expert's weights indexed in place:
    written this way, with no data-dependent shapes, inductor fuses the indexing into the loop that
    reads the weights, so only the chosen experts are read and nothing is copied. Pairs are sorted by
    expert so that two tokens on one expert read its weights while they are still in cache."""
    ex, k = moe.experts, ids.shape[1]
    experts, order = ids.flatten().sort()
    token = order // k
    xs = x[token]  # (P, D)
    h = swiglu(
        (ex.gate_proj[experts] * xs.unsqueeze(1)).sum(-1), (ex.up_proj[experts] * xs.unsqueeze(1)).sum(-1)
    )
    y = (ex.down_proj[experts] * h.unsqueeze(1)).sum(-1) * weights.flatten()[order].unsqueeze(-1)
    return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


def route(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`Gate.forward` without what only training needs (the scores, the float copies of float32
    tensors, the detach); group-limited routing goes to the gate itself."""
    gate = moe.gate
    if gate.n_group > 1 or x.dtype != torch.float32:
        return gate(x)[:2]
    scores = linear(x, gate.weight).sigmoid()
    ids = (scores + gate.e_score_correction_bias).topk(gate.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if gate.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * gate.scaling, ids


def mlp(m: MLP, x: torch.Tensor) -> torch.Tensor:
    """`MLP.forward` without the four module calls."""
    return linear(swiglu(linear(x, m.gate_proj.weight), linear(x, m.up_proj.weight)), m.down_proj.weight)


class CachedForward:
    """Prefill and decode of the whole model against a LatentCache; `compile=True` runs the decode
    step through torch.compile (needs a C++ compiler on CPU; see the module docstring)."""

    def __init__(
        self, model: Transformer, cache: LatentCache, fold: bool | None = None, compile: bool = False
    ):
        self.model = model
        self.cache = cache
        self.blocks = list(model.layers.values())
        self.attn = [AbsorbedMLA(blk.self_attn, fold) for blk in self.blocks]
        self.heads = model.config.num_attention_heads
        p = model.lm_head.weight
        self.device, self.dtype = p.device, p.dtype
        # rotations for every cache position, looked up instead of recomputed each step
        self.cos, self.sin = model.rotary(torch.arange(cache.max_seq_len, device=self.device))
        self._rows = torch.arange(cache.slots, device=self.device) * cache.max_seq_len
        self.compiled = compile
        if compile:
            if any(isinstance(b.mlp, MoE) and b.mlp.dispatcher is not None for b in self.blocks):
                raise ValueError("compile=True is for one process; this model's MoE is expert-parallel")
        self._step = torch.compile(self.step, fullgraph=True) if compile else self.step

    def refresh(self) -> None:
        """Recompute the absorbed weights after the model's weights changed."""
        for a in self.attn:
            a.refresh()

    def _mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[layer]
        y = rms_norm(blk.post_attention_layernorm, x)
        return x + (moe_forward(blk.mlp, y) if isinstance(blk.mlp, MoE) else mlp(blk.mlp, y))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return linear(rms_norm(self.model.norm, x), self.model.lm_head.weight, self.model.lm_head.bias)

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
        cos, sin = self.cos[:t, None], self.sin[:t, None]  # (T, 1, rope/2)
        x = self.model.embed_tokens(ids)
        for layer, (blk, attn) in enumerate(zip(self.blocks, self.attn)):
            q, entry = attn.project(rms_norm(blk.input_layernorm, x), cos, sin)
            if contiguous:
                kv[layer, first : first + b, :t] = entry
            else:
                kv[layer, slots, :t] = entry
            x = self._mlp(layer, x + attn.attend(q, entry, bias, t))
        return self._logits(x[torch.arange(b, device=self.device), lengths - 1])

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, length: int) -> torch.Tensor:
        """One new token per sequence in cache slots 0..n-1: tokens (n,) at positions pos (n,), the
        longest sequence then being `length` rows -> logits (n, V). Runs `step` on the rows already
        written, then writes the new ones."""
        n = tokens.shape[0]
        # The rows written before (T = length - 1), at least two: a dimension of size 1 would make
        # torch.compile specialise a third graph. Rows past a sequence's own are masked anyway.
        old = torch.arange(max(length - 1, 2), device=self.device)
        allowed = old[None, :] < pos[:, None]  # (n, T): each sequence's own rows
        kv = self.cache.kv[:, :n, : old.shape[0]]
        if self.compiled:  # one graph for a single sequence, one for any larger batch and length
            batch = ((tokens, 0), (pos, 0), (allowed, 0), (kv, 1)) if n > 1 else ()
            for t, dim in ((kv, 2), (allowed, 1), *batch):
                torch._dynamo.mark_dynamic(t, dim)
        logits, entries = self._step(tokens, pos, allowed, kv)
        flat = self.cache.kv.view(self.cache.num_layers, -1, self.cache.dim)
        flat.index_copy_(1, self._rows[:n] + pos, entries)  # row of (slot, position) in every layer
        return logits

    def step(
        self, tokens: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor, kv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode step as a pure function: tokens (n,) at positions pos (n,), the cache rows written
        before (layers, n, T, r + rope), of which allowed (n, T) are each sequence's -> logits (n, V)
        and the new rows (layers, n, r + rope)."""
        bias = attention_bias(allowed.unsqueeze(1), self.heads, self.dtype)  # (n, 1, T), for all heads
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # (n, 1, 1, rope/2)
        x = self.model.embed_tokens(tokens.unsqueeze(1))  # (n, 1, D)
        entries = []
        for layer, (blk, attn) in enumerate(zip(self.blocks, self.attn)):
            # queries (n, H, r + rope), entry (n, 1, r + rope)
            q, entry = attn.project(rms_norm(blk.input_layernorm, x), cos, sin)
            entries.append(entry[:, 0])
            x = self._mlp(layer, x + attn.attend_new(q, entry[:, 0], kv[layer], bias))
        return self._logits(x[:, 0]), torch.stack(entries)

    def warm_up(self) -> None:
        """Run (and so compile) the decode graphs once on scratch inputs, so that the first requests do
        not wait for the compiler; the rows it writes are overwritten by the next prefill."""
        try:
            for n in (1, 2) if self.cache.slots > 1 else (1,):
                with torch.inference_mode():
                    tokens = torch.zeros(n, dtype=torch.long, device=self.device)
                    self.decode(tokens, torch.full((n,), 2, device=self.device), 3)
        except Exception as e:  # no C++ compiler, an unsupported platform, ...
            if not self.compiled:
                raise
            raise RuntimeError(
                f"torch.compile of the decode step failed ({type(e).__name__}: "
                f"{(str(e).strip().splitlines() or [''])[0][:300]}); "
                "serve without compile (drop --compile), or install a C++ compiler"
            ) from e
