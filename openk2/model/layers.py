"""The small building blocks every other model module uses: RMSNorm, the SwiGLU feed-forward, a
float32 softmax and `linear`. The training forward and the latent-cache decode both run these."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except that a single row under torch.compile is written as a matrix-vector product,
    which inductor turns into its own vectorised loop (a (1, K) matmul stays a library call)."""
    if torch.compiler.is_compiling() and x.numel() == x.shape[-1]:
        y = (weight @ x.reshape(-1)).view(*x.shape[:-1], -1)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, computed in float32 and returned in the scores' dtype."""
    if scores.dtype == torch.float32:
        return scores.softmax(dim=-1)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as the reference does."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one kernel, nothing to cast
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu_ffn(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with weights (hidden, dim), (hidden, dim), (dim, hidden): the dense
    MLP, the shared expert and each routed expert."""
    return linear(swiglu(linear(x, w_gate), linear(x, w_up)), w_down)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used for dense layers and the shared expert."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu_ffn(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
