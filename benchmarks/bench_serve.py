"""Serving benchmark: the openk2 engine against transformers' `generate`, in one run, on the same
`small` checkpoint (random weights, saved with `save_pretrained`; transformers loads it after
`openk2 export`). A greedy parity check first makes sure both run the same model.

Measures greedy decode tokens/s at batch 1 and with 16 concurrent requests, time to first token,
and cache bytes per token (ours: the latent pool; transformers: what its cache holds after a
forward, divided by the sequence length). transformers gets its best case at 16: one padded batch
of equal-length prompts, which a real server with staggered arrivals could not do.

The machine this was written on is shared (load average ~3-12 on 2 cores), so every repeat runs
transformers, ours and ours without W_uk/W_uv folding back to back (alternating who goes first), and
the table reports medians over repeats (the ratio: the median of the per-repeat ratios), with the
load average before and after. Run it with OMP_NUM_THREADS=1: with more
OpenMP threads than free cores, spinning workers make timings several times slower and noisier
(`torch.set_num_threads(1)` after start-up was not enough here; the environment variable is).

A second table times the MoE decode strategies the engine chose between (see openk2/model/moe.py)
on one MoE layer of the same model, interleaved the same way.

    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py [--new-tokens 64 --prompt-len 64 --repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from openk2 import ModelConfig
from openk2.checkpoint import load_model, save_model
from openk2.checkpoint.export import export
from openk2.model.layers import swiglu
from openk2.model.moe import MoE
from openk2.model.transformer import Transformer
from openk2.serve.engine import Engine
from openk2.serve.forward import CachedForward
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
    total = 0
    for layer in out.past_key_values.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total / prompt.shape[1]


def ours(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(decode tokens/s, mean time to first token): decode time is the run minus the prefill."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    total = time.perf_counter() - t0
    assert all(len(o.completions[0].token_ids) == new_tokens for o in outs)
    ttft = sum(o.time_to_first_token for o in outs) / len(outs)
    return len(prompts) * (new_tokens - 1) / (total - ttft), ttft


# ---------------------------------------------------------------------------------- MoE strategies
def moe_gather_bmm(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Index the stacked expert weights by the chosen ids (a copy per (token, expert) pair), bmm."""
    weights, ids, _ = moe.gate(x)
    ex, k = moe.experts, ids.shape[1]
    flat = ids.flatten()
    xr = x.repeat_interleave(k, dim=0).unsqueeze(-1)
    h = swiglu(torch.bmm(ex.gate_proj[flat], xr), torch.bmm(ex.up_proj[flat], xr))
    y = torch.bmm(ex.down_proj[flat], h).squeeze(-1).view(-1, k, x.shape[-1])
    return (y * weights.unsqueeze(-1)).sum(1) + moe.shared_experts(x)


def moe_dense(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token (no routing indices at all), weights zero for unchosen experts."""
    weights, ids, _ = moe.gate(x)
    ex = moe.experts
    e, i, d = ex.gate_proj.shape
    dense = torch.zeros(x.shape[0], e).scatter_(1, ids, weights)
    h = swiglu(F.linear(x, ex.gate_proj.view(e * i, d)), F.linear(x, ex.up_proj.view(e * i, d)))
    h = h.view(-1, e, i) * dense.unsqueeze(-1)
    return torch.bmm(h.transpose(0, 1), ex.down_proj.transpose(1, 2)).sum(0) + moe.shared_experts(x)


def moe_sorted(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The training path for any number of tokens: (token, expert) pairs sorted by expert."""
    weights, ids, _ = moe.gate(x)
    counts = torch.bincount(ids.flatten(), minlength=moe.n_experts)
    return moe.routed_local(x, weights, ids, counts) + moe.shared_experts(x)


def moe_table(model: Transformer, repeats: int) -> list[tuple[int, dict[str, float]]]:
    moe = next(b.mlp for b in model.layers.values() if isinstance(b.mlp, MoE))
    ways = {
        "engine (host loop / sorted)": moe,
        "model (sorted, all experts unbound)": lambda x: moe_sorted(moe, x),
        "gather chosen weights + bmm": lambda x: moe_gather_bmm(moe, x),
        "dense over all experts": lambda x: moe_dense(moe, x),
    }
    rows = []
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for n in (1, 16):
            x = torch.randn(n, model.config.hidden_size, generator=g)
            ref = moe(x)
            times: dict[str, list[float]] = {name: [] for name in ways}
            for _ in range(repeats):
                for name, fn in ways.items():
                    torch.testing.assert_close(fn(x), ref, atol=1e-5, rtol=1e-4)
                    t0 = time.perf_counter()
                    for _ in range(50):
                        fn(x)
                    times[name].append((time.perf_counter() - t0) / 50)
            rows.append((n, {name: statistics.median(t) for name, t in times.items()}))
    return rows


def mixed_workload(k: int, seed: int = 3) -> tuple[list[list[int]], list[int]]:
    """k requests as a server sees them: prompts of 8-120 tokens, 16-96 new tokens each."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 121, (k,), generator=g).tolist()
    new = torch.randint(16, 97, (k,), generator=g).tolist()
    return [torch.randint(0, 7936, (n,), generator=g).tolist() for n in lengths], new


def hf_padded_batch(model, prompts: list[list[int]], new: list[int]) -> float:
    """One left-padded batch run to the longest request's length (what `generate` can do with
    concurrent requests that arrive together); seconds."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max(new),
            min_new_tokens=max(new),
            do_sample=False,
            pad_token_id=0,
        )
    return time.perf_counter() - t0


def hf_one_at_a_time(model, prompts: list[list[int]], new: list[int]) -> float:
    """Each request alone, in arrival order (a server calling `generate` per request); seconds."""
    return sum(hf_generate(model, torch.tensor([p]), n) for p, n in zip(prompts, new))


def ours_mixed(engine: Engine, prompts: list[list[int]], new: list[int]) -> float:
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in new]
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    seconds = time.perf_counter() - t0
    assert [len(o.completions[0].token_ids) for o in outs] == new
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats; medians are reported")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd engine")
    args = ap.parse_args()
    from transformers import DeepseekV3ForCausalLM

    torch.set_flush_denormal(True)  # as `openk2 serve` does (random weights make denormals)
    load_before = os.getloadavg()
    torch.manual_seed(0)
    config = ModelConfig.from_preset("small")
    with tempfile.TemporaryDirectory() as tmp:
        # save_pretrained + `openk2 export` (what transformers needs: its fused-expert key layout)
        save_model(Transformer(config), f"{tmp}/ckpt")
        K2Tokenizer.default().save_pretrained(f"{tmp}/ckpt")
        export(f"{tmp}/ckpt", f"{tmp}/hf")
        model = load_model(f"{tmp}/ckpt", dtype=torch.float32)
        hf = DeepseekV3ForCausalLM.from_pretrained(f"{tmp}/hf", dtype=torch.float32).eval()
    tok = K2Tokenizer.default()
    k, n = args.concurrent, args.new_tokens
    engines = {"openk2 eager": Engine(model, tok, max_batch=k, max_seq_len=512)}
    unfolded = Engine(model, tok, max_batch=k, max_seq_len=512)
    unfolded.forward = CachedForward(model, unfolded.cache, fold=False)
    engines["openk2 eager, W_uk/W_uv unfolded"] = unfolded
    compile_seconds = None
    if not args.no_compile:
        t0 = time.perf_counter()
        engines["openk2 compiled"] = Engine(model, tok, max_batch=k, max_seq_len=512, compile=True)
        compile_seconds = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 7936, (k, args.prompt_len), generator=g)

    # Same model in both? Greedy continuations must agree before any timing means anything.
    with torch.no_grad():
        theirs = hf.generate(batch[:2], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    agree = {}
    for name, e in engines.items():
        mine = e.generate(batch[:2].tolist(), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        agree[name] = theirs[:, args.prompt_len :].tolist() == [o.completions[0].token_ids for o in mine]
        ours(e, batch[:2].tolist(), 4)  # warm-up
    hf_generate(hf, batch[:2], 2)

    def hf_run(prompts: torch.Tensor) -> tuple[float, float]:
        first = hf_generate(hf, prompts, 1)
        return len(prompts) * (n - 1) / (hf_generate(hf, prompts, n) - first), first

    mixed_prompts, mixed_new = mixed_workload(k)
    mixed_sides = {
        "transformers, one padded batch": lambda: hf_padded_batch(hf, mixed_prompts, mixed_new),
        "transformers, one request at a time": lambda: hf_one_at_a_time(hf, mixed_prompts, mixed_new),
    }
    for name, e in engines.items():
        mixed_sides[name] = lambda e=e: ours_mixed(e, mixed_prompts, mixed_new)
    runs: dict[tuple[int, str], list[tuple[float, float]]] = {}
    mixed: dict[str, list[float]] = {}
    for r in range(args.repeats):
        for size in (1, k):
            prompts = batch[:size]
            sides = [("transformers generate", lambda p=prompts: hf_run(p))]
            sides += [(name, lambda p=prompts, e=e: ours(e, p.tolist(), n)) for name, e in engines.items()]
            for who, fn in sides if r % 2 == 0 else sides[::-1]:  # alternate who goes first
                runs.setdefault((size, who), []).append(fn())
        items = list(mixed_sides.items())
        for who, fn in items if r % 2 == 0 else items[::-1]:
            mixed.setdefault(who, []).append(fn())
    moe_rows = moe_table(model, args.repeats)
    load_after = os.getloadavg()

    hf_bytes = hf_cache_bytes_per_token(hf, batch[:1])
    latent = config.num_hidden_layers * config.kv_cache_dim * 4
    print(
        f"small preset, fp32, torch threads={torch.get_num_threads()} "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), greedy, "
        f"medians of {args.repeats} interleaved repeats"
    )
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} (1 min)")
    if compile_seconds is not None:
        print(f"torch.compile of the decode step (engine start-up): {compile_seconds:.1f} s")
    print(f"greedy tokens identical to transformers: {agree}")
    print(
        f"\nDecode, prompt {args.prompt_len}, {n} new tokens each; "
        "transformers: one batch of equal-length prompts"
    )
    header = ["requests", "implementation", "decode tok/s", "vs transformers", "TTFT ms"]
    widths = [8, 34, 12, 15, 8]
    print(" | ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    for size in (1, k):
        hf_runs = runs[(size, "transformers generate")]
        for who in ["transformers generate", *engines]:
            mine = runs[(size, who)]
            # the ratio of each repeat (both ran back to back), then its median
            ratio = statistics.median(o[0] / h[0] for o, h in zip(mine, hf_runs))
            cells = [
                f"{size}",
                who,
                f"{statistics.median(m[0] for m in mine):.1f}",
                f"{ratio:.2f}x",
                f"{statistics.median(m[1] for m in mine) * 1e3:.1f}",
            ]
            print(" | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    useful = sum(mixed_new)
    print(
        f"\n{k} concurrent requests submitted together, prompts {min(map(len, mixed_prompts))}-"
        f"{max(map(len, mixed_prompts))} tokens, {min(mixed_new)}-{max(mixed_new)} new tokens each "
        f"({useful} in all); wall time includes prefill"
    )
    base = {w: mixed[w] for w in ("transformers, one padded batch", "transformers, one request at a time")}
    header = ["implementation", "wall s", "tok/s", "vs padded batch", "vs one at a time"]
    widths = [36, 7, 8, 15, 16]
    print(" | ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    for who, secs in mixed.items():
        ratios = [statistics.median(b / s for s, b in zip(secs, bs)) for bs in base.values()]
        wall = statistics.median(secs)
        cells = [who, f"{wall:.2f}", f"{useful / wall:.1f}", *(f"{x:.2f}x" for x in ratios)]
        print(" | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    print(
        f"\ncache bytes/token: ours {engines['openk2 eager'].cache.bytes_per_token} (latent size {latent}), "
        f"transformers {hf_bytes:.0f} ({hf_bytes / engines['openk2 eager'].cache.bytes_per_token:.1f}x ours)"
    )
    print("\nMoE layer, microseconds per call (median):")
    names = list(moe_rows[0][1])
    print(f"{'tokens':>6} | " + " | ".join(f"{name:>35}" for name in names))
    for tokens, times in moe_rows:
        print(f"{tokens:>6} | " + " | ".join(f"{times[name] * 1e6:>35.0f}" for name in names))


if __name__ == "__main__":
    main()
