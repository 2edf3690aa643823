"""Optimizer step overhead: MuonClip (Newton-Schulz on every matrix + QK-Clip) vs torch's AdamW on
the same model and the same gradients. Prints a table with the ratio to AdamW, and for the Muon rows
the Newton-Schulz GFLOP/s as a fraction of this machine's matmul peak in the NS precision (measured by
`benchmarks/peak.py` in the same run); then the optimizer step as a fraction of a training step of
`--step-tokens` tokens (16k: micro-batches of 8 x 256, `--precision auto` as `openk2 train`), and the
same ratio in FLOPs at Kimi K2's real shapes and batch (the `kimi-k2` preset, `openk2 plan`'s 67M
tokens of 4096 per step): Newton-Schulz FLOPs against the step's training FLOPs.

    python benchmarks/bench_optimizer.py [--preset small] [--repeats 10] [--step-tokens 16384]

At one torch thread times are CPU seconds (`peak.clock`), so a loaded machine gives the core's figure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from openk2 import ModelConfig, Transformer  # noqa: E402
from openk2.optim import MuonClip  # noqa: E402
from openk2.optim.muon import resolve_ns_dtype  # noqa: E402


def time_steps(opt, model, repeats: int, before=None) -> float:
    from peak import clock

    cuda = next(model.parameters()).is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    now = time.perf_counter if cuda else clock()
    for i in range(repeats + 2):  # two warm-up steps build the optimizer state
        if i == 2:
            sync()
            t = now()
        if before is not None:
            before()
        opt.step()
    sync()
    return (now() - t) / repeats


def training_step_seconds(model, tokens: int, device: str, micro: tuple[int, int] = (8, 256)) -> float:
    """Forward + backward of `tokens` tokens as `openk2 train` runs them (micro-batches of `micro`,
    gradients accumulated, `--precision auto`), timed once after a warm-up micro-batch."""
    import torch.nn.functional as F
    from peak import clock

    from openk2.distributed.device import autocast_context

    batch, seq = micro
    n = max(1, tokens // (batch * seq))
    ids = torch.randint(0, model.config.vocab_size, (batch, seq + 1), device=device)
    model.train()
    model.record_stats(True)

    def micro_step():
        with autocast_context(torch.device(device), "auto"):
            logits = model(ids[:, :-1])
        (F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()) / n).backward()

    micro_step()
    now = clock() if device == "cpu" else time.perf_counter
    t = now()
    for _ in range(n):
        micro_step()
    if device != "cpu":
        torch.cuda.synchronize()
    return now() - t


def k2_ratio() -> dict:
    """Kimi K2 at its real shapes and batch: Newton-Schulz FLOPs per step (every Muon matrix once,
    as ZeRO-1 Muon runs each on one rank) over the step's training FLOPs (67M tokens of 4096)."""
    from openk2.distributed.plan import Layout
    from openk2.model.size import flops_per_token

    cfg = ModelConfig.from_preset("kimi-k2")
    with torch.device("meta"):
        model = Transformer(cfg)
    lay = Layout()
    ns = newton_schulz_flops(model)
    train = flops_per_token(cfg, context=lay.seq_len // 2)["train"] * lay.global_batch_tokens
    return {"ns_flops": ns, "train_flops": train, "tokens": lay.global_batch_tokens, "ratio": ns / train}


def newton_schulz_flops(model, steps: int = 5) -> float:
    """FLOPs of one Muon step's orthogonalisation: every matrix but the embedding and the head,
    stacked experts one matrix each; per iteration X X^T, A A and B X: 4 m^2 n + 2 m^3 (m <= n)."""
    total = 0.0
    for name, prm in model.named_parameters():
        if prm.ndim < 2 or "embed_tokens" in name or "lm_head" in name:
            continue
        m, n = sorted(prm.shape[-2:])
        count = prm.numel() // (prm.shape[-2] * prm.shape[-1])
        total += count * steps * (4 * m * m * n + 2 * m**3)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--step-tokens", type=int, default=16384, help="training step to compare with")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
    from peak import describe, measure_peaks

    on_cpu = args.device == "cpu"
    peaks = measure_peaks(torch.get_num_threads()) if on_cpu else None
    ns_flops = newton_schulz_flops(model)
    auto = resolve_ns_dtype("auto", torch.device(args.device))
    if peaks:
        print(describe(peaks))
    print(f"Newton-Schulz: {ns_flops / 1e9:.1f} GFLOP per step")
    print(f"{'optimizer':<46} {'ms/step':>10} {'vs AdamW':>10} {'NS GFLOP/s':>11} {'of peak':>8}")
    for name, t in rows:
        ratio = ""
        if "Muon" in name and peaks:
            dtype = "bf16" if "bf16" in name or ("auto" in name and auto == torch.bfloat16) else "fp32"
            ratio = f"{ns_flops / t / 1e9:>11.1f} {100 * ns_flops / t / 1e9 / peaks[dtype + ' peak']:>7.1f}%"
        print(f"{name:<46} {t * 1e3:>10.1f} {t / base:>9.2f}x {ratio}")
    step = training_step_seconds(model, args.step_tokens, args.device)
    muonclip = rows[-1][1]
    print(f"training step (fwd+bwd, --precision auto) of {args.step_tokens:,} tokens: {step:.2f} s; "
          f"MuonClip step {muonclip:.3f} s = {100 * muonclip / (step + muonclip):.1f}% of the whole step "
          f"(optimizer + fwd/bwd), {100 * muonclip / step:.1f}% of fwd/bwd")  # fmt: skip
    k2 = k2_ratio()
    print(f"Kimi K2 (kimi-k2 preset, {k2['tokens'] / 1e6:.0f}M tokens per step): Newton-Schulz "
          f"{k2['ns_flops'] / 1e15:.1f} PFLOP vs training {k2['train_flops'] / 1e18:.2f} EFLOP per step = "
          f"{100 * k2['ratio']:.3f}% of the step's FLOPs")  # fmt: skip


if __name__ == "__main__":
    main()
