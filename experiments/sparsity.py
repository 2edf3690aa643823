"""MoE sparsity at fixed activated parameters: 8 of N routed experts active, N = 8, 16, 32, 64, the
same expert size, data, tokens and seeds; held-out loss against sparsity (N / 8), with the seed noise.

    python experiments/sparsity.py            # -> runs/sparsity/
    python experiments/sparsity.py --docs     # -> docs/sparsity.json, docs/sparsity.png

The K2 report's scaling study: at a fixed number of activated parameters (so fixed FLOPs per token),
more total experts lower the loss; K2 uses 8 of 384 (sparsity 48). Here the `tiny` preset's two MoE
layers get N experts of width 32 with 8 active per token (plus the shared expert); everything a
token touches is the same for every N, only the router's N scores differ (a few hundred FLOPs).
Every N trains from the same seed on the same batches, so the per-seed difference to N = 8 is a
paired measure; the spread across seeds of one N is the seed noise it is compared against.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import parser, run_config, setup, spread, tiny_model, train_run, write_result  # noqa: E402

NAME = "sparsity"
ACTIVE = 8


def model_for(n_experts: int, expert_width: int):
    """The tiny preset with `n_experts` routed experts, ACTIVE of them per token, no group limit."""
    return tiny_model(n_routed_experts=n_experts, num_experts_per_tok=ACTIVE, n_group=1, topk_group=1,
                      moe_intermediate_size=expert_width)  # fmt: skip


def main() -> None:
    from openk2.model.size import flops_per_token

    p = parser(NAME, __doc__)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--expert-width", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args()
    if args.quick:
        args.steps, args.experts, args.seeds = 6, [8, 16], [0, 1]
    out = setup(args)
    eval_every = max(1, min(50, args.steps // 3))
    runs: dict[str, dict] = {}
    models = {}
    for n in args.experts:
        models[n] = model_for(n, args.expert_width)
        for seed in args.seeds:
            cfg = run_config(
                optimizer="muonclip",
                lr=args.lr,
                seed=seed,
                steps=args.steps,
                threads=args.threads,
                eval_batches=8,
            )
            r = train_run(cfg, models[n], eval_every=eval_every)
            runs[f"E{n}-seed{seed}"] = {"experts": n, "seed": seed, **r}
            print(f"N={n} seed {seed}: held-out {r['final_eval_loss']:.4f} ({r['cpu_seconds']:.0f} CPU s)",
                  file=sys.stderr, flush=True)  # fmt: skip
    base = args.experts[0]
    table = []
    for n in args.experts:
        losses = [runs[f"E{n}-seed{s}"]["final_eval_loss"] for s in args.seeds]
        diffs = [runs[f"E{n}-seed{s}"]["final_eval_loss"] - runs[f"E{base}-seed{s}"]["final_eval_loss"]
                 for s in args.seeds]  # fmt: skip
        train = [runs[f"E{n}-seed{s}"]["final_train_loss"] for s in args.seeds]
        r0 = runs[f"E{n}-seed{args.seeds[0]}"]
        table.append({
            "experts": n,
            "sparsity": n / ACTIVE,
            "total_parameters": r0["parameters"],
            "activated_parameters": r0["activated_parameters"],
            "forward_flops_per_token": flops_per_token(models[n], context=128)["forward"],
            "held_out_loss": spread(losses),
            "train_loss_last10": spread(train),
            f"held_out_minus_E{base}": spread(diffs),
            "per_seed_held_out": dict(zip(map(str, args.seeds), losses)),
        })  # fmt: skip
    seed_noise = statistics.fmean([row["held_out_loss"]["std"] for row in table])
    result = {
        "model": f"tiny preset, {ACTIVE} of N routed experts (width {args.expert_width}) + 1 shared, "
        "2 MoE layers of 3, 64 wide, byte-level tokenizer",
        "steps": args.steps,
        "tokens_per_run": runs[next(iter(runs))]["tokens"][-1],
        "lr": args.lr,
        "optimizer": "muonclip (tau 100)",
        "seeds": args.seeds,
        "held_out_tokens": runs[next(iter(runs))]["held_out_tokens"],
        "table": table,
        "mean_seed_std_of_held_out_loss": seed_noise,
        "cpu_seconds_total": sum(r["cpu_seconds"] for r in runs.values()),
        "runs": runs,
    }
    write_result(out, NAME, result, plot, args)


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.6))
    table = result["table"]
    xs = [row["sparsity"] for row in table]
    for seed in result["seeds"]:
        a.plot(xs, [row["per_seed_held_out"][str(seed)] for row in table], "o-", lw=0.8, alpha=0.6,
               label=f"seed {seed}")  # fmt: skip
    means = [row["held_out_loss"]["mean"] for row in table]
    a.errorbar(
        xs,
        means,
        yerr=[row["held_out_loss"]["std"] for row in table],
        fmt="ks-",
        capsize=3,
        label="mean ± std",
    )
    a.set(xscale="log", xlabel="sparsity (total / active experts)", ylabel="final held-out loss",
          title="held-out loss vs sparsity (fixed activated params)")  # fmt: skip
    a.set_xticks(xs, [f"{x:g}" for x in xs])
    a.legend(fontsize=8)
    key = next(k for k in table[0] if k.startswith("held_out_minus_"))
    b.errorbar(
        xs, [row[key]["mean"] for row in table], yerr=[row[key]["std"] for row in table], fmt="o-", capsize=3
    )
    b.axhline(0, color="gray", lw=0.8)
    b.set(xscale="log", xlabel="sparsity", ylabel="held-out loss minus N=8's (same seed)",
          title="paired difference (mean ± std over seeds)")  # fmt: skip
    b.set_xticks(xs, [f"{x:g}" for x in xs])
    for i, row in enumerate(table):
        rs = [r for r in result["runs"].values() if r["experts"] == row["experts"]]
        mean = [statistics.fmean(v) for v in zip(*(r["eval_loss"] for r in rs))]
        c.plot(rs[0]["eval_tokens"][1:], mean[1:], "o-", color=f"C{i}", label=f"{row['experts']} experts")
    c.set(xlabel="tokens", ylabel="held-out loss (mean over seeds)", title="loss vs tokens")
    c.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
