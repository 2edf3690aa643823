"""Put a model on a mesh: expert sharding, pipeline cutting, gradient and statistics reduction.

`ParallelModel` is what a training loop holds instead of the model:

    pm = ParallelModel(model, mesh)
    loss = pm.forward_backward(input_ids, targets)   # the global batch; each rank takes its rows
    pm.sync_grads()                                   # or let DistributedMuon do it (ZeRO-1)
    pm.reduce_stats()                                 # max logits / expert counts as one process sees them

Gradient scaling. The loss is the mean over the global batch, i.e. the average of the dp x ep ranks'
local means. A replicated parameter's gradient is therefore the sum over the batch group divided by
dp x ep. An expert shard already receives, through the all-to-all, the gradient of every ep peer's
tokens, so it is summed over its dp replicas only -- but still divided by dp x ep.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from openk2.distributed.expert_parallel import is_expert_param, shard_experts
from openk2.distributed.mesh import Mesh, all_reduce_
from openk2.distributed.pipeline import Pipeline
from openk2.model.mla import MLA
from openk2.model.moe import MoE
from openk2.model.transformer import Transformer


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class ParallelModel:
    def __init__(self, model: Transformer, mesh: Mesh, with_aux_loss: bool = True):
        self.mesh = mesh
        self.config = model.config
        self.with_aux_loss = with_aux_loss
        model.record_stats(True)
        if mesh.parallel.pp > 1:
            device = next(model.parameters()).device
            self.pipeline = Pipeline(model, mesh, lm_loss, device=device, with_aux_loss=with_aux_loss)
            self.chunks = self.pipeline.chunks
        else:
            self.pipeline, self.chunks = None, [model]
        for ch in self.chunks:
            shard_experts(ch, mesh)
        self._stats_hooks()

    # ------------------------------------------------------------------ parameters
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Global names (`layers.5.mlp.experts.up_proj` is the local expert slice under ep)."""
        seen = set()
        for ch in self.chunks:
            for name, p in ch.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield name, p

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def modules(self) -> Iterator[nn.Module]:
        for ch in self.chunks:
            yield from ch.modules()

    def reduction_group(self, name: str):
        """The ranks that hold the same copy of parameter `name` and must agree on its gradient."""
        return self.mesh.dp_group if is_expert_param(name) else self.mesh.batch_group

    def train(self, mode: bool = True) -> None:
        for ch in self.chunks:
            ch.train(mode)

    # ------------------------------------------------------------------ one step
    def forward_backward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of the global batch (B, S) -> the same scalar on every rank; gradients accumulated."""
        x, y = self.mesh.local_batch(input_ids), self.mesh.local_batch(targets)
        self.reset_stats()
        if self.pipeline is None:
            model = self.chunks[0]
            loss = lm_loss(model(x), y)
            total = loss + model.aux_loss() if self.with_aux_loss else loss
            total.backward()
            loss = loss.detach()
        else:
            loss = self.pipeline.step(x, y)
            if loss is None:
                loss = torch.zeros((), device=x.device)
            all_reduce_(loss, self.mesh.pp_group)  # only the last stage had it
        all_reduce_(loss, self.mesh.batch_group)
        return loss / self.mesh.batch_size

    def sync_grads(self) -> None:
        """Plain data-parallel gradient reduction (the non-ZeRO path); see the module docstring."""
        n = self.mesh.batch_size
        for name, p in self.named_parameters():
            if p.grad is None:  # an expert shard that received no tokens on this rank
                p.grad = torch.zeros_like(p)
            all_reduce_(p.grad, self.reduction_group(name))
            if n > 1:
                p.grad.div_(n)

    # ------------------------------------------------------------------ statistics
    def _stats_hooks(self) -> None:
        """Accumulate over micro-batches: max logits by max, expert counts by sum."""
        self._max: dict[int, torch.Tensor] = {}
        self._counts: dict[int, torch.Tensor] = {}
        for ch in self.chunks:
            for i, blk in ch.layers.items():
                blk.self_attn.register_forward_hook(self._on_attn(int(i)))
                if isinstance(blk.mlp, MoE):
                    blk.mlp.register_forward_hook(self._on_moe(int(i)))

    def _on_attn(self, layer: int):
        def hook(mod: MLA, args, out):
            if mod.max_logits is not None:
                prev = self._max.get(layer)
                self._max[layer] = mod.max_logits if prev is None else torch.maximum(prev, mod.max_logits)

        return hook

    def _on_moe(self, layer: int):
        def hook(mod: MoE, args, out):
            prev = self._counts.get(layer)
            self._counts[layer] = mod.expert_counts if prev is None else prev + mod.expert_counts

        return hook

    def reset_stats(self) -> None:
        """Start a step's statistics (forward_backward does it; a loop accumulating several
        forward/backward passes into one step calls it once)."""
        self._max.clear()
        self._counts.clear()

    def reduce_stats(self) -> None:
        """Write the whole global batch's statistics back into the modules, identically on every rank
        of a stage, so QK-Clip and the load-balancing bias update act the same everywhere."""
        for ch in self.chunks:
            for i, blk in ch.layers.items():
                layer = int(i)
                if layer in self._max:
                    blk.self_attn.max_logits = all_reduce_(
                        self._max[layer].clone(), self.mesh.batch_group, dist.ReduceOp.MAX
                    )
                if layer in self._counts:
                    blk.mlp.expert_counts = all_reduce_(self._counts[layer].clone(), self.mesh.batch_group)
