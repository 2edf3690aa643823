"""Serving benchmark: the openk2 engine against transformers' `generate`, in one run, on the same
`small` checkpoint (random weights, saved with `save_model`; transformers loads it after `openk2
export`), in each precision asked for (fp32 and bf16 by default, both sides in the same dtype). A
greedy parity check first makes sure both run the same model.

Measures greedy decode tokens/s at batch 1 and with 16 concurrent requests, time to first token,
and cache bytes per token (ours: the latent pool; transformers: what its cache holds after a
forward, divided by the sequence length). transformers gets its best case at 16: one padded batch
of equal-length prompts, which a real server with staggered arrivals could not do.

Every decode figure is also put against this machine's peaks, measured in the same run
(benchmarks/peak.py): the weight bytes a step must read (bench_decode_floor.step_bytes) over the
step's time is the bandwidth it achieves, as a fraction of the measured memory bandwidth (decode of
a small batch is bandwidth-bound); its weight-matmul FLOPs over the time, as a fraction of the
matmul peak of its dtype.

A last table times the first token of requests that share a long system prompt and tool list
(~900 tokens rendered with the K2 chat template), with the prefix cache off and on (warm: an
earlier request brought the shared prefix in; each timed request has its own question), alone and
16 submitted together.

The machine this was written on is shared (load average ~3-14 on 2 cores), so every repeat runs
transformers and ours back to back (alternating who goes first), and the tables report medians over
repeats (the ratio: the median of the per-repeat ratios), with the load average before and after.
Run it with OMP_NUM_THREADS=1: with more OpenMP threads than free cores, spinning workers make
timings several times slower and noisier.

A MoE table times the decode strategies the engine chose between (see openk2/model/moe.py) on one
MoE layer (fp32; `--moe-table`).

    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py [--dtypes float32,bfloat16 --repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from bench_decode_floor import step_bytes, step_flops

from openk2 import ModelConfig
from openk2.checkpoint import load_model, save_model
from openk2.checkpoint.export import export
from openk2.model.layers import swiglu
from openk2.model.moe import MoE
from openk2.model.transformer import Transformer
from openk2.serve.engine import Engine
from openk2.serve.forward import CachedForward
from openk2.serve.sampling import SamplingParams
from openk2.tokenizer.chat import encode_chat
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


SYSTEM_RULE = (
    "Rule {i}: when the user asks about an order, a delivery or a refund, look the facts up with the "
    "tools first, quote the order number back, and never promise a date the tools did not give. "
)


def shared_prefix_prompts(tok: K2Tokenizer, count: int, system_rules: int, offset: int) -> list[list[int]]:
    """`count` chat prompts with one long system prompt and tool list and each its own question."""
    system = "You are the support assistant of an online shop. " + "".join(
        SYSTEM_RULE.format(i=i) for i in range(system_rules)
    )
    tools = [
        {
            "type": "function",
            "function": {
                "name": name,
                "description": f"{name.replace('_', ' ')} for the customer's order",
                "parameters": {
                    "type": "object",
                    "properties": {"order_id": {"type": "string"}, "note": {"type": "string"}},
                    "required": ["order_id"],
                },
            },
        }
        for name in ("get_order", "track_delivery", "start_refund", "cancel_order", "update_address")
    ]
    return [
        encode_chat(
            tok,
            [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Where is my order {1000 + offset + i}? It was due on day {i}."},
            ],
            tools,
            add_generation_prompt=True,
        ).ids
        for i in range(count)
    ]


def ttft(engine: Engine, prompts: list[list[int]]) -> float:
    """Mean seconds to the first token of `prompts` submitted together (one token each)."""
    outs = engine.generate(prompts, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    return statistics.mean(o.time_to_first_token for o in outs)


def prefix_table(model: Transformer, tok: K2Tokenizer, k: int, repeats: int, rules: int) -> list[tuple]:
    """(requests, prompt tokens, shared tokens, TTFT off, TTFT on, hit rate) for 1 and k requests."""
    off = Engine(model, tok, max_batch=k, max_seq_len=1024, prefix_cache_tokens=0)
    on = Engine(model, tok, max_batch=k, max_seq_len=1024, prefix_cache_tokens=16384)
    warm = shared_prefix_prompts(tok, 1, rules, offset=10_000)
    shared = next(
        i for i, (a, b) in enumerate(zip(warm[0], shared_prefix_prompts(tok, 1, rules, 0)[0])) if a != b
    )
    ttft(on, warm)  # the shared prefix is now cached
    ttft(off, warm)
    rows = []
    for size in (1, k):
        times: dict[str, list[float]] = {"off": [], "on": []}
        hits_before = (on.prefix_cache.hit_tokens, on.prefix_cache.queried_tokens)
        for r in range(repeats):
            prompts = shared_prefix_prompts(tok, size, rules, offset=100 * (r + 1) + size)
            sides = [("off", off), ("on", on)]
            for name, eng in sides if r % 2 == 0 else sides[::-1]:
                times[name].append(ttft(eng, prompts))
        hit = (on.prefix_cache.hit_tokens - hits_before[0]) / (
            on.prefix_cache.queried_tokens - hits_before[1]
        )
        length = len(shared_prefix_prompts(tok, 1, rules, 0)[0])
        rows.append(
            (size, length, shared, statistics.median(times["off"]), statistics.median(times["on"]), hit)
        )
    return rows


def run_dtype(dtype: torch.dtype, ckpt: str, hf_dir: str, args, peaks: dict) -> None:
    """Every table for one precision, transformers in the same dtype."""
    from transformers import DeepseekV3ForCausalLM

    name = str(dtype).removeprefix("torch.")
    load_before = os.getloadavg()
    model = load_model(ckpt, dtype=dtype)
    hf = DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
    tok = K2Tokenizer.default()
    k, n = args.concurrent, args.new_tokens
    engines = {"openk2 eager": Engine(model, tok, max_batch=k, max_seq_len=512)}
    if dtype == torch.float32 and args.unfolded:
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

    # Same model in both? Greedy continuations must agree before any timing means anything (in
    # bf16 the two round differently, so a late token may differ: the count is printed).
    with torch.no_grad():
        theirs = hf.generate(batch[:2], max_new_tokens=8, min_new_tokens=8, do_sample=False)[
            :, args.prompt_len :
        ]
    agree = {}
    for who, e in engines.items():
        mine = e.generate(batch[:2].tolist(), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        pairs = [(a, b) for o, t in zip(mine, theirs.tolist()) for a, b in zip(o.completions[0].token_ids, t)]
        agree[who] = f"{sum(a == b for a, b in pairs)}/{len(pairs)}"
        ours(e, batch[:2].tolist(), 4)  # warm-up
    hf_generate(hf, batch[:2], 2)

    def hf_run(prompts: torch.Tensor) -> tuple[float, float]:
        first = hf_generate(hf, prompts, 1)
        return len(prompts) * (n - 1) / (hf_generate(hf, prompts, n) - first), first

    mixed_prompts, mixed_new = mixed_workload(k)
    mixed_sides = {
        "transformers, one padded batch": lambda: hf_padded_batch(hf, mixed_prompts, mixed_new),
    }
    if args.one_at_a_time:
        mixed_sides["transformers, one request at a time"] = lambda: hf_one_at_a_time(
            hf, mixed_prompts, mixed_new
        )
    for who, e in engines.items():
        mixed_sides[who] = lambda e=e: ours_mixed(e, mixed_prompts, mixed_new)
    runs: dict[tuple[int, str], list[tuple[float, float]]] = {}
    mixed: dict[str, list[float]] = {}
    for r in range(args.repeats):
        for size in (1, k):
            prompts = batch[:size]
            sides = [("transformers generate", lambda p=prompts: hf_run(p))]
            sides += [(who, lambda p=prompts, e=e: ours(e, p.tolist(), n)) for who, e in engines.items()]
            for who, fn in sides if r % 2 == 0 else sides[::-1]:  # alternate who goes first
                runs.setdefault((size, who), []).append(fn())
        items = list(mixed_sides.items())
        for who, fn in items if r % 2 == 0 else items[::-1]:
            mixed.setdefault(who, []).append(fn())
    prefix_rows = prefix_table(model, tok, k, args.repeats, args.system_rules)
    load_after = os.getloadavg()

    hf_bytes = hf_cache_bytes_per_token(hf, batch[:1])
    ours_bytes = engines["openk2 eager"].cache.bytes_per_token
    matmul_peak = peaks["bf16 peak" if dtype == torch.bfloat16 else "fp32 peak"]
    print(f"\n======== {name} (openk2 and transformers both in {name}) ========")
    print(
        f"small preset, {name}, torch threads={torch.get_num_threads()} "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), greedy, "
        f"medians of {args.repeats} interleaved repeats"
    )
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} (1 min)")
    if compile_seconds is not None:
        print(f"torch.compile of the decode step (engine start-up): {compile_seconds:.1f} s")
    print(f"greedy tokens equal to transformers' (2 prompts x 8): {agree}")
    print(
        f"\nDecode, prompt {args.prompt_len}, {n} new tokens each; transformers: one batch of "
        f"equal-length prompts. Weight bytes a step reads / step time = achieved bandwidth, against the "
        f"measured {peaks['bandwidth peak']:.1f} GB/s; weight-matmul GFLOP/s against the {name} matmul "
        f"peak {matmul_peak:.0f} GFLOP/s"
    )
    header = ["requests", "implementation", "decode tok/s", "vs transformers", "TTFT ms", "MB/step", "GB/s"]
    header += ["of bw peak", "GFLOP/s", "of mm peak"]
    widths = [8, 34, 12, 15, 8, 8, 6, 10, 8, 10]
    print(" | ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    for size in (1, k):
        hf_runs = runs[(size, "transformers generate")]
        weight, flops = step_bytes(model, size), step_flops(model, size)
        for who in ["transformers generate", *engines]:
            mine = runs[(size, who)]
            # the ratio of each repeat (both ran back to back), then its median
            ratio = statistics.median(o[0] / h[0] for o, h in zip(mine, hf_runs))
            tok_s = statistics.median(m[0] for m in mine)
            step = size / tok_s
            gbs, gflops = weight / step / 1e9, flops / step / 1e9
            cells = [
                f"{size}",
                who,
                f"{tok_s:.1f}",
                f"{ratio:.2f}x",
                f"{statistics.median(m[1] for m in mine) * 1e3:.1f}",
                f"{weight / 1e6:.1f}",
                f"{gbs:.1f}",
                f"{gbs / peaks['bandwidth peak']:.0%}",
                f"{gflops:.1f}",
                f"{gflops / matmul_peak:.1%}",
            ]
            print(" | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    useful = sum(mixed_new)
    print(
        f"\n{k} concurrent requests submitted together, prompts {min(map(len, mixed_prompts))}-"
        f"{max(map(len, mixed_prompts))} tokens, {min(mixed_new)}-{max(mixed_new)} new tokens each "
        f"({useful} in all); wall time includes prefill"
    )
    base = {w: mixed[w] for w in mixed if w.startswith("transformers")}
    header = ["implementation", "wall s", "tok/s", *(f"vs {w.removeprefix('transformers, ')}" for w in base)]
    widths = [36, 7, 8] + [22] * len(base)
    print(" | ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    for who, secs in mixed.items():
        ratios = [statistics.median(b / s for s, b in zip(secs, bs)) for bs in base.values()]
        wall = statistics.median(secs)
        cells = [who, f"{wall:.2f}", f"{useful / wall:.1f}", *(f"{x:.2f}x" for x in ratios)]
        print(" | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    print(
        f"\ncache bytes/token: ours {ours_bytes} (latent size), "
        f"transformers {hf_bytes:.0f} ({hf_bytes / ours_bytes:.1f}x ours)"
    )
    print(
        f"\nTime to first token, shared system prompt + 5 tools ({prefix_rows[0][2]} shared tokens of "
        f"{prefix_rows[0][1]}), openk2 eager prefill, prefix cache warm"
    )
    header = ["requests", "prompt tokens", "shared", "TTFT off ms", "TTFT on ms", "saving", "hit rate"]
    widths = [8, 13, 6, 11, 10, 7, 8]
    print(" | ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    for size, length, shared, t_off, t_on, hit in prefix_rows:
        cells = [size, length, shared, f"{t_off * 1e3:.1f}", f"{t_on * 1e3:.1f}", f"{t_off / t_on:.1f}x"]
        cells.append(f"{hit:.0%}")
        print(" | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats; medians are reported")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd engine")
    ap.add_argument("--unfolded", action="store_true", help="also the unfolded W_uk/W_uv engine (fp32)")
    ap.add_argument("--one-at-a-time", action="store_true", help="also transformers one request at a time")
    ap.add_argument("--moe-table", action="store_true", help="also the MoE decode strategies (fp32)")
    ap.add_argument("--system-rules", type=int, default=7, help="length of the shared system prompt")
    args = ap.parse_args()
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",")]

    from peak import describe, measure_peaks

    torch.set_flush_denormal(True)  # as `openk2 serve` does (random weights make denormals)
    peaks = measure_peaks(torch.get_num_threads(), repeats=3)
    print(describe(peaks))
    torch.manual_seed(0)
    config = ModelConfig.from_preset("small")
    with tempfile.TemporaryDirectory() as tmp:
        # save_model + `openk2 export` (what transformers needs: its fused-expert key layout)
        model = Transformer(config)
        save_model(model, f"{tmp}/ckpt")
        K2Tokenizer.default().save_pretrained(f"{tmp}/ckpt")
        export(f"{tmp}/ckpt", f"{tmp}/hf")
        for dtype in dtypes:
            run_dtype(dtype, f"{tmp}/ckpt", f"{tmp}/hf", args, peaks)
    if args.moe_table:
        moe_rows = moe_table(model.eval(), args.repeats)
        print("\nMoE layer, fp32, microseconds per call (median):")
        names = list(moe_rows[0][1])
        print(f"{'tokens':>6} | " + " | ".join(f"{name:>35}" for name in names))
        for tokens, times in moe_rows:
            print(f"{tokens:>6} | " + " | ".join(f"{times[name] * 1e6:>35.0f}" for name in names))


if __name__ == "__main__":
    main()
