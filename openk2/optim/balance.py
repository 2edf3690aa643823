"""Aux-loss-free load balancing (DeepSeek-V3, used by K2).

Each MoE router adds a per-expert bias b_e to the affinity scores when it *selects* experts (never
when it weights their outputs). After every optimizer step the bias moves by a fixed amount toward
balance: experts that received more than the mean number of tokens in that step get b_e -= rate, the
under-loaded ones b_e += rate. Since the step is fixed-size (sign, not proportional), the bias cannot
blow up on a noisy batch, and because the bias only affects selection, the language-model gradient is
untouched. A tiny sequence-wise auxiliary loss (`aux_loss_alpha`, computed in `model.moe`) only
guards against extreme imbalance inside single sequences.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_routing_bias_(
    model: nn.Module, counts: dict[int, torch.Tensor] | None = None, rate: float = 1e-3
) -> None:
    """Move every MoE layer's `e_score_correction_bias` by `rate` toward balance.

    counts: layer -> tokens routed to each expert (E,) summed over the step's micro-batches; by
    default the model's last forward (`model.expert_counts()`)."""
    if rate < 0:
        raise ValueError(f"bias update rate must be >= 0, got {rate}")
    counts = model.expert_counts() if counts is None else counts
    for layer, c in counts.items():
        bias = model.layers[str(layer)].mlp.gate.e_score_correction_bias
        c = c.to(device=bias.device, dtype=torch.float32)
        bias.add_(torch.sign(c.mean() - c), alpha=rate)


def load_imbalance(counts: dict[int, torch.Tensor]) -> float:
    """Max over layers of (most-loaded expert's tokens / mean tokens per expert); 1.0 is perfect
    balance, E / k means every token of a layer went to the same k experts."""
    worst = 1.0
    for c in counts.values():
        c = c.float()
        if c.sum() > 0:
            worst = max(worst, float(c.max() / c.mean()))
    return worst
