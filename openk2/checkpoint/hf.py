"""Read and write the Hugging Face layout of the released K2 checkpoint.

A checkpoint directory holds `config.json`, `model-0000i-of-0000N.safetensors` shards and
`model.safetensors.index.json` (tensor name -> shard). Names are exactly those of the real checkpoint:
`model.` + our module path, except the stacked expert tensors, which are split into one key per expert
(`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`). FP8 checkpoints hold e4m3 weights with a
`<name>_scale_inv` companion per 128x128 block; they are dequantised as they are read.

Loading never holds two copies of the weights: the model is built on the meta device, materialised
once on the target device, and each tensor is read (memory-mapped) and copied into its slot one at a
time. Anything that does not fit -- a missing shard, a truncated file, an unexpected or missing tensor,
a wrong shape -- raises `CheckpointError` naming the file and the tensor; there is no partial load.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from openk2.checkpoint.fp8 import FP8_DTYPE, dequantize_block_fp8, quantize_block_fp8
from openk2.config import ModelConfig
from openk2.model.moe import MoE
from openk2.model.transformer import Transformer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)$")
# Projection matrices stored in FP8 by the released checkpoint; everything else stays high precision.
_FP8_WEIGHT = re.compile(
    r"\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$"
)
# Tensors the released checkpoint keeps in float32 whatever the weights' dtype (the routing bias).
FP32_TENSOR_SUFFIXES = ("e_score_correction_bias",)
FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as a whole; the message names the file and tensor."""


# ---------------------------------------------------------------------------------------------- naming
def hf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor view) for every tensor the checkpoint stores, in model order."""
    tied = model.config.tie_word_embeddings
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        m = _EXPERT.match(name)
        if m:
            layer, proj = m.groups()
            first = model.layers[layer].mlp.experts.first
            for e in range(t.shape[0]):
                yield f"model.layers.{layer}.mlp.experts.{first + e}.{proj}.weight", t[e]
        elif name == "lm_head.weight":
            yield name, t
        else:
            yield "model." + name, t


def _is_ignored(key: str, config: ModelConfig) -> bool:
    """Tensors a checkpoint may hold that this model does not use: DeepSeek-V3's multi-token
    prediction layers (indices >= num_hidden_layers) and cached rotary tables."""
    m = re.match(r"^model\.layers\.(\d+)\.", key)
    if m and int(m.group(1)) >= config.num_hidden_layers:
        return True
    return key.endswith("rotary_emb.inv_freq")


# ---------------------------------------------------------------------------------------------- save
def save_pretrained(
    model: Transformer,
    path: str | os.PathLike,
    fp8: bool = False,
    max_shard_bytes: int = 4 << 30,
    rope_format: str = "legacy",
) -> None:
    """Write config.json, sharded safetensors and the index. With fp8=True the projection matrices are
    written as block-FP8 e4m3 plus `weight_scale_inv`, and the other tensors (router, norms,
    embeddings, LM head) in bfloat16, the dtype config.json then names; the routing bias stays
    float32, as in the released K2 checkpoint."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    extra = dict(config.extra)
    extra.pop("quantization_config", None)
    if fp8:
        extra["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    saved = ModelConfig(**{**config.__dict__, "extra": extra})
    saved.torch_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if fp8:
        saved.torch_dtype = "bfloat16"
    saved.save_pretrained(path, rope_format=rope_format)

    for stale in list(path.glob("model-*.safetensors")) + [path / SINGLE_FILE, path / INDEX_FILE]:
        stale.unlink(missing_ok=True)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    total = 0

    def add(key: str, t: torch.Tensor) -> None:
        nonlocal size, total
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            _flush(shards, path)
            shards.append({})
            size = 0
        shards[-1][key] = t.detach().to("cpu").clone()
        size += nbytes
        total += nbytes

    for key, t in hf_tensors(model):
        if fp8 and t.ndim == 2 and _FP8_WEIGHT.search(key):
            q, scale_inv = quantize_block_fp8(t.detach())
            add(key, q)
            add(key + "_scale_inv", scale_inv)
        elif fp8 and t.is_floating_point() and not key.endswith(FP32_TENSOR_SUFFIXES):
            add(key, t.to(torch.bfloat16))  # the dtype config.json names, as in the released weights
        else:
            add(key, t)
    _flush(shards, path)

    # Shards were written as model-0000i.tmp; now that N is known, give them their final names.
    n = len(shards)
    weight_map = {}
    for i in range(n):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(path / f"model-{i + 1:05d}.tmp", path / final)
        for key in shards[i]:
            weight_map[key] = final
    with open(path / INDEX_FILE, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _flush(shards: list[dict[str, torch.Tensor]], path: Path) -> None:
    """Write the newest shard and keep only its key list in memory."""
    i = len(shards)
    save_file(shards[-1], str(path / f"model-{i:05d}.tmp"), metadata={"format": "pt"})
    shards[-1] = dict.fromkeys(shards[-1])  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------- load
def load_pretrained(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    config: ModelConfig | None = None,
) -> Transformer:
    path = Path(path)
    config = config or ModelConfig.from_pretrained(path)
    if dtype is None:
        dtype = getattr(torch, str(config.torch_dtype), None)
        if not isinstance(dtype, torch.dtype) or dtype == FP8_DTYPE:
            dtype = torch.bfloat16
    with torch.device("meta"):
        model = Transformer(config)
    model.to(dtype)
    for m in model.modules():  # the routing bias stays float32, as in the checkpoint
        if isinstance(m, MoE):
            m.gate.e_score_correction_bias = m.gate.e_score_correction_bias.float()
    model.to_empty(device=device)
    model.rotary.reset_parameters(config)
    load_weights_(model, path)
    return model


def checkpoint_files(path: Path) -> dict[str, str]:
    """Tensor name -> file name, from the index or from the single-file checkpoint's header."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        return dict(weight_map)
    single = path / SINGLE_FILE
    if single.exists():
        with _open(single) as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    raise CheckpointError(f"{path}: no {INDEX_FILE} or {SINGLE_FILE}")


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(
            f"{file}: cannot read safetensors file, it may be truncated or corrupt ({e})"
        ) from e


@torch.no_grad()
def load_weights_(model: Transformer, path: str | os.PathLike) -> None:
    """Copy a checkpoint's tensors into an existing model, in place, shard by shard."""
    path = Path(path)
    from openk2.checkpoint.sharded import is_sharded, load_model_state_

    if is_sharded(path):  # a sharded training checkpoint (torch.distributed.checkpoint)
        return load_model_state_(model, path)
    weight_map = checkpoint_files(path)
    targets = dict(hf_tensors(model))
    by_file: dict[str, list[str]] = {}
    for key, file in weight_map.items():
        by_file.setdefault(file, []).append(key)
    for file in by_file:
        if not (path / file).exists():
            listed = [k for k in by_file[file] if not k.endswith("_scale_inv")]
            raise CheckpointError(
                f"{path / file}: shard listed in {INDEX_FILE} is missing; it should hold "
                f"{len(listed)} tensors, e.g. {', '.join(listed[:3])}"
            )
    filled: set[str] = set()
    for file, keys in by_file.items():
        with _open(path / file) as f:
            present = set(f.keys())
            for key in keys:
                if key not in present:
                    raise CheckpointError(
                        f"{path / file}: tensor {key} is listed in the index but not in the file"
                    )
                if key.endswith("_scale_inv") or _is_ignored(key, model.config):
                    continue
                if key not in targets:
                    raise CheckpointError(f"{path / file}: unexpected tensor {key} (not part of this model)")
                target = targets[key]
                tensor = _read(f, path / file, key)
                if tensor.dtype == FP8_DTYPE:
                    scale_key = key + "_scale_inv"
                    if scale_key not in weight_map:
                        raise CheckpointError(f"{path / file}: FP8 tensor {key} has no {scale_key}")
                    scale_file = path / weight_map[scale_key]
                    if scale_file == path / file:
                        scale = _read(f, scale_file, scale_key)
                    else:
                        with _open(scale_file) as g:
                            scale = _read(g, scale_file, scale_key)
                    try:
                        tensor = dequantize_block_fp8(tensor, scale, dtype=torch.float32)
                    except ValueError as e:
                        raise CheckpointError(f"{path / file}: {key}: {e}") from e
                if tuple(tensor.shape) != tuple(target.shape):
                    raise CheckpointError(
                        f"{path / file}: tensor {key} has shape {tuple(tensor.shape)}, "
                        f"the model expects {tuple(target.shape)}"
                    )
                target.copy_(tensor)
                filled.add(key)
    missing = [k for k in targets if k not in filled]
    if missing:
        raise CheckpointError(
            f"{path}: checkpoint lacks {len(missing)} tensors the model needs, e.g. {', '.join(missing[:5])}"
        )


def _read(f, file: Path, key: str) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read tensor {key}, the file may be truncated ({e})") from e
