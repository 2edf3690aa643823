"""Tokens/s and communication volume per step for each parallel layout, on CPU with gloo.

No GPU is available to this project's machine, so this measures the *mechanics* on 2 CPU cores: the
collectives are real (gloo over loopback), the model is small, and every process gets one thread.
Throughput on CPU says little about GPUs -- the point is the relative cost of each layout's
communication, and that every layout trains the same model (the loss after the timed steps is printed
next to the single-process one). Communication volume is what each rank sends per step, counted at
the call sites in openk2.distributed (all-reduce counted as a ring: 2 (n-1)/n of the buffer); the
pipeline's point-to-point activations/gradients are computed from their shapes.

    OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py [--preset tiny] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from openk2.config import ModelConfig
from openk2.distributed.dist_muon import DistributedMuon
from openk2.distributed.launch import spawn
from openk2.distributed.mesh import COMM, Mesh, ParallelConfig
from openk2.distributed.parallelize import ParallelModel
from openk2.model.transformer import Transformer
from openk2.optim.balance import update_routing_bias_

LAYOUTS = [
    dict(),
    dict(dp=2),
    dict(ep=2),
    dict(pp=2),
    dict(pp=2, virtual_stages=2),
    dict(dp=2, ep=2),
    dict(pp=2, ep=2),
]


def config(preset: str) -> ModelConfig:
    c = ModelConfig.from_preset(preset)
    c.num_hidden_layers = max(c.num_hidden_layers, 4)  # pp=2 x 2 virtual stages needs 4 layers
    return c


def worker(rank: int, world: int, layout: dict, args: argparse.Namespace, out: str) -> None:
    torch.manual_seed(0)
    c = config(args.preset)
    par = ParallelConfig(**layout, microbatches=2 if layout.get("pp", 1) > 1 else 0)
    mesh = Mesh.build(par)
    pm = ParallelModel(Transformer(c), mesh)
    opt = DistributedMuon(pm, lr=0.01, ns_dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, c.vocab_size, (args.steps + 1, args.batch, args.seq + 1), generator=g)
    times, loss = [], None
    for i in range(args.steps + 1):  # the first step is a warm-up
        COMM.reset()
        t0 = time.perf_counter()
        loss = pm.forward_backward(data[i, :, :-1], data[i, :, 1:])
        pm.reduce_stats()
        opt.step()
        for ch in pm.chunks:
            update_routing_bias_(ch, rate=0.01)
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    comm = dict(COMM.bytes)
    if par.pp > 1:  # activations forward and their gradients backward, per chunk boundary sent from here
        local = args.batch // mesh.batch_size
        boundaries = sum(1 for ch in pm.pipeline.ids if ch != par.pp * par.virtual_stages - 1)
        comm["pipeline p2p"] = 2 * boundaries * local * args.seq * c.hidden_size * 4
    if rank == 0:
        step = sum(times[1:]) / args.steps
        result = dict(step_s=step, tokens_s=args.batch * args.seq / step, comm=comm, loss=float(loss))
        with open(out, "w") as f:
            json.dump(result, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="global sequences per step")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--max-world", type=int, default=4)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"preset {args.preset} (>= 4 layers), global batch {args.batch} x {args.seq}, CPU + gloo, no GPU")
    head = f"{'layout':<22}{'procs':>6}{'tokens/s':>11}{'vs 1 proc':>11}{'comm MB/step/rank':>19}"
    print(head + "  breakdown (MB)")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        for layout in LAYOUTS:
            world = layout.get("pp", 1) * layout.get("dp", 1) * layout.get("ep", 1)
            if world > args.max_world:
                continue
            if world == 1:
                os.environ.update(MASTER_ADDR="127.0.0.1")
                worker(0, 1, layout, args, out)
            else:
                spawn(worker, world, layout, args, out)
            with open(out) as f:
                r = json.load(f)
            base = base or r
            name = " x ".join(f"{k}={v}" for k, v in layout.items()) or "single process"
            total = sum(r["comm"].values()) / 1e6
            parts = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in sorted(r["comm"].items()))
            print(
                f"{name:<22}{world:>6}{r['tokens_s']:>11.0f}{r['tokens_s'] / base['tokens_s']:>10.2f}x"
                f"{total:>19.2f}  {parts}   (loss {r['loss']:.5f} vs {base['loss']:.5f})"
            )


if __name__ == "__main__":
    main()
