"""Mixture of Experts with K2's router (sigmoid scores, aux-loss-free bias, group-limited top-k).

Routing, per token:
    s = sigmoid(x W_gate^T)                          affinity of each routed expert
    choose top-k experts by s + b                    b = e_score_correction_bias, selection only
        (first keep the topk_group groups whose best-two biased scores sum highest)
    w = s[chosen] / sum(s[chosen]) * routed_scaling_factor
    y = sum_i w_i Expert_i(x) + SharedExpert(x)

The bias is not trained by gradients: the training loop nudges it toward balanced expert load
(aux-loss-free balancing) from the per-expert token counts this module records.

Expert compute never loops over tokens: the (token, expert) pairs are sorted by expert so each expert
runs one matmul over a contiguous slice. The expert weights are stacked (E, out, in) tensors, which
is what Muon's batched Newton-Schulz and expert parallelism want; the checkpoint code maps them to
the per-expert keys of the real K2 checkpoint.

Decoding (no gradients) takes two shortcuts with the same arithmetic: a single token loops over its
k experts with the ids on the host (no sort, no scatter, no bincount), and under torch.compile every
(token, expert) pair is a multiply-and-sum against the expert's weights indexed in place
(`Experts.forward_in_place`), which has no data-dependent shapes. Neither records expert counts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from openk2.config import ModelConfig
from openk2.model.layers import MLP, linear, swiglu, swiglu_ffn

ExpertFFN = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# How the experts of a training/prefill forward run: "auto" = one grouped GEMM per projection
# (torch._grouped_mm) where torch has a fast kernel for it, CUDA in bfloat16; the per-expert loop
# elsewhere. "grouped" / "loop" force one (tests compare them; torch also runs the grouped op on CPU
# in float32). The only device switch in the model.
EXPERT_MATMUL = "auto"


def use_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `Experts.forward` takes the grouped GEMM for input x and expert weights `weight`."""
    if EXPERT_MATMUL == "loop" or not hasattr(torch, "_grouped_mm"):
        return False
    if EXPERT_MATMUL == "grouped":
        return True
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else weight.dtype
    return x.is_cuda and dtype == torch.bfloat16


def grouped_swiglu_ffn(
    x: torch.Tensor, counts: list[int], gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """`swiglu_ffn` of every expert at once: x (N, D) rows sorted by expert, counts[e] rows for expert
    e, stacked weights gate/up (E, I, D), down (E, D, I) -> (N, D). Three grouped GEMMs, no loop."""
    if torch.is_autocast_enabled(x.device.type):  # the op is not on autocast's lists: cast here
        dtype = torch.get_autocast_dtype(x.device.type)
        x, gate, up, down = (t.to(dtype) for t in (x, gate, up, down))
    offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
    g = torch._grouped_mm(x, gate.transpose(1, 2), offs=offs)
    u = torch._grouped_mm(x, up.transpose(1, 2), offs=offs)
    return torch._grouped_mm(swiglu(g, u), down.transpose(1, 2), offs=offs)


class Gate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, D) -> combine weights (T, k), expert ids (T, k), sigmoid scores (T, E), all float32."""
        scores = linear(x.float(), self.weight.float()).sigmoid()
        biased = scores.detach() + self.e_score_correction_bias
        if self.n_group > 1:
            grouped = biased.view(-1, self.n_group, self.n_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (T, n_group)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            biased = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).flatten(1)
        ids = biased.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids, scores


class Experts(nn.Module):
    """Routed experts as stacked SwiGLU weights: gate/up (E, I, D), down (E, D, I).

    Under expert parallelism a rank holds experts [first, first + E_local); `first` is 0 otherwise.
    """

    def __init__(self, n_experts: int, dim: int, hidden: int, first: int = 0):
        super().__init__()
        self.first = first
        self.gate_proj = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))
        # Replaces `swiglu_ffn` when gradients are on: the trainer's memory options install one that
        # saves its activations in FP8 (openk2/train/memory.py). Same signature as swiglu_ffn.
        self.training_ffn: ExpertFFN | None = None

    @property
    def n_local(self) -> int:
        return self.gate_proj.shape[0]

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x (N, D) rows sorted by local expert, counts[e] rows for expert e -> (N, D)."""
        fp8 = self.training_ffn is not None and torch.is_grad_enabled()
        if not fp8 and x.shape[0] > 0 and use_grouped_mm(x, self.gate_proj):
            return grouped_swiglu_ffn(x, counts, self.gate_proj, self.up_proj, self.down_proj)
        outs = []
        # split/unbind rather than indexing: their backward is one cat/stack, where indexing would
        # build a zero-filled full-size gradient per expert.
        gate, up, down = self.gate_proj.unbind(0), self.up_proj.unbind(0), self.down_proj.unbind(0)
        ffn = self.training_ffn if self.training_ffn is not None and torch.is_grad_enabled() else swiglu_ffn
        for e, xe in enumerate(x.split(counts)):
            if xe.shape[0] > 0:
                outs.append(ffn(xe, gate[e], up[e], down[e]))
        return torch.cat(outs) if outs else x.new_zeros(0, self.down_proj.shape[1])

    def forward_one(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One token x (1, D) through its chosen experts ids (1, k) with combine weights (1, k), looping
        on the host over the k experts. Needs every expert on this rank (no expert parallelism)."""
        out = None
        for e, w in zip(ids[0].tolist(), weights[0].tolist()):
            y = swiglu_ffn(x, self.gate_proj[e], self.up_proj[e], self.down_proj[e])
            out = y.mul_(w) if out is None else out.add_(y, alpha=w)
        return out

    def forward_in_place(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Every (token, expert) pair as multiply-and-sum against the expert's weights indexed in place:
        written this way, with no data-dependent shapes, inductor fuses the indexing into the loop that
        reads the weights, so only the chosen experts are read and nothing is copied. Pairs are sorted
        by expert so that two tokens on one expert read its weights while they are still in cache."""
        k = ids.shape[1]
        experts, order = ids.flatten().sort()
        token = order // k
        xs = x[token].unsqueeze(1)  # (P, 1, D)
        h = swiglu((self.gate_proj[experts] * xs).sum(-1), (self.up_proj[experts] * xs).sum(-1))
        y = (self.down_proj[experts] * h.unsqueeze(1)).sum(-1) * weights.flatten()[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.gate = Gate(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self.aux_loss_alpha = config.aux_loss_alpha if config.seq_aux else 0.0
        # Statistics of the last forward: tokens routed to each expert (load balancing) and the
        # sequence-wise auxiliary loss (a differentiable scalar, 0 unless enabled and training).
        self.compute_aux_loss = False
        self.expert_counts: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None
        # Expert parallelism swaps this for an all-to-all version; see openk2/distributed/expert_parallel.py.
        self.dispatcher = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, ids, scores = self.gate(flat)
        if self.dispatcher is None and not torch.is_grad_enabled():
            if torch.compiler.is_compiling():
                return self._with_shared(self.experts.forward_in_place(flat, weights, ids).view(shape), x)
            if flat.shape[0] == 1:
                return self._with_shared(self.experts.forward_one(flat, weights, ids).view(shape), x)
        counts = torch.bincount(ids.flatten(), minlength=self.n_experts)
        self.expert_counts = counts.detach()
        if self.compute_aux_loss and self.training and self.aux_loss_alpha > 0:
            self.aux_loss = self._sequence_aux_loss(scores, ids, shape[0])
        if self.dispatcher is not None:
            routed = self.dispatcher(self, flat, weights, ids, counts)
        else:
            routed = self.routed_local(flat, weights, ids, counts)
        return self._with_shared(routed.view(shape), x)

    def _with_shared(self, routed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return routed if self.shared_experts is None else routed + self.shared_experts(x)

    def routed_local(self, x: torch.Tensor, weights, ids, counts) -> torch.Tensor:
        """All experts on this rank: sort (token, expert) pairs by expert, run, weight, scatter back."""
        order = ids.flatten().argsort(stable=True)
        token = order // self.top_k
        y = self.experts(x[token], counts.tolist())
        y = y * weights.flatten()[order].unsqueeze(-1).to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))  # bf16 under autocast

    def _sequence_aux_loss(self, scores: torch.Tensor, ids: torch.Tensor, batch: int) -> torch.Tensor:
        """DeepSeek-V3's sequence-wise balance loss: alpha * sum_e f_e * P_e, averaged over sequences,
        f_e = E/(k*T) * tokens of the sequence routed to e, P_e = mean normalised affinity to e."""
        seq = scores.shape[0] // batch
        probs = (scores / scores.sum(dim=-1, keepdim=True)).view(batch, seq, self.n_experts)
        load = torch.zeros(batch, self.n_experts, device=scores.device)
        ones = torch.ones(batch, seq * self.top_k, device=scores.device)
        load.scatter_add_(1, ids.view(batch, seq * self.top_k), ones)
        load = load * self.n_experts / (self.top_k * seq)
        return self.aux_loss_alpha * (load * probs.mean(dim=1)).sum(dim=-1).mean()
