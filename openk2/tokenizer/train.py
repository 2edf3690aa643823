"""Train a byte-level BPE on a corpus and write it in the K2 format.

The `tokenizers` library (Rust) does the counting and merging; we give it K2's split pattern
as pre-tokenizer so the merges it learns are the ones tiktoken can apply, then translate its
result into tiktoken ranks: the 256 single bytes get ranks 0..255 (byte b has rank b, so the
first 256 ids of every openk2 tokenizer equal the byte-level `tiny` tokenizer) and the i-th
learned merge gets rank 256 + i. tiktoken merges the adjacent pair whose concatenation has
the lowest rank, so merge order is exactly what the ranks must encode.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from openk2.corpus import iter_documents
from openk2.tokenizer.tokenizer import ASSETS_DIR, K2_PATTERN, NUM_RESERVED_SPECIAL, K2Tokenizer

# Default tokenizer recipe: mostly Shakespeare, plus enough stdlib code that indentation,
# brackets and identifiers get tokens of their own. Fixed inputs -> the same file each time.
DEFAULT_CORPORA = ("shakespeare", "python-stdlib:3000000")
DEFAULT_BASE_SIZE = 7936  # `small`: 7936 BPE + 256 specials = 8192


@dataclass
class TrainArgs:
    corpora: list[str] = field(default_factory=lambda: list(DEFAULT_CORPORA))
    n_base: int = DEFAULT_BASE_SIZE  # base tokens, including the 256 single bytes
    min_frequency: int = 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, used by `tokenizers`' ByteLevel."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def parse_corpus_spec(spec: str) -> tuple[str, int | None]:
    """'NAME' or 'NAME:MAX_CHARS' (a trailing integer after the last colon)."""
    name, sep, limit = spec.rpartition(":")
    if sep and limit.isdigit() and name:
        return name, int(limit)
    return spec, None


def _batches(corpora: list[str], lines_per_batch: int = 2000) -> Iterator[list[str]]:
    for spec in corpora:
        name, limit = parse_corpus_spec(spec)
        for doc in iter_documents(name, limit):
            lines = doc.splitlines(keepends=True)
            for i in range(0, len(lines), lines_per_batch):
                yield ["".join(lines[i : i + lines_per_batch])]


def train_bpe(args: TrainArgs) -> dict[bytes, int]:
    """Learn `args.n_base` tiktoken ranks (256 bytes + merges) from the corpora."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if args.n_base < 256:
        raise ValueError(f"n_base must be at least 256 (the single bytes), got {args.n_base}")
    if not args.corpora:
        raise ValueError("no corpus given")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(K2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.n_base,
        min_frequency=args.min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(_batches(args.corpora), trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    decode = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(decode[c] for c in left + right)
        if token not in ranks:  # the same bytes can in principle be reached by two merges
            ranks[token] = len(ranks)
    if len(ranks) != args.n_base:
        raise ValueError(
            f"the corpus only supports {len(ranks)} base tokens, fewer than the {args.n_base} asked for; "
            "use a larger corpus, a smaller --vocab-size or --min-frequency 1"
        )
    return ranks


def train_tokenizer(args: TrainArgs) -> K2Tokenizer:
    from openk2.tokenizer.chat import JINJA_TEMPLATE

    return K2Tokenizer(train_bpe(args), chat_template=JINJA_TEMPLATE, name="k2-trained")


def train_and_save(args: TrainArgs, out: str | Path) -> K2Tokenizer:
    t0 = time.time()
    tok = train_tokenizer(args)
    tok.save_pretrained(out)
    print(
        f"trained {tok.n_base} BPE tokens (+{NUM_RESERVED_SPECIAL} specials = {tok.vocab_size}) "
        f"on {', '.join(args.corpora)} in {time.time() - t0:.1f}s -> {out}"
    )
    return tok


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="(re)build the shipped default tokenizer")
    p.add_argument("--default", action="store_true", help=f"write the `small` tokenizer to {ASSETS_DIR}")
    if p.parse_args().default:
        train_and_save(TrainArgs(), ASSETS_DIR)
    else:
        p.print_help()
