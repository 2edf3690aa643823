"""Activation-memory options of K2's training (tech report, section 4), each switchable.

* recompute: keep only the inputs of cheap-but-wide pieces and recompute them in the backward
  (torch.utils.checkpoint, non-reentrant): every RMSNorm, every SwiGLU MLP (dense layers and shared
  experts; the routed experts recompute their SwiGLU from its inputs when FP8 storage is on) and the
  MLA block, whose up-projections expand a 576-wide latent into per-head keys, values and a score
  matrix: only the block's input is stored, everything inside is recomputed.
* fp8_activations: the routed experts save their up-projection input and their SwiGLU inputs
  (gate and up outputs) as float8 e4m3 with one fp32 scale per 1x128 tile, instead of bf16/fp32,
  and rebuild the SwiGLU output from them in the backward (`fp8_expert_ffn`).
* offload: every tensor autograd saves in the forward is moved to pinned CPU memory on a side CUDA
  stream (overlapping the copy with compute) and brought back when the backward needs it. On a CPU
  device activations already live in host memory, so this is a no-op there.

`benchmarks/bench_memory.py` measures peak memory and step time with each on and off.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
TILE = 128


@dataclass
class MemoryOptions:
    recompute: bool = False
    fp8_activations: bool = False
    offload: bool = False


# ---------------------------------------------------------------------------------------------------
# FP8 (e4m3, 1x128 tiles) storage


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """x (..., n) -> e4m3 tiles (..., ceil(n/128), 128), fp32 scales (..., ceil(n/128), 1), n."""
    n = x.shape[-1]
    pad = (-n) % TILE
    t = F.pad(x.float(), (0, pad)).unflatten(-1, (-1, TILE))
    scale = t.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return (t / scale).to(FP8_DTYPE), scale, n


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).flatten(-2)[..., :n].to(dtype)


class _Fp8ExpertFFN(torch.autograd.Function):
    """y = down(silu(x Wg^T) * (x Wu^T)) saving x, x Wg^T and x Wu^T in FP8 (and the weights)."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down):
        g, u = x @ w_gate.T, x @ w_up.T
        y = (F.silu(g) * u) @ w_down.T
        ctx.dtype = x.dtype
        ctx.fp8 = (quantize_fp8(x), quantize_fp8(g), quantize_fp8(u))
        ctx.save_for_backward(w_gate, w_up, w_down)
        return y

    @staticmethod
    def backward(ctx, dy):
        w_gate, w_up, w_down = ctx.saved_tensors
        x, g, u = (dequantize_fp8(*t, ctx.dtype) for t in ctx.fp8)
        ctx.fp8 = None
        sg = torch.sigmoid(g)
        silu = g * sg
        h = silu * u
        dh = dy @ w_down
        dg = dh * u * (sg * (1 + g * (1 - sg)))
        du = dh * silu
        dx = dg @ w_gate + du @ w_up
        return dx, dg.T @ x, du.T @ x, dy.T @ h


def fp8_expert_ffn(x, w_gate, w_up, w_down) -> torch.Tensor:
    """`swiglu_ffn` that saves its activations in FP8; installed as `Experts.training_ffn`."""
    return _Fp8ExpertFFN.apply(x, w_gate, w_up, w_down)


# ---------------------------------------------------------------------------------------------------
# Offload of saved activations


class _Offload(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors -> pinned host memory on a side stream; back to the device on use."""

    def __init__(self, min_bytes: int = 1 << 16):
        self.stream = torch.cuda.Stream()

        def pack(t: torch.Tensor):
            if not t.is_cuda or t.numel() * t.element_size() < min_bytes:
                return t
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)  # keep t's memory alive until the copy finished
            return (t.device, host, self.stream.record_event())

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, host, event = packed
            torch.cuda.current_stream().wait_event(event)
            return host.to(device, non_blocking=True)

        super().__init__(pack, unpack)


def activation_context(opts: MemoryOptions, device: torch.device):
    """The context a training forward runs in (offload hooks, or nothing)."""
    if opts.offload and device.type == "cuda":
        return _Offload()
    return nullcontext()


# ---------------------------------------------------------------------------------------------------
# Switching the options on a model


def _checkpointed(forward):
    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    wrapper.__wrapped_forward__ = forward
    return wrapper


def _set_recompute(module: nn.Module, enabled: bool) -> None:
    original = getattr(module.forward, "__wrapped_forward__", None)
    if enabled and original is None:
        module.forward = _checkpointed(module.forward)
    elif not enabled and original is not None:
        module.forward = original


def apply_memory_options(model: nn.Module, opts: MemoryOptions) -> None:
    """Switch recomputation and FP8 activation storage on or off on every relevant module."""
    from openk2.model.layers import MLP, RMSNorm
    from openk2.model.mla import MLA
    from openk2.model.moe import Experts

    for m in model.modules():
        if isinstance(m, (RMSNorm, MLP)):
            _set_recompute(m, opts.recompute)
        elif isinstance(m, MLA):
            _set_recompute(m, opts.recompute)
        elif isinstance(m, Experts):
            m.training_ffn = fp8_expert_ffn if opts.fp8_activations else None
