"""Checkpoints: the HF K2 layout on disk (`hf`), block FP8 (`fp8`), training run directories
(`store`), and `load`, the one way every command turns a path into a model and its tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from openk2.checkpoint.hf import CheckpointError
from openk2.checkpoint.hf import load_pretrained as load_model
from openk2.checkpoint.hf import save_pretrained as save_model
from openk2.checkpoint.store import resolve_checkpoint

__all__ = ["CheckpointError", "load", "load_model", "load_tokenizer", "resolve_checkpoint", "save_model"]


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
):
    """(model, tokenizer) from a checkpoint directory or a run directory (its latest checkpoint)."""
    ckpt = resolve_checkpoint(path)
    model = load_model(ckpt, dtype=dtype, device=device)
    return model, load_tokenizer(ckpt, model.config.vocab_size)
