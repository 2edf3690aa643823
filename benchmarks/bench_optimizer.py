"""Optimizer step overhead: MuonClip (Newton-Schulz on every matrix + QK-Clip) vs torch's AdamW on
the same model and the same gradients. Prints a table with the ratio to AdamW.

    python benchmarks/bench_optimizer.py [--preset small] [--repeats 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openk2 import ModelConfig, Transformer  # noqa: E402
from openk2.optim import MuonClip  # noqa: E402
from openk2.optim.muon import resolve_ns_dtype  # noqa: E402


def time_steps(opt, model, repeats: int, before=None) -> float:
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    for i in range(repeats + 2):  # two warm-up steps build the optimizer state
        if i == 2:
            sync()
            t = time.perf_counter()
        if before is not None:
            before()
        opt.step()
    sync()
    return (time.perf_counter() - t) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(args.preset)).to(args.device)
    for prm in model.parameters():
        prm.grad = torch.randn_like(prm) * 1e-3
    h = model.config.num_attention_heads
    mlas = [blk.self_attn for blk in model.layers.values()]

    def fake_logits():  # what record_stats leaves after a forward; half the heads over tau
        for m in mlas:
            m.max_logits = torch.linspace(50, 150, h, device=args.device)

    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-9, betas=(0.9, 0.95), weight_decay=0.1)
    base = time_steps(adamw, model, args.repeats)
    rows.append(("torch AdamW (foreach)", base))
    for name, kw, hook in (
        ("Muon, NS in bf16", dict(qk_clip_tau=None, ns_dtype=torch.bfloat16), None),
        ("Muon, NS in fp32", dict(qk_clip_tau=None, ns_dtype=torch.float32), None),
        ("MuonClip (auto NS + QK-Clip, heads clipped)", dict(qk_clip_tau=100.0), fake_logits),
    ):
        opt = MuonClip(model, lr=1e-9, **kw)
        rows.append((name, time_steps(opt, model, args.repeats, hook)))
    print(f"{args.preset} preset, {n_params / 1e6:.1f}M parameters, device {args.device}, "
          f"torch threads {torch.get_num_threads()}; 'auto' Newton-Schulz precision here: "
          f"{resolve_ns_dtype('auto', torch.device(args.device))}")  # fmt: skip
    print(f"{'optimizer':<46} {'ms/step':>10} {'vs AdamW':>10}")
    for name, t in rows:
        print(f"{name:<46} {t * 1e3:>10.1f} {t / base:>9.2f}x")


if __name__ == "__main__":
    main()
