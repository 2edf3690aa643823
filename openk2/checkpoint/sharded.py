"""The sharded checkpoint format: every rank writes its own share with `torch.distributed.checkpoint`.

A sharded training checkpoint is an ordinary run checkpoint directory (config.json, tokenizer,
trainer_state.pt without the optimizer, manifest.json; see `openk2.checkpoint.store`) whose weights
and optimizer state live in a DCP directory `dcp/` instead of safetensors. The DCP keys are
layout-independent, so any parallel layout (or one process) can read any part of it:

* `model/<name>` -- a model tensor under its global name and full shape (`layers.5.mlp.experts.up_proj`
  is the whole (E, out, in) stack; an expert-parallel rank writes its dim-0 slice);
* `optim/<name>/<key>` -- optimizer state of parameter `<name>` flattened to one dimension
  (`momentum_buffer`, `exp_avg`, `exp_avg_sq`; a ZeRO-1 rank writes its contiguous slice) and
  `optim/<name>/step`, a 0-d int64 tensor.

This module reads the format in one process (no process group): the full model state for loading,
serving and `openk2 export`, and the optimizer state for a one-process resume. Writing it, and reading
it back into a sharded layout, is `openk2.distributed.checkpoint`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

SHARDED_DIR = "dcp"
MODEL_PREFIX = "model/"
OPTIM_PREFIX = "optim/"


def is_sharded(path: str | os.PathLike) -> bool:
    """True for a checkpoint whose weights are in the DCP format (a complete `dcp/` directory)."""
    return (Path(path) / SHARDED_DIR / ".metadata").is_file()


def model_key(name: str) -> str:
    return MODEL_PREFIX + name


def optim_key(name: str, key: str) -> str:
    return f"{OPTIM_PREFIX}{name}/{key}"


def read_tensors(path: str | os.PathLike, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint whose key starts with `prefix`, as full tensors (key
    without the prefix), assembled in this process from all ranks' files."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from openk2.checkpoint.hf import CheckpointError

    reader = dcp.FileSystemReader(str(Path(path) / SHARDED_DIR))
    try:
        metadata = reader.read_metadata().state_dict_metadata
    except Exception as e:  # a missing or damaged .metadata file
        raise CheckpointError(f"{path}: unreadable sharded checkpoint ({e})") from e
    state = {
        key: torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in metadata.items()
        if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)
    }
    if state:
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
                warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
                dcp.load(state, storage_reader=reader, no_dist=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read the sharded checkpoint ({e})") from e
    return {key[len(prefix) :]: t for key, t in state.items()}


def read_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full model state dict (global names, full shapes) of a sharded checkpoint."""
    return read_tensors(path, MODEL_PREFIX)


@torch.no_grad()
def load_model_state_(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Copy a sharded checkpoint's weights and buffers into a full model, in place."""
    from openk2.checkpoint.hf import CheckpointError

    saved = read_model_state(path)
    for name, target in model.state_dict().items():
        if name not in saved:
            raise CheckpointError(f"{path}: the sharded checkpoint lacks {name}")
        if saved[name].shape != target.shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(saved[name].shape)}, "
                                  f"the model expects {tuple(target.shape)}")  # fmt: skip
        target.copy_(saved[name])


def read_optimizer_state(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Parameter name -> {state key: flat full tensor, "step": 0-d tensor} of a sharded checkpoint."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in read_tensors(path, OPTIM_PREFIX).items():
        name, _, entry = key.rpartition("/")
        out.setdefault(name, {})[entry] = t
    return out


@torch.no_grad()
def load_optimizer_state_(optimizer: torch.optim.Optimizer, model: torch.nn.Module, path) -> None:
    """Fill a one-process optimizer (MuonClip, or torch's AdamW) from a sharded checkpoint: each
    parameter's flat state reshaped to the parameter, `step` as the optimizer keeps it."""
    from openk2.checkpoint.hf import CheckpointError

    saved = read_optimizer_state(path)
    float_step = isinstance(optimizer, torch.optim.AdamW)  # torch's AdamW keeps a float tensor
    for name, p in model.named_parameters():
        if name not in saved:
            continue
        state = optimizer.state[p]
        state.clear()
        for key, t in saved[name].items():
            if key == "step":
                state[key] = torch.tensor(float(t)) if float_step else int(t)
            elif t.numel() != p.numel():
                raise CheckpointError(f"{path}: optimizer state {name}.{key} has {t.numel()} values, "
                                      f"the parameter {p.numel()}")  # fmt: skip
            else:
                state[key] = t.view_as(p).to(device=p.device, dtype=p.dtype)
