"""`openk2 sample MODEL`: continue a prompt with a trained checkpoint, printing tokens as they come
(a plain sampling loop; the serving engine in openk2/serve is the fast path, this one needs nothing
beyond the model)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator

import torch

from openk2.serve.sampling import K2_DEFAULT_TEMPERATURE


@torch.no_grad()
def sample_tokens(
    model, ids: list[int], max_new_tokens: int, temperature: float, top_k: int | None, eos_id=None
) -> Iterator[int]:
    """Yield up to max_new_tokens sampled ids after `ids`, one at a time (full recompute per token:
    fine for small models); stops before EOS."""
    x = torch.tensor([ids], dtype=torch.long)
    limit = model.config.max_position_embeddings
    for _ in range(max_new_tokens):
        logits = model(x[:, -limit:])[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = logits.topk(min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1))
        if eos_id is not None and nxt == eos_id:
            return
        yield nxt
        x = torch.cat([x, torch.tensor([[nxt]])], dim=1)


def generate(model, ids: list[int], max_new_tokens: int, temperature: float, top_k: int | None, eos_id=None):
    """The sampled ids after `ids` as a list (see sample_tokens)."""
    return list(sample_tokens(model, ids, max_new_tokens, temperature, top_k, eos_id))


def generate_text(
    checkpoint: str,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = K2_DEFAULT_TEMPERATURE,
    top_k: int | None = 50,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """prompt + its sampled continuation. `on_text` receives the continuation piece by piece as it is
    generated (whole characters only: a multi-byte character split over tokens waits for its end)."""
    from openk2.checkpoint import load

    model, tok = load(checkpoint, dtype=torch.float32)
    model.eval()
    torch.manual_seed(seed)
    ids = tok.encode(prompt) if prompt else [tok.eos_id]  # an empty prompt starts a new document
    new: list[int] = []
    shown = 0
    for nxt in sample_tokens(model, ids, max_new_tokens, temperature, top_k, eos_id=tok.eos_id):
        new.append(nxt)
        if on_text is not None:
            text = tok.decode(new)
            if not text.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for its next byte
                on_text(text[shown:])
                shown = len(text)
    text = tok.decode(new)
    if on_text is not None and len(text) > shown:
        on_text(text[shown:])
    return prompt + text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint", nargs="?", metavar="MODEL", help="checkpoint or run directory (same as --model)"
    )
    p.add_argument("--model", help="checkpoint directory, or run directory (its latest checkpoint)")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=K2_DEFAULT_TEMPERATURE, help="0 = greedy (K2's: 0.6)")
    p.add_argument("--top-k", type=int, default=50, help="0 = no top-k cut")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 <= args.temperature <= 2:
        raise ValueError(f"--temperature must be in [0, 2], got {args.temperature}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {args.top_k}")
    started = False

    def stream(piece: str) -> None:
        nonlocal started
        if not started:  # the prompt goes out once the model has loaded (a load error comes alone)
            sys.stdout.write(args.prompt)
            started = True
        sys.stdout.write(piece)
        sys.stdout.flush()

    generate_text(
        args.model, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None, args.seed, stream
    )
    if not started:
        sys.stdout.write(args.prompt)
    sys.stdout.write("\n")
    return 0
