"""Corpora bigger than memory: tokenised once into memory-mapped token shards, then streamed.

`build_shards` reads a corpus document by document -- a text file, a JSONL file (one JSON object per
line, the text in `text_field`), a Parquet file (the `text_field` column, read in row batches) or a
directory of any of these -- encodes each document with an EOS after it, and appends the ids to
fixed-size `uint32` shard files. Nothing but the current document and one shard's buffer is ever in
memory. The shard directory's `index.json` records the sources (path, size, mtime), the tokenizer's
fingerprint (a hash of its ranks, special tokens and split pattern) and each shard's token count; a
second call with the same sources and tokenizer reuses the shards, and opening shards with another
tokenizer is an error rather than silent garbage.

`StreamingLoader` reads consecutive `seq_len + 1` windows straight from the memory-mapped shards.
Its position is a token offset, so a resumed run continues at exactly the next token. Under data
parallelism every rank sees the same global batch order and reads only its own rows of it, so the
ranks together read each window once. Windows are visited in corpus order: large corpora are
expected to be shuffled when they are written, as pre-training corpora are.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from openk2.train.data import Batch, segment_ids_from_eos

INDEX_FILE = "index.json"
SHARD_DTYPE = np.uint32
FORMAT_VERSION = 1
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".html", ".xml", ".c", ".h", ".csv"}


class CorpusError(ValueError):
    """A corpus or shard directory that cannot be used, with a message naming the file."""


def is_streamed_corpus(source: str | os.PathLike) -> bool:
    """True for the corpora that go through token shards: JSONL or Parquet files, or directories
    holding any (plain text files and the embedded corpora keep the in-memory path)."""
    path = Path(source).expanduser()
    structured = JSONL_SUFFIXES | PARQUET_SUFFIXES
    if path.is_file():
        return path.suffix.lower() in structured
    if path.is_dir():
        return any(p.suffix.lower() in structured for p in path.rglob("*") if p.is_file())
    return False


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides which ids a text gets: ranks, special tokens, pattern."""
    h = hashlib.sha256()
    for token, rank in sorted(tokenizer.mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(rank.to_bytes(4, "little") + token)
    for name, token_id in sorted(tokenizer.special_ids.items(), key=lambda kv: kv[1]):
        h.update(f"{token_id}:{name}".encode())
    h.update(tokenizer.pattern.encode())
    return h.hexdigest()[:24]


def source_files(source: str | os.PathLike) -> list[Path]:
    """The files of a corpus path: the file itself, or every supported file under a directory."""
    path = Path(source).expanduser()
    supported = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in supported)
        if not files:
            raise CorpusError(f"{path}: no corpus files ({', '.join(sorted(supported))})")
        return files
    raise CorpusError(f"{path}: no such file or directory")


def iter_documents(source: str | os.PathLike, text_field: str = "text") -> Iterator[str]:
    """Every document of a corpus path, one at a time."""
    for file in source_files(source):
        suffix = file.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            yield from _jsonl_documents(file, text_field)
        elif suffix in PARQUET_SUFFIXES:
            yield from _parquet_documents(file, text_field)
        else:
            text = file.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
            if text:
                yield text


def _jsonl_documents(file: Path, text_field: str) -> Iterator[str]:
    with open(file, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{file}:{line_no}: invalid JSON ({e.msg})") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise CorpusError(f"{file}:{line_no}: no string field {text_field!r}")
            if text:
                yield text


def _parquet_documents(file: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"{file}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        parquet = pq.ParquetFile(file)
    except Exception as e:  # pyarrow raises its own error types for a damaged file
        raise CorpusError(f"{file}: not a readable Parquet file ({e})") from None
    if text_field not in parquet.schema_arrow.names:
        raise CorpusError(f"{file}: no column {text_field!r} (columns: {parquet.schema_arrow.names})")
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


def _source_key(files: list[Path], fingerprint: str, text_field: str) -> list:
    return [FORMAT_VERSION, fingerprint, text_field] + [
        [str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files
    ]


def build_shards(
    source: str | os.PathLike,
    tokenizer,
    out_dir: str | os.PathLike,
    shard_tokens: int = 1 << 26,
    text_field: str = "text",
) -> Path:
    """Tokenise `source` into `out_dir` (reused when sources and tokenizer are unchanged)."""
    out = Path(out_dir)
    files = source_files(source)
    fingerprint = tokenizer_fingerprint(tokenizer)
    key = _source_key(files, fingerprint, text_field)
    index = out / INDEX_FILE
    if index.is_file():
        try:
            if json.loads(index.read_text()).get("source_key") == key:
                return out
        except (OSError, json.JSONDecodeError):
            pass  # rebuilt below
    if shard_tokens < 1:
        raise CorpusError(f"shard_tokens must be positive, got {shard_tokens}")
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts: list[int] = []
    buffer = np.empty(shard_tokens, dtype=SHARD_DTYPE)
    filled = 0
    documents = 0

    def flush() -> None:
        nonlocal filled
        buffer[:filled].tofile(tmp / f"shard-{len(counts):05d}.bin")
        counts.append(filled)
        filled = 0

    for text in iter_documents(source, text_field):
        ids = np.asarray(tokenizer.encode(text) + [tokenizer.eos_id], dtype=SHARD_DTYPE)
        documents += 1
        while len(ids):
            take = min(len(ids), shard_tokens - filled)
            buffer[filled : filled + take] = ids[:take]
            filled += take
            ids = ids[take:]
            if filled == shard_tokens:
                flush()
    if filled:
        flush()
    if not counts:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CorpusError(f"{source}: the corpus holds no text")
    meta = {
        "format": FORMAT_VERSION,
        "tokenizer_fingerprint": fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "documents": documents,
        "shard_tokens": counts,
        "total_tokens": int(sum(counts)),
        "source_key": key,
    }
    (tmp / INDEX_FILE).write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


class TokenShards:
    """Read-only memory-mapped view of a shard directory as one token stream."""

    def __init__(self, directory: str | os.PathLike, tokenizer=None):
        self.directory = Path(directory)
        try:
            self.meta = json.loads((self.directory / INDEX_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CorpusError(f"{self.directory}: not a token-shard directory ({e})") from None
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != self.meta["tokenizer_fingerprint"]:
            raise CorpusError(
                f"{self.directory}: tokenised with another tokenizer "
                f"(fingerprint {self.meta['tokenizer_fingerprint']}); rebuild the shards"
            )
        self.shards = []
        for i, count in enumerate(self.meta["shard_tokens"]):
            file = self.directory / f"shard-{i:05d}.bin"
            if not file.is_file() or file.stat().st_size != count * np.dtype(SHARD_DTYPE).itemsize:
                raise CorpusError(f"{file}: missing or truncated (expected {count} tokens)")
            self.shards.append(np.memmap(file, dtype=SHARD_DTYPE, mode="r", shape=(count,)))
        self.starts = np.concatenate([[0], np.cumsum(self.meta["shard_tokens"])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) outside 0..{len(self)}")
        out = np.empty(length, dtype=np.int64)
        done = 0
        shard = int(np.searchsorted(self.starts, start, side="right") - 1)
        while done < length:
            offset = start + done - int(self.starts[shard])
            take = min(length - done, len(self.shards[shard]) - offset)
            out[done : done + take] = self.shards[shard][offset : offset + take]
            done += take
            shard += 1
        return out


class StreamingLoader:
    """Consecutive (batch, seq_len + 1) windows from token shards; rank `rank` of `world` data-parallel
    ranks reads rows [rank * b, (rank + 1) * b) of each global batch of `batch_size` rows (b =
    batch_size / world). The position is the global token offset of the next batch."""

    def __init__(
        self,
        shards: TokenShards,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world: int = 1,
        eos_id: int | None = None,
        limit: int | None = None,
    ):
        if batch_size < 1 or seq_len < 1:
            raise ValueError("batch_size and seq_len must be positive")
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} is not divisible by {world} data-parallel ranks")
        self.shards, self.batch_size, self.seq_len = shards, batch_size, seq_len
        self.rank, self.world, self.eos_id = rank, world, eos_id
        self.stride = batch_size * seq_len  # tokens one global batch advances
        self.limit = len(shards) if limit is None else min(limit, len(shards))  # tokens it may read
        if self.limit < self.stride + 1:
            raise ValueError(
                f"{self.limit} tokens cannot fill one batch of {batch_size} x {seq_len}; "
                "lower --batch-size or --seq-len"
            )
        self.position, self.epoch = 0, 0

    def shard_(self, rank: int, world: int) -> StreamingLoader:
        """Read only data-parallel rank `rank` of `world`'s rows of each global batch from now on
        (the position, a global token offset, is unchanged, so a checkpoint resumes under any
        number of ranks)."""
        if not 0 <= rank < world or self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} cannot be split over {world} data-parallel ranks")
        self.rank, self.world = rank, world
        return self

    def next_batch(self) -> Batch:
        if self.position + self.stride + 1 > self.limit:  # drop the ragged tail, wrap around
            self.position, self.epoch = 0, self.epoch + 1
        rows = self.batch_size // self.world
        first = self.position + self.rank * rows * self.seq_len
        flat = self.shards.read(first, rows * self.seq_len + 1)
        self.position += self.stride
        starts = np.arange(rows)[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        windows = torch.from_numpy(flat[starts])
        x = windows[:, :-1]
        seg = segment_ids_from_eos(x, self.eos_id) if self.eos_id is not None else None
        return Batch(x, windows[:, 1:], None, seg)

    def batches(self, n: int) -> list[Batch]:
        return [self.next_batch() for _ in range(n)]

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "position": self.position,
            "epoch": self.epoch,
            "total_tokens": len(self.shards),
            "tokenizer_fingerprint": self.shards.meta["tokenizer_fingerprint"],
        }

    def load_state_dict(self, state: dict) -> None:
        if (
            state["total_tokens"] != len(self.shards)
            or state["tokenizer_fingerprint"] != self.shards.meta["tokenizer_fingerprint"]
        ):
            raise ValueError(
                "the token shards changed since the checkpoint (another corpus or tokenizer); "
                "resuming would not continue at the same token"
            )
        self.position, self.epoch = state["position"], state["epoch"]
