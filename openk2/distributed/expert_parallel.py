"""Expert parallelism: each rank of the ep group holds E / ep routed experts of every MoE layer.

The router, the shared expert and attention stay replicated (data parallel); only the routed expert
compute moves. `MoE.dispatcher` is the hook: with `ExpertParallel` installed, a MoE layer

1. sorts its (token, expert) pairs by expert id, as the single-process path does;
2. exchanges per-expert counts with one small all-to-all, so every rank knows how many rows it will
   receive from each peer for each of its local experts (the splits are uneven and change every step);
3. dispatch: all-to-all the token rows to the ranks that own their experts;
4. regroups the received rows (source-major) by local expert and runs them as one matmul per expert;
5. combine: the reverse all-to-all brings the outputs home, where they are weighted and summed.

Both all-to-alls are an autograd function whose backward is the opposite all-to-all, so gradients
reach the experts' owners and come back to the tokens. Expert weights are stacked (E, out, in)
tensors, so sharding them is a slice along dim 0 (`Experts.first` records the first global id).

Overlap: with gloo on CPU every collective here is synchronous and nothing overlaps. On NCCL the
natural overlap points are the shared expert and attention of the next micro-batch (DualPipe /
interleaved 1F1B run one micro-batch's all-to-all under another's compute); this module leaves the
ordering to the schedule and keeps each all-to-all a single call so a schedule can put it on its own
stream.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from openk2.distributed.mesh import COMM, Mesh
from openk2.model.moe import MoE


class AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward sends gradients back the way they came."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad.contiguous(), ctx.recv, ctx.send, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    row = x[0].numel() * x.element_size() if x.shape[0] else 0
    me = dist.get_rank(group)
    COMM.add("all_to_all", row * (sum(send) - send[me]))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


class ExpertParallel:
    """The dispatcher installed on every MoE layer of a rank (see `shard_experts`)."""

    def __init__(self, mesh: Mesh):
        self.group = mesh.ep_group
        self.ep = mesh.parallel.ep
        self.ep_rank = mesh.ep_rank

    def __call__(self, moe: MoE, x: torch.Tensor, weights, ids, counts) -> torch.Tensor:
        n_local = moe.experts.n_local
        k = moe.top_k
        order = ids.flatten().argsort(stable=True)
        token = order // k
        rows = x[token]  # (T*k, D) sorted by global expert id

        # Who sends how much of what: recv_counts[src, e] rows from rank src for my local expert e.
        recv_counts = counts.new_empty(self.ep * n_local)
        COMM.add("all_to_all", counts.element_size() * n_local * (self.ep - 1))
        dist.all_to_all_single(recv_counts, counts.contiguous(), group=self.group)
        send = counts.view(self.ep, n_local).sum(1).tolist()
        recv_counts = recv_counts.view(self.ep, n_local)
        recv = recv_counts.sum(1).tolist()

        received = AllToAll.apply(rows, send, recv, self.group)  # (R, D), source-major
        local_id = torch.arange(n_local, device=x.device).repeat(self.ep)
        local_id = local_id.repeat_interleave(recv_counts.flatten())
        by_expert = local_id.argsort(stable=True)
        # A rank whose experts received no rows must still take part in both backward all-to-alls:
        # keep its (empty) output attached to `received` instead of a fresh, graph-less zeros tensor.
        y = moe.experts(received[by_expert], recv_counts.sum(0).tolist()) if len(received) else received
        y = y[by_expert.argsort()]  # back to source-major order
        y = AllToAll.apply(y, recv, send, self.group)  # (T*k, D), sorted by global expert id

        y = y * weights.flatten()[order].unsqueeze(-1).to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))  # bf16 under autocast


def shard_experts(model: nn.Module, mesh: Mesh) -> nn.Module:
    """Keep this rank's slice of every MoE layer's stacked experts and install the all-to-all
    dispatcher. Works on a full model or a pipeline chunk; a no-op when ep == 1."""
    ep = mesh.parallel.ep
    if ep == 1:
        return model
    for m in model.modules():
        if not isinstance(m, MoE):
            continue
        experts = m.experts
        if experts.n_local != m.n_experts:
            raise ValueError("experts are already sharded")
        if m.n_experts % ep:
            raise ValueError(f"n_routed_experts={m.n_experts} is not divisible by ep={ep}")
        n_local = m.n_experts // ep
        first = mesh.ep_rank * n_local
        for name in ("gate_proj", "up_proj", "down_proj"):
            full = getattr(experts, name)
            shard = nn.Parameter(
                full.detach()[first : first + n_local].clone(), requires_grad=full.requires_grad
            )
            setattr(experts, name, shard)
        experts.first = first
        m.dispatcher = ExpertParallel(mesh)
    return model


def is_expert_param(name: str) -> bool:
    """Parameters sharded over ep (replicated only over dp); everything else is replicated over dp x ep."""
    return ".mlp.experts." in name or name.startswith("mlp.experts.")
