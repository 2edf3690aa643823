"""`openk2 tokenizer train|info|encode`: build a K2-format tokenizer or look inside one."""

from __future__ import annotations

import argparse
import json
import sys

from openk2.tokenizer.tokenizer import MODEL_FILE, K2Tokenizer
from openk2.tokenizer.train import DEFAULT_BASE_SIZE, DEFAULT_CORPORA, TrainArgs, train_and_save


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE on a corpus and write it in the K2 format")
    t.add_argument(
        "--corpus",
        nargs="+",
        default=list(DEFAULT_CORPORA),
        help="'shakespeare', 'python-stdlib' or a file/dir path, each optionally ':MAX_CHARS' "
        f"(default: {' '.join(DEFAULT_CORPORA)})",
    )
    t.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_BASE_SIZE + 256,
        help="total vocabulary including the 256 reserved specials (default 8192 = the `small` preset)",
    )
    t.add_argument("--min-frequency", type=int, default=2, help="ignore pairs seen fewer times")
    t.add_argument("--out", required=True, help="output directory")
    actions = (("info", "vocabulary size and special ids"), ("encode", "print the ids of a text"))
    for name, helptext in actions:
        p = sub.add_parser(name, help=helptext)
        p.add_argument(
            "--tokenizer",
            default="default",
            help="'default' (small), 'bytes' (tiny), a tokenizer directory, or a checkpoint or run "
            "directory (the tokenizer its model uses)",
        )
        if name == "encode":
            p.add_argument("text", nargs="?", help="text to encode (default: stdin)")
            p.add_argument("--allow-special", action="store_true", help="turn special-token strings into ids")


def load_tokenizer(name: str) -> K2Tokenizer:
    """A tokenizer by name or directory; a checkpoint or run directory gives its model's tokenizer."""
    from pathlib import Path

    path = Path(name)
    if path.is_dir() and not (path / MODEL_FILE).is_file():
        from openk2.checkpoint import load_tokenizer as checkpoint_tokenizer
        from openk2.checkpoint import resolve_checkpoint
        from openk2.config import ModelConfig

        checkpoint = resolve_checkpoint(path)
        return checkpoint_tokenizer(checkpoint, ModelConfig.from_pretrained(checkpoint).vocab_size)
    if name not in ("default", "byte-level", "byte", "bytes") and not path.exists():
        raise FileNotFoundError(f"--tokenizer {name}: no such directory (or 'default', 'bytes')")
    return K2Tokenizer.load(name)


def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        if args.vocab_size < 256 + 256:
            raise ValueError(f"--vocab-size must be >= 512 (256 bytes + 256 specials), not {args.vocab_size}")
        if args.min_frequency < 1:
            raise ValueError(f"--min-frequency must be >= 1, got {args.min_frequency}")
        targs = TrainArgs(args.corpus, args.vocab_size - 256, args.min_frequency)
        train_and_save(targs, args.out)
        return 0
    tok = load_tokenizer(args.tokenizer)
    if args.action == "info":
        named = {s: i for s, i in tok.special_ids.items() if not s.startswith("<|reserved_token_")}
        print(json.dumps({"n_base": tok.n_base, "vocab_size": tok.vocab_size, "specials": named}, indent=2))
        return 0
    text = args.text if args.text is not None else sys.stdin.read()
    ids = tok.encode(text, allow_special=args.allow_special)
    print(json.dumps(ids))
    print(f"{len(ids)} tokens, {len(text.encode())} bytes", file=sys.stderr)
    return 0
