"""Where a decode step's time goes, the floor under it, and what bf16 weights buy and cost: the
figures docs/serving.md uses for the 16-request goal.

Prints, for the `small` preset on this machine (one torch thread), in fp32 and bf16:
  * this machine's peaks (benchmarks/peak.py, same run): memory bandwidth and the matmul peak of
    each dtype;
  * the weight bytes a decode step of n tokens must read (attention, dense and shared weights, the
    LM head, and the routed experts that n tokens x top-k are expected to hit), and the time that
    takes at the measured bandwidth: the floor for a step that did no arithmetic at all;
  * the arithmetic of the step's weight matmuls (MFLOP), and the LM head alone (n x hidden x vocab);
  * the eager and the compiled decode step, and the bandwidth the compiled one achieves (weight
    bytes / step time) as a fraction of the measured peak;
  * bf16 against fp32 on the serving path (openk2/serve/precision.py): teacher-forced logit error and
    argmax agreement, free-running greedy agreement, over N prompts x M new tokens, for the eager and
    the compiled bf16 engine.

    OMP_NUM_THREADS=1 python benchmarks/bench_decode_floor.py [--prompts 16 --tokens 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from openk2 import ModelConfig
from openk2.model.moe import MoE
from openk2.model.transformer import Transformer
from openk2.serve.cache import LatentCache
from openk2.serve.engine import Engine
from openk2.serve.forward import CachedForward
from openk2.serve.precision import compare_precision
from openk2.tokenizer.tokenizer import K2Tokenizer


def timed(fn, repeats: int = 7, inner: int = 20) -> float:
    """Median seconds per call over `repeats` batches of `inner` calls, after a warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def step_bytes(model: Transformer, n: int) -> float:
    """Weight bytes one decode step of n tokens reads: everything but the embedding table (one row a
    token) and the routed experts, plus the routed experts n x top-k picks are expected to hit."""
    total = 0.0
    for name, p in model.named_parameters():
        if name.startswith("embed_tokens"):
            continue
        size = p.numel() * p.element_size()
        if ".experts." in name:  # stacked (E, ...): expected distinct experts hit by n * k picks
            e = p.shape[0]
            k = next(b.mlp.gate.top_k for b in model.layers.values() if isinstance(b.mlp, MoE))
            size *= 1 - (1 - 1 / e) ** (n * k)
        total += size
    return total


def step_flops(model: Transformer, n: int) -> float:
    """Multiply-adds x 2 of the weight matmuls of one decode step of n tokens (attention over the
    cache left out): every weight but the embedding table, the routed experts at top-k / E."""
    total = 0.0
    for name, p in model.named_parameters():
        if name.startswith("embed_tokens") or p.dim() < 2:
            continue
        size = p.numel()
        if ".experts." in name:
            k = next(b.mlp.gate.top_k for b in model.layers.values() if isinstance(b.mlp, MoE))
            size *= k / p.shape[0]
        total += 2 * n * size
    return total


def quality(model: Transformer, prompts: int, tokens: int, compile: bool) -> str:
    """bf16 engine (eager or compiled) against the fp32 eager engine on random `small` prompts."""
    tok = K2Tokenizer.default()
    g = torch.Generator().manual_seed(5)
    ps = [
        torch.randint(0, 7936, (int(n),), generator=g).tolist()
        for n in torch.randint(8, 65, (prompts,), generator=g)
    ]
    low = Transformer(model.config).eval()
    low.load_state_dict(model.state_dict())
    low = low.to(torch.bfloat16)
    fp32 = Engine(model, tok, max_batch=16, max_seq_len=256, prefix_cache_tokens=0)
    bf16 = Engine(low, tok, max_batch=16, max_seq_len=256, prefix_cache_tokens=0, compile=compile)
    return compare_precision(fp32, bf16, ps, tokens).summary()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16, help="prompts of the bf16 quality report")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per prompt in the quality report")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    from peak import describe, measure_peaks

    torch.set_flush_denormal(True)
    peaks = measure_peaks(torch.get_num_threads(), repeats=3)
    bandwidth = peaks["bandwidth peak"] * 1e9
    print(describe(peaks))
    print(f"load average {os.getloadavg()[0]:.1f} (1 min)")

    torch.manual_seed(0)
    config = ModelConfig.from_preset("small")
    base = Transformer(config).eval()
    header = [
        "dtype",
        "tokens",
        "weight MB",
        "read floor ms",
        "MFLOP",
        "LM head ms",
        "eager ms",
        "compiled ms",
    ]
    header += ["compiled GB/s", "of bw peak", "of mm peak"]
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name.strip())
        model = Transformer(config).eval()
        model.load_state_dict(base.state_dict())
        model = model.to(dtype)
        cache = LatentCache(config, 16, 512, dtype=dtype)
        cache.kv.normal_()
        eager = CachedForward(model, cache)
        compiled = CachedForward(model, cache, compile=True)
        t0 = time.perf_counter()
        compiled.warm_up()
        print(f"{name}: compile (two graphs) {time.perf_counter() - t0:.1f} s", flush=True)
        peak = peaks["bf16 peak" if dtype == torch.bfloat16 else "fp32 peak"] * 1e9
        with torch.inference_mode():
            for n in (1, 16):
                tokens, pos = torch.randint(0, 7936, (n,)), torch.full((n,), 64)
                x = torch.randn(n, config.hidden_size, dtype=dtype)
                head = timed(lambda x=x, w=model.lm_head.weight: F.linear(x, w))
                ours = timed(lambda t=tokens, p=pos, f=eager: f.decode(t, p, 65))
                fast = timed(lambda t=tokens, p=pos, f=compiled: f.decode(t, p, 65))
                weight, flops = step_bytes(model, n), step_flops(model, n)
                cells = [name, n, weight / 1e6, weight / bandwidth * 1e3, flops / 1e6, head * 1e3]
                cells += [
                    ours * 1e3,
                    fast * 1e3,
                    weight / fast / 1e9,
                    weight / fast / bandwidth,
                    flops / fast / peak,
                ]
                rows.append(cells)
    print(" | ".join(f"{h:>13}" for h in header))
    for cells in rows:
        out = []
        for i, c in enumerate(cells):
            if isinstance(c, str) or isinstance(c, int):
                out.append(f"{c:>13}")
            elif i >= 9:
                out.append(f"{c:>13.1%}")
            else:
                out.append(f"{c:>13.2f}")
        print(" | ".join(out))
    print(f"\nbf16 against fp32 ({args.prompts} random prompts of 8-64 tokens, greedy):")
    for compile in (False, True):
        report = quality(base, args.prompts, args.tokens, compile)
        print(f"  bf16 {'compiled' if compile else 'eager'}: {report}")


if __name__ == "__main__":
    main()
