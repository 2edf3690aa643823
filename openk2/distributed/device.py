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


def autocast_context(device: torch.device, precision: str = "auto"):
    """The context a training or evaluation forward runs in: bf16 autocast (fp32 weights and
    optimizer, bf16 matmuls) for `bf16`, and for `auto` on CUDA; nothing for `fp32`, or `auto` on
    other devices (CPU bf16 matmuls are slower than fp32 on most CPUs). One rule for every trainer."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
