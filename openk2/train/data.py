"""Pre-training data: tokenise a corpus once (cached), pack it, serve shuffled batches resumably.

Documents are encoded and joined with an EOS after each one into a single token stream; the stream is
cut into non-overlapping windows of seq_len + 1 tokens (inputs and the next-token targets), which is
packing with no padding. Windows are visited in a fresh seeded permutation each epoch, so the data
position is just (epoch, cursor) and resuming replays exactly the batches an uninterrupted run sees.
The last `val_fraction` of the stream is held out for the eval loss.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from openk2.corpus import corpus_files, iter_documents


@dataclass
class Batch:
    """One micro-batch. targets[i, t] is the token after input_ids[i, t]; loss_mask (float or bool)
    selects the positions that count (None: all); segment_ids keep packed documents apart."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.targets), move(self.loss_mask), move(self.segment_ids))

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel() if self.loss_mask is None else self.loss_mask.sum())


def default_cache_dir() -> Path:
    return Path(os.environ.get("OPENK2_CACHE", Path.home() / ".cache" / "openk2"))


def _cache_key(corpus: str, tokenizer) -> str:
    """Changes when the corpus files or the tokenizer change."""
    h = hashlib.sha1(corpus.encode())
    for path in corpus_files(corpus):
        st = path.stat()
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(str(tokenizer.vocab_size).encode())
    for token, _ in sorted(tokenizer.mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(token)
    h.update(tokenizer.pattern.encode())
    return h.hexdigest()[:16]


def check_utf8(corpus: str, strict: bool = False) -> str | None:
    """Scan the corpus files for bytes that are not valid UTF-8 (they would be read as U+FFFD).
    Returns None when there are none, else a one-line description with the count; with `strict`,
    raises ValueError instead."""
    bad_bytes, bad_files, first = 0, 0, None
    for path in corpus_files(corpus):
        data = path.read_bytes()
        try:
            data.decode("utf-8")
            continue
        except UnicodeDecodeError:
            pass
        bad = len(data) - len(data.decode("utf-8", errors="ignore").encode("utf-8"))
        bad_bytes, bad_files, first = bad_bytes + bad, bad_files + 1, first or path
    if not bad_bytes:
        return None
    message = (
        f"corpus {corpus}: {bad_bytes:,} bytes of invalid UTF-8 in {bad_files} file(s) (first: {first}), "
        "read as U+FFFD"
    )
    if strict:
        raise ValueError(message.replace("read as U+FFFD", "refused by --strict-utf8"))
    return message + "; --strict-utf8 makes this an error"


def tokenize_corpus(
    corpus: str, tokenizer, cache_dir: str | os.PathLike | None = None, max_chars: int | None = None
) -> np.ndarray:
    """All documents of `corpus` as one int32 token stream, an EOS after each document. Cached as .npy
    under cache_dir (default ~/.cache/openk2, or $OPENK2_CACHE) keyed by corpus files and tokenizer."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _cache_key(corpus, tokenizer) + (f"-{max_chars}" if max_chars else "")
    file = cache / f"tokens-{Path(corpus).name}-{key}.npy"
    if file.exists():
        return np.load(file)
    pieces = []
    for text in iter_documents(corpus, max_chars):
        pieces.append(np.asarray(tokenizer.encode(text) + [tokenizer.eos_id], dtype=np.int32))
    if not pieces:
        raise ValueError(f"corpus {corpus!r} is empty")
    tokens = np.concatenate(pieces)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, tokens)
    os.replace(tmp, file)  # atomic: a concurrent run never reads half a file
    return tokens


def held_out_tokens(total: int, val_fraction: float, seq_len: int) -> int:
    """How many tokens at the tail of a `total`-token stream are held out for evaluation (at least one
    window), checking that the rest still fills training windows."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(int(total * val_fraction), seq_len + 1)
    if total - n_val < 2 * (seq_len + 1):
        raise ValueError(
            f"corpus too small: {total} tokens cannot fill training windows of seq_len {seq_len}"
        )
    return n_val


def split_tokens(tokens: np.ndarray, val_fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out the tail of the stream (at least one window) for evaluation."""
    n_val = held_out_tokens(len(tokens), val_fraction, seq_len)
    return tokens[:-n_val], tokens[-n_val:]


def segment_ids_from_eos(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Document index of every position: a new segment starts after each EOS."""
    is_eos = (input_ids == eos_id).long()
    return torch.cumsum(is_eos, dim=-1) - is_eos


class PackedLoader:
    """Shuffled fixed-length windows over a token stream, with a resumable position."""

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        shuffle: bool = True,
        eos_id: int | None = None,
    ):
        if batch_size < 1 or seq_len < 1:
            raise ValueError("batch_size and seq_len must be positive")
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
        self.batch_size, self.seq_len = batch_size, seq_len
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < batch_size:
            raise ValueError(
                f"{len(tokens)} tokens give {self.n_windows} windows of {seq_len}, fewer than one batch "
                f"of {batch_size}; lower --batch-size or --seq-len"
            )
        self.seed, self.shuffle, self.eos_id = seed, shuffle, eos_id
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_windows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def next_batch(self) -> Batch:
        if self.cursor + self.batch_size > self.n_windows:  # drop the ragged tail, start a new epoch
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        idx = torch.from_numpy(self._order[self.cursor : self.cursor + self.batch_size])
        self.cursor += self.batch_size
        offsets = idx.unsqueeze(1) * self.seq_len + torch.arange(self.seq_len + 1)
        windows = self.tokens[offsets]
        x = windows[:, :-1]
        seg = segment_ids_from_eos(x, self.eos_id) if self.eos_id is not None else None
        return Batch(x, windows[:, 1:], None, seg)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def batches(self, n: int) -> list[Batch]:
        return [self.next_batch() for _ in range(n)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        if state["n_windows"] != self.n_windows or state["seed"] != self.seed:
            raise ValueError(
                "the data changed since the checkpoint (different corpus, tokenizer, seq_len or seed); "
                "resuming would not replay the same batches"
            )
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)
