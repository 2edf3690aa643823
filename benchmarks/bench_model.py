"""Training-step and forward speed of openk2 vs transformers' DeepseekV3ForCausalLM, same weights, one run.

    python benchmarks/bench_model.py [--preset small] [--batch 8] [--seq 256] [--iters 5]

Both models run in float32 on the CPU with the same thread count. openk2 is timed twice for the
training step: with its default SDPA attention, and with the explicit-logits attention that records
the per-head max logit for QK-Clip (what `openk2 train` uses). Each figure is also given as model
GFLOP/s (3x the forward matmul FLOPs for a training step) and as a fraction of this machine's fp32
matmul peak, measured by `benchmarks/peak.py` in the same run at the same thread count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from openk2 import ModelConfig, Transformer
from openk2.checkpoint import save_model
from openk2.model.size import flops_per_token


def timed(fn, iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()

    from transformers import DeepseekV3ForCausalLM

    cfg = ModelConfig.from_preset(args.preset)
    cfg.model_type = "deepseek_v3"
    torch.manual_seed(0)
    ours = Transformer(cfg)
    with tempfile.TemporaryDirectory() as d:
        save_model(ours, d)
        hf = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    x, y = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        diff = (hf.eval()(x).logits - ours.eval()(x)).abs().max().item()
    ours.train()
    hf.train()

    def step(model, logits_of):
        def run():
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(logits_of(model, x).flatten(0, 1), y.flatten())
            loss.backward()

        return run

    def fwd(model, logits_of):
        def run():
            with torch.no_grad():
                logits_of(model, x)

        return run

    ours_logits = lambda m, t: m(t)  # noqa: E731
    hf_logits = lambda m, t: m(t).logits  # noqa: E731
    rows = []
    tokens = args.batch * args.seq
    t_hf = timed(step(hf, hf_logits), args.iters)
    t_ours = timed(step(ours, ours_logits), args.iters)
    ours.record_stats(True)
    t_ours_stats = timed(step(ours, ours_logits), args.iters)
    ours.record_stats(False)
    f_hf = timed(fwd(hf, hf_logits), args.iters)
    f_ours = timed(fwd(ours, ours_logits), args.iters)
    rows.append(("train step (fwd+bwd)", t_hf, t_ours, t_hf / t_ours))
    rows.append(("train step, recording max logits", t_hf, t_ours_stats, t_hf / t_ours_stats))
    rows.append(("forward (no grad)", f_hf, f_ours, f_hf / f_ours))

    from peak import describe, measure_peaks

    peaks = measure_peaks(torch.get_num_threads())
    fp32 = peaks["fp32 peak"]
    forward = flops_per_token(cfg, context=args.seq // 2)["forward"] * tokens
    flops = {"train step (fwd+bwd)": 3 * forward, "train step, recording max logits": 3 * forward}
    flops["forward (no grad)"] = forward
    print(
        f"preset={args.preset} batch={args.batch} seq={args.seq} threads={torch.get_num_threads()} "
        f"torch={torch.__version__} max|logit diff|={diff:.2e}"
    )
    print(describe(peaks))
    print(
        f"{'workload':<34} {'transformers s':>15} {'openk2 s':>10} {'speedup':>8} {'openk2 tok/s':>13}"
        f" {'openk2 GFLOP/s':>15} {'of fp32 peak':>13} {'transformers':>13}"
    )
    for name, a, b, r in rows:
        ours_gf, hf_gf = flops[name] / b / 1e9, flops[name] / a / 1e9
        print(
            f"{name:<34} {a:>15.3f} {b:>10.3f} {r:>7.2f}x {tokens / b:>13,.0f} {ours_gf:>15.1f}"
            f" {100 * ours_gf / fp32:>12.1f}% {100 * hf_gf / fp32:>12.1f}%"
        )


if __name__ == "__main__":
    main()
