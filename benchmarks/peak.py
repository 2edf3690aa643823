"""This machine's peaks: fp32 and bf16 matmul throughput on the best backend torch offers here, and
memory bandwidth. Every other benchmark divides its figures by these, measured in the same run.

    python benchmarks/peak.py [--threads N] [--size 1024] [--json out.json]

Machines of one kind differ (some CPUs have AVX512-BF16 or AMX, some only AVX2; MKL takes a slower
path on some AMD parts), so a speed is only meaningful as a fraction of what the same machine can do:

* fp32 matmul: `torch.matmul` (MKL on x86) and oneDNN (`torch.utils.mkldnn` linear, the kernel
  PyTorch's mkldnn fusion passes use); the peak is the better of the two.
* bf16 matmul: `torch.matmul` on bf16 tensors (oneDNN, using AVX512-BF16/AMX where present; emulated
  and slow elsewhere, which the ratio to fp32 shows).
* memory bandwidth: a copy of a buffer far larger than the caches (bytes read + written per second)
  and a sum over it (bytes read per second); the peak is the larger.

Each figure is the best of several timed repeats after a warm-up, at one thread and at all threads
(`--threads`), because a peak is what the hardware can reach, not what it usually does. At one
thread the timings are CPU seconds (`clock`), so a loaded machine still gives the core's figure.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch

from openk2.distributed.device import cpu_model_and_flags

ROWS = ("fp32 matmul, MKL", "fp32 matmul, oneDNN", "bf16 matmul", "memory, copy", "memory, sum")


def clock() -> Callable[[], float]:
    """The clock benchmarks time with: this process's CPU seconds at one torch thread (what the
    work costs, whatever else the machine runs; wall time on a shared machine is mostly waiting),
    wall-clock seconds with several threads (CPU seconds would add the threads up)."""
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def best_seconds(fn: Callable[[], object], repeats: int = 5, min_time: float = 0.2) -> float:
    """The fastest of `repeats` timings (`clock()`), each averaging enough calls to last `min_time`."""
    now = clock()
    fn()
    t0 = now()
    fn()
    once = max(now() - t0, 1e-6)
    calls = max(1, int(min_time / once))
    best = float("inf")
    for _ in range(repeats):
        t0 = now()
        for _ in range(calls):
            fn()
        best = min(best, (now() - t0) / calls)
    return best


def cpu_features() -> list[str]:
    _, flags = cpu_model_and_flags()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return [f for f in wanted if f in flags]


def measure_peaks(threads: int | None = None, size: int = 1024, repeats: int = 5) -> dict:
    """GFLOP/s of each matmul backend and GB/s of memory at `threads` torch threads (default: all)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        n = size
        flops = 2 * n**3
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = {"threads": torch.get_num_threads(), "size": n}
        out["fp32 matmul, MKL"] = flops / best_seconds(lambda: torch.matmul(a, b), repeats) / 1e9
        try:
            from torch.utils import mkldnn

            linear = mkldnn.to_mkldnn(torch.nn.Linear(n, n, bias=False).eval())
            x = a.to_mkldnn()
            with torch.no_grad():
                out["fp32 matmul, oneDNN"] = flops / best_seconds(lambda: linear(x), repeats) / 1e9
        except (RuntimeError, AttributeError):  # no oneDNN in this build
            out["fp32 matmul, oneDNN"] = 0.0
        a16, b16 = a.bfloat16(), b.bfloat16()
        out["bf16 matmul"] = flops / best_seconds(lambda: torch.matmul(a16, b16), repeats) / 1e9
        big = torch.empty(64 * 2**20 // 4 * 4)  # 256 MB of fp32: far beyond any cache
        big.uniform_()
        dst = torch.empty_like(big)
        nbytes = big.numel() * 4
        out["memory, copy"] = 2 * nbytes / best_seconds(lambda: dst.copy_(big), repeats) / 1e9
        out["memory, sum"] = nbytes / best_seconds(lambda: big.sum(), repeats) / 1e9
        out["fp32 peak"] = max(out["fp32 matmul, MKL"], out["fp32 matmul, oneDNN"])
        out["fp32 backend"] = "oneDNN" if out["fp32 matmul, oneDNN"] > out["fp32 matmul, MKL"] else "MKL"
        out["bf16 peak"] = out["bf16 matmul"]
        out["bandwidth peak"] = max(out["memory, copy"], out["memory, sum"])
        return out
    finally:
        torch.set_num_threads(previous)


def machine() -> dict:
    return {
        "cpu": cpu_model_and_flags()[0],
        "features": cpu_features(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }


def describe(peaks: dict) -> str:
    """One line naming the peaks, for the header of other benchmarks' tables."""
    m = machine()
    return (
        f"{m['cpu']} [{' '.join(m['features']) or 'no AVX'}], {peaks['threads']} thread(s): "
        f"fp32 peak {peaks['fp32 peak']:.0f} GFLOP/s ({peaks['fp32 backend']}), "
        f"bf16 peak {peaks['bf16 peak']:.0f} GFLOP/s, memory {peaks['bandwidth peak']:.1f} GB/s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="all threads when omitted")
    ap.add_argument("--size", type=int, default=1024, help="square matmul size")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    m = machine()
    print(f"{m['cpu']}; features: {' '.join(m['features']) or '-'}; {m['cores']} cores; torch {m['torch']}")
    runs = [measure_peaks(1, args.size, args.repeats)]
    if (args.threads or torch.get_num_threads()) != 1:
        runs.append(measure_peaks(args.threads, args.size, args.repeats))
    print(f"\n{'what':<24}" + "".join(f"{str(r['threads']) + ' thread(s)':>16}" for r in runs))
    for row in ROWS:
        unit = "GB/s" if row.startswith("memory") else "GFLOP/s"
        print(f"{row:<24}" + "".join(f"{r[row]:>11.1f} {unit:<4}" for r in runs))
    for r in runs:
        print(f"peak at {r['threads']} thread(s): {describe(r).split(': ', 1)[1]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": m, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
