"""Peak memory and step time of one training step with each memory option on and off.

    python benchmarks/bench_memory.py [--preset small] [--batch-size 8] [--seq-len 256]

Every configuration runs in a fresh subprocess. On CUDA the peak is torch.cuda.max_memory_allocated
during forward + backward, minus the memory held before it (weights, grads, optimizer state); on CPU it
is the process's peak resident set (ru_maxrss) during the step minus the resident set before it, a
coarser measure (the allocator's behaviour shows in it) but the same quantity: activation memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = {
    "baseline": {},
    "recompute": {"recompute": True},
    "fp8 activations": {"fp8_activations": True},
    "offload": {"offload": True},
    "all three": {"recompute": True, "fp8_activations": True, "offload": True},
}


def one(args) -> dict:
    from openk2 import ModelConfig, Transformer
    from openk2.train.data import Batch
    from openk2.train.loop import TrainConfig, Trainer, build_optimizer
    from openk2.train.memory import MemoryOptions
    from openk2.train.schedule import Schedule

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(args.preset)).to(device)
    cfg = TrainConfig(memory=MemoryOptions(**CONFIGS[args.one]), progress=False)
    trainer = Trainer(model, build_optimizer(model, cfg), Schedule("constant", 100, 0), cfg, device)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len + 1))
    batch = Batch(ids[:, :-1], ids[:, 1:])
    trainer.train_step([batch])  # warm-up: optimizer state, allocator pools
    times = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            held = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t = time.perf_counter()
        trainer.train_step([batch])
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - held
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - held
    return {"config": args.one, "peak_bytes": peak, "step_s": min(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    rows = []
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--one", name, "--preset", args.preset, "--batch-size",
               str(args.batch_size), "--seq-len", str(args.seq_len), "--repeats", str(args.repeats),
               "--device", args.device]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if out.returncode != 0:
            raise SystemExit(f"{name} failed:\n{out.stderr}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    measure = "peak allocated" if args.device.startswith("cuda") else "peak RSS growth"
    print(f"{args.preset} preset, batch {args.batch_size} x {args.seq_len} tokens, device {args.device}")
    print(f"{'configuration':<18} {measure + ' (MiB)':>24} {'ratio':>7} {'step (s)':>10} {'ratio':>7}")
    for r in rows:
        mib, ratio = r["peak_bytes"] / 2**20, r["peak_bytes"] / base["peak_bytes"]
        print(
            f"{r['config']:<18} {mib:>24.1f} {ratio:>6.2f}x "
            f"{r['step_s']:>10.3f} {r['step_s'] / base['step_s']:>6.2f}x"
        )


if __name__ == "__main__":
    main()
