"""Training checkpoints that are also servable HF checkpoints.

A checkpoint is a directory `<run>/checkpoints/step-XXXXXXX/` holding

* the model in the HF K2 layout (config.json, safetensors shards, index), so `openk2 sample`,
  `openk2 serve`, SFT and RL load it with `Transformer.from_pretrained`;
* the tokenizer (tiktoken.model + tokenizer_config.json);
* `trainer_state.pt`: optimizer state, step, data position, RNG states and the run's config, which
  is everything else an exact resume needs (the routing bias is a model buffer, stored with the
  weights; the LR schedule is a pure function of the step).

It is written to a temporary directory next to its final place and renamed, so a kill at any moment
leaves either the complete new checkpoint or none; older checkpoints beyond `keep` are then removed.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are never listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory (-> its latest checkpoint)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint (no config.json) nor a run with checkpoints")
    return latest


def save_checkpoint(
    run_dir: str | os.PathLike, step: int, model, tokenizer, trainer_state: dict, keep: int = 2
) -> Path:
    """Write the checkpoint for `step` atomically and keep only the newest `keep` checkpoints."""
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    from openk2.checkpoint.hf import save_pretrained

    save_pretrained(model, tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(trainer_state, tmp / STATE_FILE)
    if final.exists():  # re-saving the same step (e.g. the final one): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(path: str | os.PathLike) -> dict:
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {STATE_FILE}; this is a model checkpoint, not a training one")
    return torch.load(file, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------------------
# Minimal fallback for the run-integrity API the training driver calls (openk2.train.run). The
# `integrity` branch replaces this block with the checksummed-manifest implementation at merge.

_save_checkpoint_plain = save_checkpoint


def save_checkpoint(  # noqa: F811 -- fallback signature with run_id, see above
    run_dir: str | os.PathLike,
    step: int,
    model,
    tokenizer,
    trainer_state: dict,
    keep: int = 2,
    run_id: str | None = None,
) -> Path:
    """`save_checkpoint` recording the run's id in the trainer state."""
    if run_id is not None:
        trainer_state = {**trainer_state, "run_id": run_id}
    return _save_checkpoint_plain(run_dir, step, model, tokenizer, trainer_state, keep=keep)


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise ValueError naming what is wrong with a checkpoint directory (fallback: files present
    and the trainer state readable)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: no config.json")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{path}: no weight files")
    try:
        load_trainer_state(path)
    except Exception as e:  # a truncated pickle raises anything from EOFError to UnpicklingError
        raise ValueError(f"{path}: unreadable {STATE_FILE} ({type(e).__name__}: {e})") from None


def find_resumable(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of the run that verifies; a warning for each newer bad one (never
    deleted)."""
    import warnings

    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(ckpt)
        except ValueError as e:
            warnings.warn(f"skipping a damaged checkpoint: {e}", stacklevel=2)
            continue
        return ckpt
    return None


def clean_stale_temps(run_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporary directories that killed saves left behind; returns what was removed."""
    root = Path(run_dir) / "checkpoints"
    stale = sorted(root.glob(".tmp-step-*")) if root.is_dir() else []
    for tmp in stale:
        shutil.rmtree(tmp, ignore_errors=True)
    return stale
