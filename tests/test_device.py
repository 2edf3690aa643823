"""Device selection: `auto` picks CUDA only where it exists, a missing device is a one-line error,
torchrun's LOCAL_RANK picks the GPU, and the collective backend follows the device."""

from __future__ import annotations

import pytest
import torch

from openk2.distributed.device import DeviceError, collective_backend, resolve_device


def test_auto_is_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert collective_backend(resolve_device("auto")) == "gloo"


def test_missing_cuda_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError) as e:
        resolve_device("cuda")
    assert "\n" not in str(e.value) and "--device cpu" in str(e.value)


def test_local_rank_picks_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    device = resolve_device("auto")
    assert device == torch.device("cuda", 3) and collective_backend(device) == "nccl"
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="GPU 5 requested, 4 visible"):
        resolve_device("cuda:5")


def test_unknown_device_is_a_clear_error():
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("gpu0")
