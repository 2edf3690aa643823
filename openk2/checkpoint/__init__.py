"""Checkpoints: the HF K2 layout on disk (`hf`), block FP8 (`fp8`), training run directories
(`store`), and `load`, the one way every command turns a path into a model and its tokenizer.

`load` checks a checkpoint against its manifest before reading it (docs/training.md, "Checkpoint
integrity"): by default (`verify="auto"`) sizes always and sha256 too when the files total at most
1 GiB, so a multi-GB serve start costs a stat per file, not a read of every byte; `verify="full"`
always hashes. Anything wrong with the checkpoint comes out as one `CheckpointError` line naming the
file."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from openk2.checkpoint.hf import CheckpointError
from openk2.checkpoint.hf import load_pretrained as load_model
from openk2.checkpoint.hf import save_pretrained as save_model
from openk2.checkpoint.store import (
    CheckpointWarning,
    find_resumable,
    list_checkpoints,
    resolve_checkpoint,
    verify_checkpoint,
)

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "load",
    "load_model",
    "load_tokenizer",
    "resolve_checkpoint",
    "save_model",
    "verify_checkpoint",
]


def load_tokenizer(checkpoint: str | os.PathLike, vocab_size: int):
    """The checkpoint's own tokenizer files; without them, the shipped tokenizer whose size matches
    the model (`small`: the default BPE, `tiny`: byte level)."""
    from openk2.tokenizer.tokenizer import MODEL_FILE, K2Tokenizer

    checkpoint = Path(checkpoint)
    if (checkpoint / MODEL_FILE).is_file():
        return K2Tokenizer.from_pretrained(checkpoint)
    for make in (K2Tokenizer.default, K2Tokenizer.byte_level):
        tok = make()
        if tok.vocab_size == vocab_size:
            return tok
    raise FileNotFoundError(
        f"{checkpoint} has no {MODEL_FILE} and no shipped tokenizer has the model's {vocab_size} ids"
    )


def load(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    verify: str = "auto",
):
    """(model, tokenizer) from a checkpoint directory, or a run directory (its newest checkpoint that
    verifies; each newer damaged one is named in a warning). `verify`: "auto", "full" or "size"
    (`openk2.checkpoint.store.verify_checkpoint`). A damaged checkpoint raises CheckpointError."""
    ckpt = _checkpoint_to_load(Path(path), verify)
    try:
        model = load_model(ckpt, dtype=dtype, device=device)
    except ValueError as e:  # config.json that is not valid JSON or not a K2 config
        raise CheckpointError(str(e)) from e
    except TypeError as e:  # a config value of the wrong type, found only when the model is built
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{ckpt / 'config.json'}: cannot build the model from it ({reason})") from e
    try:
        tokenizer = load_tokenizer(ckpt, model.config.vocab_size)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        reason = str(e) if str(ckpt) in str(e) else f"tiktoken.model or tokenizer_config.json: {e}"
        raise CheckpointError(f"{ckpt}: unreadable tokenizer ({reason})") from e
    return model, tokenizer


def _checkpoint_to_load(path: Path, verify: str) -> Path:
    if (path / "config.json").is_file():
        verify_checkpoint(path, verify=verify)
        return path
    if list_checkpoints(path):
        ckpt = find_resumable(path, verify=verify)
        if ckpt is None:
            raise CheckpointError(f"{path}: every checkpoint of this run is damaged (see the warnings above)")
        return ckpt
    return resolve_checkpoint(path)  # raises the "neither a checkpoint nor a run" error
