"""Distributed MuonClip with ZeRO-1: optimizer state sharded over the data-parallel ranks.

Every parameter is replicated on some group of ranks (the dp x ep batch group for attention and
dense weights, the dp group for an expert slice; see `ParallelModel.reduction_group`). Over that
group of n ranks the parameter is viewed as one flat vector, padded to a multiple of n and cut into n
equal shards; rank i owns shard i of the optimizer state. One step (MuonClip as in the K2 report):

1. reduce-scatter the gradient: each rank gets the sum of its shard (then / dp*ep, the batch mean);
2. momentum / AdamW moments are updated on the shard only -- they are elementwise;
3. Muon matrices: the momentum direction shards are gathered on one owner rank, which runs
   Newton-Schulz on the full matrix (owners are assigned round-robin over each group so the work is
   spread), and the orthogonalised update is scattered back in shards; all gathers are issued before
   any Newton-Schulz so the owners compute at the same time;
4. each rank updates its shard of the weights and the shards are all-gathered into the full
   parameter, identical on every rank of the group;
5. QK-Clip: the step's max logits are max-reduced over the batch group (`ParallelModel.reduce_stats`)
   before the clip, so every rank scales the same heads by the same factors.

Gradient clipping needs the norm of the whole reduced gradient before any update: `reduce_grads()` does
step 1 alone and returns that norm (the shards of all ranks partition the model, so it is the square
root of one all-reduced sum of squares), `clip_grads_(coef)` scales the shards, and `step()` continues
from them. A trainer can thus check the norm for NaN/inf before the weights are touched.

The arithmetic is MuonClip's (`openk2.optim.muon`): the same pure `momentum_direction`,
`newton_schulz_by_shape` and `muon_scale`, the same AdamW formula, so a run matches the single-process
optimizer up to floating-point summation order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from openk2.distributed.mesh import COMM, all_gather, all_reduce_, group_size, reduce_scatter
from openk2.distributed.parallelize import ParallelModel
from openk2.optim.muon import (
    ADAMW_MATRICES,
    momentum_direction,
    muon_scale,
    newton_schulz_by_shape,
    resolve_ns_dtype,
)
from openk2.optim.qk_clip import qk_clip_


class _Slot:
    """One parameter's sharding over its group."""

    def __init__(self, name: str, p: torch.nn.Parameter, group, use_muon: bool):
        self.name, self.p, self.group, self.use_muon = name, p, group, use_muon
        self.n = group_size(group)
        self.rank = dist.get_rank(group) if self.n > 1 else 0
        self.shard_len = -(-p.numel() // self.n)
        self.start = self.rank * self.shard_len
        self.owner = 0  # rank within the group that runs Newton-Schulz (set by the optimizer)

    def padded(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1)
        pad = self.shard_len * self.n - flat.numel()
        return torch.cat((flat, flat.new_zeros(pad))) if pad else flat

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a full tensor (a copy, zero-padded at the end)."""
        return self.padded(t)[self.start : self.start + self.shard_len].clone()


class DistributedMuon(torch.optim.Optimizer):
    """MuonClip over a `ParallelModel` with ZeRO-1 sharded state. Same hyper-parameters as MuonClip."""

    def __init__(
        self,
        pm: ParallelModel,
        lr: float = 2e-4,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        qk_clip_tau: float | None = 100.0,
        ns_steps: int = 5,
        ns_dtype: torch.dtype | str | None = "auto",
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_lr: float | None = None,
        adamw_only: bool = False,
    ):
        """adamw_only: AdamW for every parameter (the decay split unchanged), as `--optimizer adamw`."""
        self.pm = pm
        self._grads: dict[int, torch.Tensor] | None = None  # reduced gradient shards, see reduce_grads
        self.slots: dict[int, _Slot] = {}
        muon, decay, no_decay = [], [], []
        owners: dict[int, int] = {}  # per group: next owner, round-robin
        for name, p in pm.named_parameters():
            if not p.requires_grad:
                continue
            use_muon = not adamw_only and p.ndim >= 2 and not name.endswith(ADAMW_MATRICES)
            slot = _Slot(name, p, pm.reduction_group(name), use_muon)
            if use_muon:
                key = id(slot.group)
                slot.owner = owners.get(key, 0)
                owners[key] = (slot.owner + 1) % slot.n
            self.slots[id(p)] = slot
            (muon if use_muon else decay if p.ndim >= 2 else no_decay).append(p)
        adam_lr = lr if adamw_lr is None else adamw_lr
        groups = [
            dict(params=muon, use_muon=True, lr=lr, weight_decay=weight_decay),
            dict(params=decay, use_muon=False, lr=adam_lr, weight_decay=weight_decay),
            dict(params=no_decay, use_muon=False, lr=adam_lr, weight_decay=0.0),
        ]
        defaults = dict(
            momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, betas=adamw_betas, eps=adamw_eps
        )
        super().__init__([g for g in groups if g["params"]], defaults)
        self.qk_clip_tau = qk_clip_tau
        self.device = next(iter(pm.parameters())).device  # CUDA (NCCL) or CPU (gloo): one code path
        self.ns_dtype = resolve_ns_dtype(ns_dtype, self.device)  # as MuonClip

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def reduce_grads(self) -> float:
        """Reduce-scatter every gradient into this rank's shard of the batch-mean gradient and return
        the global gradient norm (the same on every rank). Collective; `step()` continues from here."""
        scale = 1.0 / self.pm.mesh.batch_size
        self._grads = {}
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for group in self.param_groups:
            for p in group["params"]:
                slot = self.slots[id(p)]
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                shard = g.new_empty(slot.shard_len)
                reduce_scatter(shard, slot.padded(g), slot.group)
                self._grads[id(p)] = shard.mul_(scale)
                squares += shard.double().square().sum()
        world = dist.group.WORLD if dist.is_initialized() else None
        return float(all_reduce_(squares, world).sqrt())  # shards partition the model: sum them all

    @torch.no_grad()
    def clip_grads_(self, coef: float) -> None:
        """Scale the reduced gradient shards (after `reduce_grads`), e.g. by max_norm / norm."""
        if self._grads is None:
            raise RuntimeError("clip_grads_ needs reduce_grads() first")
        for g in self._grads.values():
            g.mul_(coef)

    @torch.no_grad()
    def step(self, closure=None) -> int:
        """One update of every parameter shard, the parameter all-gather, then QK-Clip on the step's
        reduced max logits (call `pm.reduce_stats()` first). Returns heads clipped on this rank's chunks."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        if self._grads is None:
            self.reduce_grads()
        grads, self._grads = self._grads, None
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group, grads)
            else:
                self._adamw_group(group, grads)
        for group in self.param_groups:
            for p in group["params"]:
                slot = self.slots[id(p)]
                full = p.new_empty(slot.shard_len * slot.n)
                all_gather(full, self.state[p]["param_shard"], slot.group)
                p.copy_(full[: p.numel()].view_as(p))
        if self.qk_clip_tau is None:
            return 0
        return sum(qk_clip_(ch, self.qk_clip_tau) for ch in self.pm.chunks)

    def _param_shard(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "param_shard" not in state:
            state["param_shard"] = self.slots[id(p)].local(p)
        else:  # the full parameter may have changed since (QK-Clip, checkpoint load)
            state["param_shard"].copy_(self.slots[id(p)].local(p))
        return state["param_shard"]

    def _muon_group(self, group: dict, grads: dict) -> None:
        lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
        directions, full = {}, {}
        for p in group["params"]:  # 1. momentum on the shard; gather the direction on the owner
            slot, state = self.slots[id(p)], self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = p.new_zeros(slot.shard_len)
            d = momentum_direction(grads[id(p)], state["momentum_buffer"], beta, group["nesterov"])
            directions[id(p)] = d
            if slot.n == 1:
                full[id(p)] = d
                continue
            gathered = [torch.empty_like(d) for _ in range(slot.n)] if slot.rank == slot.owner else None
            COMM.add("gather", d.numel() * d.element_size() * (slot.rank != slot.owner))
            dist.gather(d, gathered, group_dst=slot.owner, group=slot.group)
            if gathered is not None:
                full[id(p)] = torch.cat(gathered)
        # 2. Newton-Schulz on the matrices this rank owns, same-shaped ones batched into one call
        owned = [p for p in group["params"] if id(p) in full]
        matrices = [full[id(p)][: p.numel()].view_as(p) for p in owned]
        ortho = newton_schulz_by_shape(matrices, group["ns_steps"], dtype=self.ns_dtype)
        updates = {
            id(p): self.slots[id(p)].padded((o * muon_scale(p.shape)).to(p.dtype))
            for p, o in zip(owned, ortho)
        }
        for p in group["params"]:  # 3. scatter the update shards; update the weight shard
            slot = self.slots[id(p)]
            if slot.n == 1:
                mine = updates[id(p)]
            else:
                mine = p.new_empty(slot.shard_len)
                chunks = list(updates[id(p)].chunk(slot.n)) if slot.rank == slot.owner else None
                COMM.add(
                    "scatter", mine.numel() * mine.element_size() * (slot.n - 1) * (slot.rank == slot.owner)
                )
                dist.scatter(mine, chunks, group_src=slot.owner, group=slot.group)
            w = self._param_shard(p)
            w.mul_(1 - lr * wd).add_(mine, alpha=-lr)

    def _adamw_group(self, group: dict, grads: dict) -> None:
        lr, wd, (beta1, beta2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        for p in group["params"]:
            slot, state = self.slots[id(p)], self.state[p]
            g = grads[id(p)]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = p.new_zeros(slot.shard_len)
                state["exp_avg_sq"] = p.new_zeros(slot.shard_len)
            state["step"] += 1
            t = state["step"]
            state["exp_avg"].lerp_(g, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(eps)
            w = self._param_shard(p)
            w.mul_(1 - lr * wd).addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))

    # ------------------------------------------------------------------ full (unsharded) state
    def full_state(self) -> dict[str, dict[str, torch.Tensor | int]]:
        """Parameter name -> its optimizer state as full tensors of the parameter's (local) shape,
        gathered over the parameter's group; the same on every rank of the group."""
        out = {}
        for group in self.param_groups:
            for p in group["params"]:
                slot, state = self.slots[id(p)], self.state[p]
                entry: dict[str, torch.Tensor | int] = {}
                for key, value in state.items():
                    if key == "param_shard":
                        continue
                    if isinstance(value, torch.Tensor):
                        full = value.new_empty(slot.shard_len * slot.n)
                        all_gather(full, value, slot.group)
                        entry[key] = full[: p.numel()].view_as(p).clone()
                    else:
                        entry[key] = value
                out[slot.name] = entry
        return out

    def load_full_state(self, full: dict[str, dict[str, torch.Tensor | int]]) -> None:
        """Inverse of `full_state`: keep this rank's shard of each tensor (shapes must be local)."""
        for group in self.param_groups:
            for p in group["params"]:
                slot = self.slots[id(p)]
                if slot.name not in full:
                    continue
                state = self.state[p]
                state.clear()
                for key, value in full[slot.name].items():
                    if isinstance(value, torch.Tensor):
                        if value.shape != p.shape:
                            raise ValueError(
                                f"optimizer state {slot.name}.{key}: shape {tuple(value.shape)}, "
                                f"parameter {tuple(p.shape)}"
                            )
                        state[key] = slot.local(value.to(device=p.device, dtype=p.dtype))
                    else:
                        state[key] = value
