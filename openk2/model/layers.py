"""The small building blocks every other model module uses: RMSNorm, the SwiGLU feed-forward, a
float32 softmax and `linear`. The training forward and the latent-cache decode both run these."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

# The library behind `linear`'s float32 CPU matmuls: "mkl" (F.linear, torch's default: MKL's sgemm
# on x86) or "onednn" (oneDNN's fp32 kernels for the forward and both backward matmuls, faster than
# MKL on CPUs where MKL takes a generic path, e.g. AMD's). Set by the trainer (`--fp32-matmul`) or
# $OPENK2_FP32_MATMUL; bf16 (autocast) matmuls go to oneDNN either way. The model's only CPU switch.
FP32_MATMULS = ("mkl", "onednn")
FP32_MATMUL = os.environ.get("OPENK2_FP32_MATMUL", "mkl")


def _onednn_linear(x2: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x2 (M, K) @ w (N, K)^T on oneDNN's fp32 kernel."""
    return torch.ops.mkldnn._linear_pointwise(x2, w, None, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T (+ b) with the forward and both gradient matmuls on oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        y = _onednn_linear(x2, weight)
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # dy W = dy (W^T)^T
            dx = _onednn_linear(dy2, weight.t().contiguous()).view(*dy.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:  # dy^T x
            dw = _onednn_linear(dy2.t().contiguous(), x2.t().contiguous())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        FP32_MATMUL == "onednn"
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and x.numel() > x.shape[-1]  # a single row (decode) stays a library matrix-vector product
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except that a single row under torch.compile is written as a matrix-vector product,
    which inductor turns into its own vectorised loop (a (1, K) matmul stays a library call), and
    that float32 CPU matmuls take oneDNN when `FP32_MATMUL` says so."""
    if torch.compiler.is_compiling() and x.numel() == x.shape[-1]:
        y = (weight @ x.reshape(-1)).view(*x.shape[:-1], -1)
        return y if bias is None else y + bias
    if _use_onednn(x, weight):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


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
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu_ffn(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
