"""Training-step and forward speed of openk2 vs transformers' DeepseekV3ForCausalLM, same weights, one
run, in fp32 and in bf16 autocast (`openk2 train --precision bf16`: fp32 weights, bf16 matmuls).

    python benchmarks/bench_model.py [--preset small] [--batch 8] [--seq 256] [--iters 5]
        [--precision fp32 bf16] [--threads 1]

Both models run on the CPU with the same thread count and, row by row, the same precision. openk2 is
timed twice for the training step: with its default SDPA attention, and with the explicit-logits
attention that records the per-head max logit for QK-Clip (what `openk2 train` uses). Each figure is
also given as model GFLOP/s (3x the forward matmul FLOPs for a training step) and as a fraction of
this machine's matmul peak in the row's precision (fp32: the better of MKL and oneDNN; bf16),
measured by `benchmarks/peak.py` in the same run at the same thread count. At one thread every time
is CPU seconds (`peak.clock`), the median of `--iters` after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from openk2 import ModelConfig, Transformer
from openk2.checkpoint import save_model
from openk2.model.size import flops_per_token


def timed(fn, iters: int, warmup: int = 1) -> float:
    from peak import clock

    now = clock()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = now()
        fn()
        times.append(now() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import DeepseekV3ForCausalLM

    from openk2.distributed.device import autocast_context

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
    cpu = torch.device("cpu")

    def step(model, logits_of, precision):
        def run():
            model.zero_grad(set_to_none=True)
            with autocast_context(cpu, precision):
                logits = logits_of(model, x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            loss.backward()

        return run

    def fwd(model, logits_of, precision):
        def run():
            with torch.no_grad(), autocast_context(cpu, precision):
                logits_of(model, x)

        return run

    ours_logits = lambda m, t: m(t)  # noqa: E731
    hf_logits = lambda m, t: m(t).logits  # noqa: E731
    tokens = args.batch * args.seq
    forward = flops_per_token(cfg, context=args.seq // 2)["forward"] * tokens
    rows = []
    for precision in args.precision:
        t_hf = timed(step(hf, hf_logits, precision), args.iters)
        t_ours = timed(step(ours, ours_logits, precision), args.iters)
        ours.record_stats(True)
        t_ours_stats = timed(step(ours, ours_logits, precision), args.iters)
        ours.record_stats(False)
        f_hf = timed(fwd(hf, hf_logits, precision), args.iters)
        f_ours = timed(fwd(ours, ours_logits, precision), args.iters)
        rows.append((precision, "train step (fwd+bwd)", 3 * forward, t_hf, t_ours))
        rows.append((precision, "train step, recording max logits", 3 * forward, t_hf, t_ours_stats))
        rows.append((precision, "forward (no grad)", forward, f_hf, f_ours))

    from peak import describe, measure_peaks

    peaks = measure_peaks(torch.get_num_threads())
    print(
        f"preset={args.preset} batch={args.batch} seq={args.seq} threads={torch.get_num_threads()} "
        f"torch={torch.__version__} max|logit diff| (fp32)={diff:.2e}; "
        f"{'CPU' if torch.get_num_threads() == 1 else 'wall'} seconds, median of {args.iters}"
    )
    print(describe(peaks))
    print(
        f"{'precision':<10}{'workload':<34} {'transformers s':>15} {'openk2 s':>10} {'speedup':>8} "
        f"{'openk2 tok/s':>13} {'GFLOP/s':>8} {'of peak':>8} {'transformers':>13}"
    )
    for precision, name, flops, a, b in rows:
        peak = peaks[f"{precision} peak"]
        ours_gf, hf_gf = flops / b / 1e9, flops / a / 1e9
        print(
            f"{precision:<10}{name:<34} {a:>15.3f} {b:>10.3f} {a / b:>7.2f}x {tokens / b:>13,.0f} "
            f"{ours_gf:>8.1f} {100 * ours_gf / peak:>7.1f}% {100 * hf_gf / peak:>12.1f}%"
        )
    if len(args.precision) == 2:
        t = {p: b for p, name, _, _, b in rows if name == "train step, recording max logits"}
        print(
            f"bf16 autocast training step (recording max logits): {t['fp32'] / t['bf16']:.2f}x fp32's speed"
        )


if __name__ == "__main__":
    main()
