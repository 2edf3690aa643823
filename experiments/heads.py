"""Attention heads: H vs 2H at fixed other dimensions. What doubling the heads buys in loss, and what it
costs when decoding at a long context with MLA's latent cache.

    python experiments/heads.py            # -> runs/heads/
    python experiments/heads.py --docs     # -> docs/heads.json, docs/heads.png

The K2 report chose 64 heads (DeepSeek-V3 has 128): doubling them lowered the validation loss only a
little (0.5-1.2% in its ablation) but raised the inference FLOPs at a 128k context by 83%. Two parts:

1. Loss: the `tiny` preset with 4 and 8 heads (hidden size, latent ranks and per-head dims fixed, so
   the attention's projections grow with the heads) trained from the same seeds on the same batches;
   the paired held-out loss difference per seed.
2. Decode cost: MLA caches one latent entry per token and layer (kv_lora_rank + qk_rope_head_dim
   values) whatever the number of heads, so the cache bytes do not grow with H (computed by
   `openk2.model.size.kv_cache_bytes_per_token`); the work of one decode step against it does, since
   every head scores every cached entry. Measured: the CPU time of one `LatentForward.step` (the
   model's latent decode path, absorbed weights) for one sequence whose cache holds 8k and 32k
   tokens, for the tiny model (4 vs 8 heads) and for one layer with K2's attention shapes (hidden
   7168, q rank 1536, kv rank 512, head dims 128 + 64 / 128) at 64 vs 128 heads; its MLP is a
   token-sized dense one so that the step is the attention's.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import parser, run_config, setup, spread, tiny_model, train_run, write_result  # noqa: E402

NAME = "heads"


def k2_attention_layer(heads: int, context: int):
    """One decoder layer with K2's attention shapes and `heads` heads; a minimal dense MLP and vocabulary."""
    from openk2.config import ModelConfig

    return ModelConfig(vocab_size=512, hidden_size=7168, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=heads, num_key_value_heads=heads, first_k_dense_replace=1,
                       n_routed_experts=8, num_experts_per_tok=2, rope_scaling=None,
                       max_position_embeddings=context + 1, bos_token_id=256, eos_token_id=257,
                       torch_dtype="float32").validate()  # fmt: skip


@torch.no_grad()
def decode_step_seconds(model_cfg, context: int, repeats: int) -> dict:
    """CPU seconds of one latent decode step (batch 1) at `context` cached tokens: the median of
    `repeats` steps after one warm-up step. Random weights and cache: the arithmetic is the same."""
    from openk2.model.transformer import LatentForward, Transformer

    torch.manual_seed(0)
    model = Transformer(model_cfg).eval()
    fwd = LatentForward(model, max_seq_len=context + 1)
    entry = model_cfg.kv_lora_rank + model_cfg.qk_rope_head_dim
    kv = torch.randn(model_cfg.num_hidden_layers, 1, context, entry)
    allowed = torch.ones(1, context, dtype=torch.bool)
    tokens, pos = torch.tensor([1]), torch.tensor([context])
    times = []
    for i in range(repeats + 1):
        t = time.process_time()
        fwd.step(tokens, pos, allowed, kv)
        if i:
            times.append(time.process_time() - t)
    del model, fwd, kv
    return {"median_s": statistics.median(times), "all_s": times}


def main() -> None:
    from openk2.model.size import count_parameters, kv_cache_bytes_per_token

    p = parser(NAME, __doc__)
    p.add_argument("--heads", type=int, default=4, help="H of the trained pair (H vs 2H)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--k2-heads", type=int, default=64, help="H of the K2-shaped layer (H vs 2H)")
    p.add_argument("--repeats", type=int, default=5, help="decode steps timed per point")
    args = p.parse_args()
    if args.quick:
        args.steps, args.contexts, args.repeats, args.k2_heads = 6, [256], 1, 4
    out = setup(args)
    h1, h2 = args.heads, 2 * args.heads
    models = {h: tiny_model(num_attention_heads=h, num_key_value_heads=h) for h in (h1, h2)}
    runs = {}
    for h in (h1, h2):
        for seed in args.seeds:
            cfg = run_config(
                optimizer="muonclip",
                lr=args.lr,
                seed=seed,
                steps=args.steps,
                threads=args.threads,
                eval_batches=8,
            )
            r = train_run(cfg, models[h], eval_every=max(1, min(50, args.steps // 3)))
            runs[f"H{h}-seed{seed}"] = {"heads": h, "seed": seed, **r}
            print(f"H={h} seed {seed}: held-out {r['final_eval_loss']:.4f} ({r['cpu_seconds']:.0f} CPU s)",
                  file=sys.stderr, flush=True)  # fmt: skip
    diffs = [
        runs[f"H{h2}-seed{s}"]["final_eval_loss"] - runs[f"H{h1}-seed{s}"]["final_eval_loss"]
        for s in args.seeds
    ]
    rel = [100 * d / runs[f"H{h1}-seed{s}"]["final_eval_loss"] for d, s in zip(diffs, args.seeds)]
    loss = {
        str(h): {
            "held_out_loss": spread([runs[f"H{h}-seed{s}"]["final_eval_loss"] for s in args.seeds]),
            "total_parameters": count_parameters(models[h]).total,
            "activated_parameters": count_parameters(models[h]).activated,
        }
        for h in (h1, h2)
    }
    decode = []
    pairs = [("tiny", h, models[h]) for h in (h1, h2)]
    for context in args.contexts:
        for kind, h, m in [*pairs, *(("k2_layer", h, None) for h in (args.k2_heads, 2 * args.k2_heads))]:
            import dataclasses

            cfg = dataclasses.replace(m, max_position_embeddings=context + 1, rope_scaling=None) if m else (
                k2_attention_layer(h, context))  # fmt: skip
            t = decode_step_seconds(cfg, context, args.repeats)
            decode.append({
                "model": kind, "heads": h, "context": context, "layers": cfg.num_hidden_layers,
                "cache_bytes_per_token_bf16": kv_cache_bytes_per_token(cfg)["mla_latent"],
                "multi_head_cache_bytes_per_token_bf16": kv_cache_bytes_per_token(cfg)["multi_head"],
                # per layer: scores against every entry (r + rope) and the weighted latent (r), per head
                "attention_flops_per_step": 2 * cfg.num_hidden_layers * h * context
                * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim),
                "step_cpu_seconds": t["median_s"], "step_cpu_seconds_all": t["all_s"],
            })  # fmt: skip
            print(
                f"decode {kind} H={h} T={context}: {t['median_s'] * 1000:.1f} ms", file=sys.stderr, flush=True
            )
    ratios = {}
    for kind, a, b in (("tiny", h1, h2), ("k2_layer", args.k2_heads, 2 * args.k2_heads)):
        for context in args.contexts:
            x = next(d for d in decode if d["model"] == kind and d["heads"] == a and d["context"] == context)
            y = next(d for d in decode if d["model"] == kind and d["heads"] == b and d["context"] == context)
            ratios[f"{kind}@{context}"] = y["step_cpu_seconds"] / x["step_cpu_seconds"]
    result = {
        "model": "tiny preset (3 layers, 64 wide, q rank 32, kv rank 32, head dims 16+8 / 16), byte-level",
        "steps": args.steps,
        "tokens_per_run": runs[next(iter(runs))]["tokens"][-1],
        "lr": args.lr,
        "optimizer": "muonclip (tau 100)",
        "seeds": args.seeds,
        "heads": [h1, h2],
        "loss": loss,
        "held_out_2H_minus_H": spread(diffs),
        "held_out_2H_minus_H_percent": spread(rel),
        "decode": decode,
        "decode_step_ratio_2H_over_H": ratios,
        "cpu_seconds_training": sum(r["cpu_seconds"] for r in runs.values()),
        "runs": runs,
    }
    write_result(out, NAME, result, plot, args)


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.6))
    for i, h in enumerate(result["heads"]):
        for seed in result["seeds"]:
            r = result["runs"][f"H{h}-seed{seed}"]
            a.plot(r["eval_tokens"][1:], r["eval_loss"][1:], "o-", color=f"C{i}", lw=1,
                   alpha=0.8, label=f"{h} heads" if seed == result["seeds"][0] else None)  # fmt: skip
    d = result["held_out_2H_minus_H_percent"]
    a.set(xlabel="tokens", ylabel="held-out loss",
          title=f"2H - H: {d['mean']:+.2f}% (std {d['std']:.2f}%, {d['n']} seeds)")  # fmt: skip
    a.legend()
    kinds = sorted({(d["model"], d["context"]) for d in result["decode"]})
    x = range(len(kinds))
    for offset, index, name in ((-0.2, 0, "H"), (0.2, 1, "2H")):
        heights, counts = [], []
        for kind in kinds:
            points = sorted(
                (d["heads"], d["step_cpu_seconds"])
                for d in result["decode"]
                if (d["model"], d["context"]) == kind
            )
            heights.append(points[index][1] * 1000)
            counts.append(points[index][0])
        b.bar([i + offset for i in x], heights, 0.4, label=f"{name} heads")
        for i, (hgt, n) in enumerate(zip(heights, counts)):
            b.annotate(str(n), (i + offset, hgt), ha="center", va="bottom", fontsize=7)
    labels = [
        f"{kind}\n{context // 1024}k ctx" if context >= 1024 else f"{kind}\n{context} ctx"
        for kind, context in kinds
    ]
    b.set_xticks(list(x), labels)
    b.set(
        yscale="log", ylabel="CPU ms per decode step (1 thread)", title="latent decode step at long context"
    )
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
