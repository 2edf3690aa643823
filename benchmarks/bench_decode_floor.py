"""Where a decode step's time goes, and the floor under it: the figures docs/serving.md uses to say
why the 16-request goal is out of reach on a CPU in fp32.

Prints, for the `small` preset on this machine (one torch thread):
  * memory streaming bandwidth (a sum over a 256 MB tensor, which no cache holds);
  * the weight bytes a decode step of n tokens must read (attention, dense and shared weights, the
    LM head, and the routed experts that n tokens x top-k are expected to hit), and the time that
    takes at the measured bandwidth: the floor for a step that did no arithmetic at all;
  * the arithmetic of the step's weight matmuls (MFLOP), and the LM head alone (n x hidden x vocab);
  * the eager and the compiled decode step;
  * bf16 with compile=True: how many greedy tokens equal the eager bf16 engine's (`tiny`).

    OMP_NUM_THREADS=1 python benchmarks/bench_decode_floor.py
"""

from __future__ import annotations

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
from openk2.serve.sampling import SamplingParams
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


def bf16_agreement() -> tuple[int, int]:
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny")
    config.max_position_embeddings = 256
    model = Transformer(config).eval().to(torch.bfloat16)
    tok = K2Tokenizer.byte_level()
    prompts = [tok.encode(t) for t in ("hello world", "a", "The quick brown fox")]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    eager = Engine(model, tok, max_batch=4, max_seq_len=256).generate(prompts, params)
    fast = Engine(model, tok, max_batch=4, max_seq_len=256, compile=True).generate(prompts, params)
    pairs = [
        (a, b)
        for x, y in zip(eager, fast)
        for a, b in zip(x.completions[0].token_ids, y.completions[0].token_ids)
    ]
    return sum(a == b for a, b in pairs), len(pairs)


def main() -> None:
    torch.set_flush_denormal(True)
    big = torch.randn(64 * 2**20)  # 256 MB
    bandwidth = big.numel() * 4 / timed(big.sum, inner=3)
    del big
    print(f"torch threads {torch.get_num_threads()}; streaming bandwidth {bandwidth / 1e9:.1f} GB/s")

    torch.manual_seed(0)
    config = ModelConfig.from_preset("small")
    model = Transformer(config).eval()
    cache = LatentCache(config, 16, 512)
    cache.kv.normal_()
    eager = CachedForward(model, cache)
    compiled = CachedForward(model, cache, compile=True)
    t0 = time.perf_counter()
    compiled.warm_up()
    print(f"compile (two graphs): {time.perf_counter() - t0:.1f} s")

    header = ["tokens", "weight MB", "read floor ms", "MFLOP", "LM head ms", "eager ms", "compiled ms"]
    print(" | ".join(f"{h:>13}" for h in header))
    with torch.inference_mode():
        for n in (1, 16):
            tokens, pos = torch.randint(0, 7936, (n,)), torch.full((n,), 64)
            x = torch.randn(n, config.hidden_size)
            head = timed(lambda x=x: F.linear(x, model.lm_head.weight))
            ours = timed(lambda t=tokens, p=pos: eager.decode(t, p, 65))
            fast = timed(lambda t=tokens, p=pos: compiled.decode(t, p, 65))
            weight = step_bytes(model, n)
            cells = [n, weight / 1e6, weight / bandwidth * 1e3, step_flops(model, n) / 1e6, head * 1e3]
            cells += [ours * 1e3, fast * 1e3]
            print(" | ".join(f"{c:>13}" if isinstance(c, int) else f"{c:>13.2f}" for c in cells))
    same, total = bf16_agreement()
    print(f"bf16, compile=True vs eager (tiny, greedy): {same} of {total} tokens equal")


if __name__ == "__main__":
    main()
