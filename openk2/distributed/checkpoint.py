"""Training checkpoints that do not depend on the parallel layout.

Design: gather to full tensors on save, reshard on load. Every tensor is stored under its global name
(`layers.5.mlp.experts.up_proj`) with its full, unsharded shape: expert slices are all-gathered over
the ep group, ZeRO-1 optimizer shards over their dp group. One rank per pipeline stage (dp = ep = 0)
writes `stage-{k}.pt` holding that stage's layers; rank 0 writes `meta.json`. Loading reads every
stage file (memory-mapped), and each rank keeps what its layout gives it: its layers, its expert
slice (a dim-0 slice of the stacked experts), its optimizer shard. So a run saved with ep=2 or pp=2
resumes with ep=1, pp=4 or one process, and vice versa.

The price is that a stage's full tensors pass through one process at save time; at K2 scale one
would write each rank's shard with `torch.distributed.checkpoint` instead (same idea, resharded by
DCP's planner). `export_hf` turns a training checkpoint into the single Hugging Face layout.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from openk2.checkpoint import save_model
from openk2.config import ModelConfig
from openk2.distributed.dist_muon import DistributedMuon
from openk2.distributed.expert_parallel import is_expert_param
from openk2.distributed.mesh import COMM, group_size
from openk2.distributed.parallelize import ParallelModel

META = "meta.json"


def _gather_experts(t: torch.Tensor, pm: ParallelModel) -> torch.Tensor:
    """Concatenate the ep ranks' expert slices (dim 0) into the full stacked tensor."""
    g = pm.mesh.ep_group
    n = group_size(g)
    if n == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(n)]
    COMM.add("all_gather", t.numel() * t.element_size() * (n - 1))
    dist.all_gather(parts, t.contiguous(), group=g)
    return torch.cat(parts)


def _expert_slice(t: torch.Tensor, pm: ParallelModel) -> torch.Tensor:
    ep = pm.mesh.parallel.ep
    n = t.shape[0] // ep
    return t[pm.mesh.ep_rank * n : (pm.mesh.ep_rank + 1) * n]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def gather_stage(
    pm: ParallelModel, opt: DistributedMuon | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """This pipeline stage's model tensors and optimizer state (by parameter name) as full tensors:
    expert slices gathered over ep, ZeRO-1 shards over their group. Collective over the stage."""
    model: dict[str, torch.Tensor] = {}
    for ch in pm.chunks:
        for name, t in ch.state_dict().items():
            model[name] = _gather_experts(t, pm) if is_expert_param(name) else t.clone()
    optim: dict[str, dict] = {}
    if opt is not None:
        for name, state in opt.full_state().items():
            optim[name] = {
                k: _gather_experts(v, pm) if is_expert_param(name) and isinstance(v, torch.Tensor) else v
                for k, v in state.items()
            }
    return model, optim


@torch.no_grad()
def save(path: str | os.PathLike, pm: ParallelModel, opt: DistributedMuon | None = None, **meta) -> None:
    """Write a layout-independent checkpoint; `meta` (step, data position, ...) goes to meta.json.
    Collective: every rank must call it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mesh = pm.mesh
    model, optim = gather_stage(pm, opt)
    if mesh.dp_rank == 0 and mesh.ep_rank == 0:
        tmp = path / f"stage-{mesh.pp_rank}.pt.tmp"
        torch.save({"model": model, "optim": optim}, tmp)
        os.replace(tmp, path / f"stage-{mesh.pp_rank}.pt")  # no half-written file under the real name
    if mesh.rank == 0:
        p = mesh.parallel
        info = dict(meta, layout=dict(pp=p.pp, dp=p.dp, ep=p.ep, virtual_stages=p.virtual_stages))
        info["config"] = pm.config.to_hf_dict()
        (path / META).write_text(json.dumps(info, indent=2) + "\n")
    _barrier()


def read_full(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict]:
    """(model tensors, optimizer state, meta) of a checkpoint, merged over its stage files."""
    path = Path(path)
    if not (path / META).exists():
        raise FileNotFoundError(f"{path}: no {META}; not an openk2 distributed checkpoint")
    meta = json.loads((path / META).read_text())
    files = sorted(glob.glob(str(path / "stage-*.pt")))
    expected = meta["layout"]["pp"]
    if len(files) != expected:
        raise FileNotFoundError(f"{path}: expected {expected} stage files, found {len(files)}")
    model, optim = {}, {}
    for f in files:
        blob = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        model.update(blob["model"])
        optim.update(blob["optim"])
    return model, optim, meta


@torch.no_grad()
def load(path: str | os.PathLike, pm: ParallelModel, opt: DistributedMuon | None = None) -> dict:
    """Load a checkpoint saved under any layout into this rank's share; returns its meta."""
    model, optim, meta = read_full(path)
    load_full(pm, opt, model, optim, str(path))
    return meta


@torch.no_grad()
def load_full(
    pm: ParallelModel,
    opt: DistributedMuon | None,
    model: dict[str, torch.Tensor],
    optim: dict[str, dict],
    path: str = "checkpoint",
) -> None:
    """Copy full (unsharded, globally named) model tensors and optimizer state into this rank's share:
    its layers, its expert slice, its ZeRO-1 optimizer shard. `path` only names the source in errors."""
    for ch in pm.chunks:
        own = ch.state_dict()
        missing = [n for n in own if n not in model]
        if missing:
            raise KeyError(f"{path}: checkpoint lacks {missing[:3]}{'...' if len(missing) > 3 else ''}")
        for name, t in own.items():
            src = _expert_slice(model[name], pm) if is_expert_param(name) else model[name]
            if src.shape != t.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(src.shape)}, the model {tuple(t.shape)}")
            t.copy_(src)
    if opt is not None and optim:
        local = {}
        for name, _ in pm.named_parameters():
            if name in optim:
                local[name] = {
                    k: _expert_slice(v, pm) if is_expert_param(name) and isinstance(v, torch.Tensor) else v
                    for k, v in optim[name].items()
                }
        opt.load_full_state(local)


def export_hf(path: str | os.PathLike, out: str | os.PathLike) -> None:
    """Write a training checkpoint as one Hugging Face-layout model (per-expert keys, config.json)."""
    from openk2.model.transformer import Transformer

    model_sd, _, meta = read_full(path)
    config = ModelConfig.from_dict(meta["config"])
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.load_state_dict(model_sd)
    model.rotary.reset_parameters(config)
    save_model(model, out)
