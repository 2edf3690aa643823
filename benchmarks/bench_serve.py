"""Serving benchmark: the openk2 engine against transformers' `generate`, in one run, on the same
`small` checkpoint (random weights, saved with `save_pretrained`; transformers loads it after
`openk2 export`). A greedy parity check first makes sure both run the same model.

Measures greedy decode tokens/s at batch 1 and with 16 concurrent requests, time to first token, and
cache bytes per token (ours: the latent pool; transformers: whatever its DynamicCache holds after a
forward, divided by the sequence length). transformers gets its best case at 16: one padded batch of
equal-length prompts, which a real server with staggered arrivals could not do.

    OMP_NUM_THREADS=2 python benchmarks/bench_serve.py [--new-tokens 64 --prompt-len 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from openk2 import ModelConfig
from openk2.checkpoint.export import export
from openk2.model.transformer import Transformer
from openk2.serve.engine import Engine
from openk2.serve.sampling import SamplingParams
from openk2.tokenizer.tokenizer import K2Tokenizer


def hf_generate(model, prompts: torch.Tensor, new_tokens: int) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return time.perf_counter() - t0


def hf_cache_bytes_per_token(model, prompt: torch.Tensor) -> float:
    with torch.no_grad():
        out = model(prompt, use_cache=True)
    cache = out.past_key_values
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total / prompt.shape[1]


def ours(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(seconds for the whole run, mean time to first token)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    total = time.perf_counter() - t0
    assert all(len(o.completions[0].token_ids) == new_tokens for o in outs)
    return total, sum(o.time_to_first_token for o in outs) / len(outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="best of N timings")
    args = ap.parse_args()
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = ModelConfig.from_preset("small")
    with tempfile.TemporaryDirectory() as tmp:
        # save_pretrained + `openk2 export` (what transformers needs: its fused-expert key layout)
        Transformer(config).save_pretrained(f"{tmp}/ckpt")
        K2Tokenizer.default().save_pretrained(f"{tmp}/ckpt")
        export(f"{tmp}/ckpt", f"{tmp}/hf")
        model = Transformer.from_pretrained(f"{tmp}/ckpt", dtype=torch.float32)
        hf = DeepseekV3ForCausalLM.from_pretrained(f"{tmp}/hf", dtype=torch.float32).eval()
    engine = Engine(model, K2Tokenizer.default(), max_batch=args.concurrent, max_seq_len=512)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 7936, (args.concurrent, args.prompt_len), generator=g)
    n, k = args.new_tokens, args.concurrent

    def best(fn):
        return min((fn() for _ in range(args.repeats)), key=lambda r: r[0] if isinstance(r, tuple) else r)

    # Same model in both? Greedy continuations must agree before any timing means anything.
    with torch.no_grad():
        theirs = hf.generate(batch[:1], max_new_tokens=8, min_new_tokens=8, do_sample=False)[
            0, args.prompt_len :
        ]
    mine = engine.generate(batch[:1].tolist(), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    agree = theirs.tolist() == mine[0].completions[0].token_ids
    ours(engine, batch[:2].tolist(), 4)  # warm-up
    rows = []
    for size in (1, k):
        prompts = batch[:size]
        hf_first = best(lambda p=prompts: hf_generate(hf, p, 1))
        hf_total = best(lambda p=prompts: hf_generate(hf, p, n))
        our_total, our_ttft = best(lambda p=prompts: ours(engine, p.tolist(), n))
        hf_tps = size * (n - 1) / (hf_total - hf_first)
        our_tps = size * (n - 1) / (our_total - our_ttft)
        rows.append((size, hf_tps, our_tps, hf_first, our_ttft))
    hf_bytes = hf_cache_bytes_per_token(hf, batch[:1])
    latent = config.num_hidden_layers * config.kv_cache_dim * 4
    print(
        f"small preset, fp32, CPU threads={torch.get_num_threads()}, prompt {args.prompt_len}, {n} new tokens"
    )
    print(f"greedy tokens identical to transformers: {agree}")
    header = ["requests", "HF tok/s", "ours tok/s", "ratio", "HF TTFT ms", "ours TTFT ms"]
    print(" | ".join(f"{h:>10}" for h in header))
    for size, hf_tps, our_tps, hf_first, our_ttft in rows:
        cells = [f"{size}", f"{hf_tps:.1f}", f"{our_tps:.1f}", f"{our_tps / hf_tps:.2f}x"]
        cells += [f"{hf_first * 1e3:.1f}", f"{our_ttft * 1e3:.1f}"]
        print(" | ".join(f"{c:>10}" for c in cells))
    print(
        f"cache bytes/token: ours {engine.cache.bytes_per_token} (latent size {latent}), "
        f"transformers {hf_bytes:.0f} ({hf_bytes / engine.cache.bytes_per_token:.1f}x ours)"
    )


if __name__ == "__main__":
    main()
