"""Which device a process computes on and which collective backend joins the processes.

One rule for every entry point (one process or torchrun, training or serving): `auto` means the
local CUDA GPU when there is one and the CPU otherwise; under torchrun each process takes the GPU
numbered by its LOCAL_RANK. CUDA tensors are joined by NCCL and CPU tensors by gloo, so the same code
runs the meshes, expert parallelism, the pipeline and ZeRO-1 Muon on either. Asking for a device the
machine does not have is a `DeviceError` with one line that says what is missing.
"""

from __future__ import annotations

import os
import platform
from contextlib import nullcontext
from functools import cache
from pathlib import Path

import torch


class DeviceError(RuntimeError):
    """A requested device that this machine or this torch build cannot provide."""


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """`auto`, `cpu`, `cuda`, `cuda:N` or `mps` -> a usable torch.device, or a one-line DeviceError."""
    if local_rank is None and "LOCAL_RANK" in os.environ:
        local_rank = int(os.environ["LOCAL_RANK"])
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DeviceError(
                f"--device {name}: CUDA is not available ({why}; torch {torch.__version__}); use --device cpu"
            )
        count = torch.cuda.device_count()
        index = device.index if device.index is not None else (local_rank or 0)
        if index >= count:
            raise DeviceError(f"--device {name}: GPU {index} requested, {count} visible")
        device = torch.device("cuda", index)
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError(f"--device {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"--device {name}: unsupported device type {device.type!r}")
    return device


def collective_backend(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for everything else."""
    return "nccl" if device.type == "cuda" else "gloo"


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """The CPU's model name and its feature flags (from /proc/cpuinfo where there is one)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine(), platform.processor()):
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return name, flags


PRECISIONS = ("auto", "bf16", "fp32")
# CPU feature flags (/proc/cpuinfo) of units that multiply bf16 natively; without them torch emulates
# bf16 matmuls in fp32 arithmetic plus conversions, which is slower than plain fp32
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16(flags: set[str] | None = None) -> bool:
    """Whether the CPU (with these feature flags; default: this machine's) has bf16 matmul units."""
    if flags is None:
        return _this_cpu_has_bf16()
    return any(f in flags for f in BF16_CPU_FLAGS)


@cache
def _this_cpu_has_bf16() -> bool:  # read /proc/cpuinfo once, not at every forward
    return cpu_has_bf16(cpu_model_and_flags()[1])


def resolve_precision(device: torch.device, precision: str = "auto", flags: set[str] | None = None) -> str:
    """The precision a trainer computes in on `device`: "bf16" (bf16 autocast) or "fp32". `auto` is
    bf16 where the hardware multiplies bf16 natively -- a CUDA GPU, or a CPU with AVX512-BF16 or AMX
    (`cpu_has_bf16`; `flags` overrides this machine's, for tests) -- as K2 trains, and fp32 elsewhere
    (an AVX2-only CPU, MPS). An explicit `bf16` or `fp32` is taken as given; `bf16_emulated` says
    whether the choice will run slowly. The one rule every trainer and `openk2 env` use."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16(flags)):
        return "bf16"
    return "fp32"


def bf16_emulated(device: torch.device, precision: str, flags: set[str] | None = None) -> bool:
    """True when `precision` resolves to bf16 on a CPU without bf16 units (emulated: slower than fp32)."""
    resolved = resolve_precision(device, precision, flags)
    return resolved == "bf16" and device.type == "cpu" and not cpu_has_bf16(flags)


def autocast_context(device: torch.device, precision: str = "auto"):
    """The context a training or evaluation forward runs in: bf16 autocast (fp32 weights and
    optimizer, bf16 matmuls) when `resolve_precision` says bf16, nothing for fp32."""
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
