"""Training checkpoints of a parallel layout: sharded with `torch.distributed.checkpoint`, or full.

Sharded (`save_shards` / `load_shards`, the format of `openk2.checkpoint.sharded`). Every rank writes
only what it holds and reads only what it needs; nothing is gathered. The DCP keys name global,
layout-independent tensors, and each rank declares which rectangular piece of each it owns:

* a replicated tensor (attention, dense MLPs, router, embeddings) is written whole; DCP's planner
  keeps one copy of the identical pieces the dp x ep ranks of a stage declare;
* an expert stack (E, out, in) is written by each ep rank as its dim-0 slice (again deduplicated
  over dp);
* ZeRO-1 optimizer state is a contiguous slice of the parameter's flattened state: rank i of a group
  of n owns elements [i * L, (i + 1) * L) with L = ceil(numel / n) (`DistributedMuon`'s slots), and
  an expert parameter's flat vector starts at its ep slice's offset in the flattened full stack.

Loading declares the pieces this rank's layout needs and DCP reads them from whatever pieces were
written, so a checkpoint saved with ep=2 loads with pp=2, dp=2 or in one process
(`openk2.checkpoint.sharded` assembles full tensors there), and the other way round.

Full (`gather_stage` / `load_full`): full tensors gathered to one rank per stage, for the single-
process checkpoint format that `openk2 train` writes by default (servable as is).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from openk2.checkpoint import save_model
from openk2.checkpoint.sharded import (
    SHARDED_DIR,
    is_sharded,
    model_key,
    optim_key,
    read_model_state,
    read_optimizer_state,
)
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


# ---------------------------------------------------------------------------------------------- sharded (DCP)
class Piece:
    """This rank's piece of a global tensor for DCP: `local` sits at `offsets` in a tensor of `shape`.
    Implements the checkpointable protocol DCP's planners ask of sharded values; `local` is a view
    of the live storage, so a load writes straight into the parameter or optimizer buffer."""

    def __init__(self, local: torch.Tensor, offsets: tuple[int, ...], shape: tuple[int, ...]):
        self.local, self.offsets, self.shape = local, torch.Size(offsets), torch.Size(shape)

    def _chunk(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=self.offsets, sizes=self.local.shape)

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:
        props = TensorProperties.create_from_tensor(self.local)
        data = TensorWriteData(chunk=self._chunk(), properties=props, size=self.shape)
        return [WriteItem(index=MetadataIndex(fqn, self.offsets), type=WriteItemType.SHARD, tensor_data=data)]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [self._chunk()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.local


class _SavePlanner(DefaultSavePlanner):
    def lookup_object(self, index: MetadataIndex):
        obj = self.state_dict[index.fqn]
        return obj.local if isinstance(obj, Piece) else super().lookup_object(index)


class _LoadPlanner(DefaultLoadPlanner):
    def set_up_planner(self, state_dict: dict, metadata=None, is_coordinator: bool = False) -> None:
        # the base class maps values it does not know (torch's own tensor types) to None: keep ours
        pieces = {k: v for k, v in state_dict.items() if isinstance(v, Piece)}
        super().set_up_planner(state_dict, metadata, is_coordinator)
        state_dict.update(pieces)
        self.state_dict.update(pieces)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict[index.fqn]
        return obj.local if isinstance(obj, Piece) else super().lookup_tensor(index)


def _flat_piece(pm: ParallelModel, opt: DistributedMuon, p: torch.Tensor, t: torch.Tensor) -> Piece | None:
    """The valid (unpadded) part of this rank's ZeRO-1 shard `t` of parameter `p`, placed in the
    parameter's flattened global state; None when this rank's shard is all padding."""
    slot = opt.slots[id(p)]
    n_local = p.numel()
    valid = max(0, min(slot.shard_len, n_local - slot.start))
    if valid == 0:
        return None
    offset, total = slot.start, n_local
    if is_expert_param(slot.name):  # the flat local stack is one ep slice of the flat full stack
        offset += pm.mesh.ep_rank * n_local
        total *= pm.mesh.parallel.ep
    return Piece(t[:valid], (offset,), (total,))


def _rank_state(pm: ParallelModel, opt: DistributedMuon | None, for_load: bool) -> dict:
    """DCP state dict of this rank: its model tensors and optimizer shards under global keys. For a
    load, optimizer buffers missing so far are allocated (and filled by the load)."""
    mesh = pm.mesh
    state: dict = {}
    for ch in pm.chunks:
        for name, t in ch.state_dict().items():
            if is_expert_param(name) and mesh.parallel.ep > 1:
                n = t.shape[0]
                full = (n * mesh.parallel.ep, *t.shape[1:])
                state[model_key(name)] = Piece(t, (mesh.ep_rank * n,) + (0,) * (t.ndim - 1), full)
            else:
                state[model_key(name)] = t
    if opt is None:
        return state
    for group in opt.param_groups:
        for p in group["params"]:
            slot, st = opt.slots[id(p)], opt.state[p]
            if for_load and not any(k != "param_shard" for k in st):
                keys = ("momentum_buffer",) if group["use_muon"] else ("exp_avg", "exp_avg_sq")
                for key in keys:
                    st[key] = p.new_zeros(slot.shard_len)
                if not group["use_muon"]:
                    st["step"] = 0
            for key, value in st.items():
                if key == "param_shard":
                    continue
                if key == "step":
                    state[optim_key(slot.name, key)] = torch.tensor(int(value), dtype=torch.int64)
                    continue
                piece = _flat_piece(pm, opt, p, value)
                if piece is not None:
                    state[optim_key(slot.name, key)] = piece
    return state


@contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns that it assumes one process when there is no process group: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


@torch.no_grad()
def save_shards(directory: str | os.PathLike, pm: ParallelModel, opt: DistributedMuon | None = None) -> Path:
    """Write this layout's model and optimizer state into `directory/dcp`, each rank its own share
    (one file per rank, `.metadata` by rank 0 once all are written). Collective."""
    out = Path(directory) / SHARDED_DIR
    state = _rank_state(pm, opt, for_load=False)
    with _quiet():
        dcp.save(state, checkpoint_id=str(out), planner=_SavePlanner(), no_dist=not dist.is_initialized())
    return out


@torch.no_grad()
def load_shards(directory: str | os.PathLike, pm: ParallelModel, opt: DistributedMuon | None = None) -> None:
    """Read this rank's share of a sharded checkpoint saved under any layout: its layers, expert
    slice and ZeRO-1 optimizer shards. Collective."""
    if not is_sharded(directory):
        raise FileNotFoundError(f"{directory}: no {SHARDED_DIR}/.metadata; not a sharded checkpoint")
    state = _rank_state(pm, opt, for_load=True)
    with _quiet():
        dcp.load(state, checkpoint_id=str(Path(directory) / SHARDED_DIR), planner=_LoadPlanner(),
                 no_dist=not dist.is_initialized())  # fmt: skip
    if opt is not None:
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state[p]
                if "step" in st:
                    st["step"] = int(state[optim_key(opt.slots[id(p)].name, "step")])
                if "param_shard" in st:  # refreshed from the loaded weights at the next step
                    del st["param_shard"]


@torch.no_grad()
def save(path: str | os.PathLike, pm: ParallelModel, opt: DistributedMuon | None = None, **meta) -> None:
    """A standalone sharded checkpoint: `save_shards` plus `meta.json` (`meta`, the layout and the
    model config) from rank 0. Collective."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_shards(path, pm, opt)
    if pm.mesh.rank == 0:
        p = pm.mesh.parallel
        info = dict(meta, layout=dict(pp=p.pp, dp=p.dp, ep=p.ep, virtual_stages=p.virtual_stages))
        info["config"] = pm.config.to_hf_dict()
        (path / META).write_text(json.dumps(info, indent=2) + "\n")
    _barrier()


def read_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not (path / META).exists():
        raise FileNotFoundError(f"{path}: no {META}; not an openk2 distributed checkpoint")
    return json.loads((path / META).read_text())


def read_full(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict]:
    """(full model tensors, optimizer state as flat full tensors, meta) of a standalone checkpoint,
    assembled in this process."""
    meta = read_meta(path)
    return read_model_state(path), read_optimizer_state(path), meta


@torch.no_grad()
def load(path: str | os.PathLike, pm: ParallelModel, opt: DistributedMuon | None = None) -> dict:
    """Load a standalone checkpoint saved under any layout into this rank's share; returns its meta."""
    meta = read_meta(path)
    load_shards(path, pm, opt)
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
    """Write a standalone checkpoint as one Hugging Face-layout model (per-expert keys, config.json)."""
    from openk2.model.transformer import Transformer

    meta = read_meta(path)
    model_sd = read_model_state(path)
    config = ModelConfig.from_dict(meta["config"])
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.load_state_dict(model_sd)
    model.rotary.reset_parameters(config)
    save_model(model, out)
