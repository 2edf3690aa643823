"""Perplexity on held-out text with the model's own forward, in sliding windows.

The held-out slice is the *last* `chars` characters of a corpus (an embedded corpus name or a
file/directory path): openk2's pre-training reads corpora from the start, so the tail is the part a
run with a character budget never saw. Tokens are scored in windows of `context` tokens that advance by
`stride`; every token is scored exactly once, and each window scores only its last `stride` tokens,
so every token after the first window sees at least context - stride tokens of history.

Reported: tokens scored, mean NLL (nats/token), perplexity, and bits per byte = total NLL / (ln 2 ·
UTF-8 bytes), the figure that compares models with different tokenizers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from openk2.checkpoint import load_model
from openk2.eval.harness import Item, ResultStore, run_items


@dataclass
class PerplexityConfig:
    text: str = "shakespeare"  # corpus name ("shakespeare", "python-stdlib") or a file/directory path
    chars: int = 200_000  # the held-out slice: this many characters from the end
    context: int = 0  # window length in tokens; 0 = the model's max_position_embeddings (at most 2048)
    stride: int = 0  # 0 = context // 2
    batch_size: int = 4  # windows per forward

    def validate(self) -> PerplexityConfig:
        if self.chars < 1:
            raise ValueError(f"chars must be positive, got {self.chars}")
        if self.context < 0 or self.stride < 0:
            raise ValueError("context and stride must be >= 0")
        return self


def held_out_text(source: str, chars: int) -> str:
    """The last `chars` characters of the corpus as `read_corpus` joins it, reading only the files
    needed, from the last one back."""
    from openk2.corpus import corpus_files, read_text

    pieces, total = [], 0
    for path in reversed(corpus_files(source)):
        text = read_text(path)
        if not text:
            continue
        pieces.append(text)
        total += len(text) + 2
        if total >= chars:
            break
    if not pieces:
        raise ValueError(f"{source}: empty text")
    return "\n\n".join(reversed(pieces))[-chars:]


@dataclass
class Window:
    begin: int  # first input token
    end: int  # one past the last input token
    score_from: int  # first *target* position scored (absolute); targets are tokens[begin+1:end]


def windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """Windows over tokens[0:n_tokens] (tokens[0] is BOS, never a target) scoring each of the targets
    1..n_tokens-1 exactly once."""
    if context < 2 or not 1 <= stride <= context:
        raise ValueError(f"need context >= 2 and 1 <= stride <= context, got {context}, {stride}")
    out, scored = [], 1  # targets before `scored` are done
    while scored < n_tokens:
        # Start so the window scores about `stride` new targets; the target at `scored` needs its
        # predecessor as input, and every window must score at least one target.
        begin = max(0, scored - context + min(stride, context - 1))
        end = min(begin + context, n_tokens)
        out.append(Window(begin, end, scored))
        scored = end
    return out


@torch.no_grad()
def score_windows(model, tokens: torch.Tensor, ws: list[Window]) -> list[dict]:
    """Summed NLL and count of scored targets per window; windows of equal length share a forward."""
    out: list[dict | None] = [None] * len(ws)
    by_len: dict[int, list[int]] = {}
    for i, w in enumerate(ws):
        by_len.setdefault(w.end - w.begin, []).append(i)
    device = next(model.parameters()).device
    for length, idx in by_len.items():
        x = torch.stack([tokens[ws[i].begin : ws[i].end] for i in idx]).to(device)
        logits = model(x[:, :-1]).float()
        nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # (B, length-1)
        for row, i in enumerate(idx):
            w = ws[i]
            first = w.score_from - (w.begin + 1)  # target index inside the window
            out[i] = {"nll_sum": float(nll[row, first:].double().sum()), "tokens": length - 1 - first}
    return out  # type: ignore[return-value]


def metrics(records: list[dict], n_bytes: int) -> dict:
    nll = sum(r["nll_sum"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    mean = nll / max(1, tokens)
    return {
        "tokens": tokens,
        "bytes": n_bytes,
        "nll": mean,
        "ppl": math.exp(mean) if mean < 700 else float("inf"),
        "bits_per_byte": nll / (math.log(2) * max(1, n_bytes)),
    }


def run(checkpoint: str, cfg: PerplexityConfig, store: ResultStore, **run_kw) -> dict:
    from openk2.tokenizer.tokenizer import K2Tokenizer

    cfg.validate()
    if not Path(checkpoint).is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {checkpoint}")
    tokenizer = K2Tokenizer.from_pretrained(checkpoint)
    model = load_model(checkpoint).eval()
    context = cfg.context or min(model.config.max_position_embeddings, 2048)
    if context > model.config.max_position_embeddings:
        raise ValueError(
            f"context {context} exceeds the model's {model.config.max_position_embeddings} positions"
        )
    stride = cfg.stride or max(1, context // 2)
    text = held_out_text(cfg.text, cfg.chars)
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    if max(ids) >= model.config.vocab_size:
        raise ValueError(
            f"tokenizer ids reach {max(ids)} but the model has {model.config.vocab_size} embeddings"
        )
    tokens = torch.tensor(ids, dtype=torch.long)
    ws = windows(len(ids), context, stride)
    items = [Item(f"w{i:06d}:{w.begin}-{w.end}", w) for i, w in enumerate(ws)]
    run_kw.setdefault("batch_size", cfg.batch_size)
    records = run_items(
        store, items, lambda b: score_windows(model, tokens, [it.payload for it in b]), **run_kw
    )
    extra = {"context": context, "stride": stride}
    return store.finish(records, metrics(records, len(text.encode("utf-8"))), extra)
