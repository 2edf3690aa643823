"""`openk2 sample CKPT`: continue a prompt with a trained checkpoint (a plain sampling loop; the
serving engine in openk2/serve is the fast path, this one has no dependencies beyond the model)."""

from __future__ import annotations

import argparse
import sys

import torch


@torch.no_grad()
def generate(model, ids: list[int], max_new_tokens: int, temperature: float, top_k: int | None, eos_id=None):
    """Sample up to max_new_tokens ids after `ids` (full recompute per token: fine for small models)."""
    x = torch.tensor([ids], dtype=torch.long)
    limit = model.config.max_position_embeddings
    out = []
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
            break
        out.append(nxt)
        x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    return out


def generate_text(
    checkpoint: str,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
) -> str:
    from openk2.checkpoint import load

    model, tok = load(checkpoint, dtype=torch.float32)
    model.eval()
    torch.manual_seed(seed)
    ids = tok.encode(prompt) if prompt else [tok.eos_id]  # an empty prompt starts a new document
    new = generate(model, ids, max_new_tokens, temperature, top_k, eos_id=tok.eos_id)
    return prompt + tok.decode(new)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    try:
        text = generate_text(
            args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0
