"""Muon vs AdamW at equal tokens: the same small MoE on the same batches, a learning-rate sweep of each
optimizer (seed 0), then the best learning rate of each repeated on more seeds; the token ratio
Muon / AdamW to reach each of several loss targets, with its spread over seeds.

    python experiments/muon_vs_adamw.py            # -> runs/muon_vs_adamw/
    python experiments/muon_vs_adamw.py --docs     # -> docs/muon_vs_adamw.json, .png

Loss: the train loss, 10-step moving average. Every batch is new data (the run sees less than one
pass over the corpus), so it estimates the held-out loss at every step; the held-out loss itself is
recorded every 25 steps. Targets: AdamW's own smoothed loss at 40, 60, 80 and 100% of its run (the
same seed), so that AdamW reaches every target by construction. Ratio for a target: the tokens
Muon's run needs to first get down to it, divided by the tokens AdamW's run needs. Below 1: Muon
needs fewer tokens for the same loss.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import parser, run_config, setup, smooth, spread, train_run, write_result  # noqa: E402

NAME = "muon_vs_adamw"
TARGET_FRACTIONS = (0.4, 0.6, 0.8, 1.0)


def first_reach(tokens: list[int], losses: list[float], target: float) -> int | None:
    """The tokens seen when `losses` first gets down to `target` (None: never)."""
    return next((t for t, loss in zip(tokens, losses) if loss <= target), None)


def token_ratios(muon: dict, adamw: dict) -> list[dict]:
    """For each target fraction: AdamW's smoothed loss there, the tokens each run needs to reach it,
    and the ratio Muon / AdamW (None where Muon never reaches it)."""
    out = []
    adamw_s, muon_s = smooth(adamw["loss"]), smooth(muon["loss"])
    for f in TARGET_FRACTIONS:
        target = adamw_s[max(0, round(f * len(adamw_s)) - 1)]
        t_adamw = first_reach(adamw["tokens"], adamw_s, target)
        t_muon = first_reach(muon["tokens"], muon_s, target)
        ratio = t_muon / t_adamw if t_muon is not None else None
        out.append({"fraction": f, "target": target, "adamw_tokens": t_adamw, "muon_tokens": t_muon,
                    "ratio": ratio})  # fmt: skip
    return out


def tail_slope(run: dict, steps: int, stable_end: int) -> float:
    """Change of the smoothed train loss per 1,000 steps over the last `steps` steps of the constant-LR
    phase (before WSD's decay starts at `stable_end`): near 0 when the curve has flattened."""
    s = smooth(run["loss"], 20)
    a, b = stable_end - steps, stable_end - 1
    return (s[b] - s[a]) / (b - a) * 1000


def main() -> None:
    p = parser(NAME, __doc__)
    p.add_argument("--muon-lrs", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.04])
    p.add_argument("--adamw-lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3, 8e-3])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the first one runs the sweep")
    args = p.parse_args()
    if args.quick:
        args.steps, args.muon_lrs, args.adamw_lrs, args.seeds = 6, [0.02], [4e-3], [0, 1]
    out = setup(args)
    common = dict(steps=args.steps, threads=args.threads)
    eval_every = max(1, min(25, args.steps // 4))
    runs: dict[str, dict] = {}

    def run(opt: str, lr: float, seed: int) -> dict:
        key = f"{opt}-lr{lr:g}-seed{seed}"
        if key not in runs:
            cfg = run_config(optimizer=opt, lr=lr, seed=seed, **common)
            runs[key] = {"optimizer": opt, "lr": lr, "seed": seed, **train_run(cfg, eval_every=eval_every)}
            print(f"{key}: final train loss {runs[key]['final_train_loss']:.4f} "
                  f"({runs[key]['cpu_seconds']:.0f} CPU s)", file=sys.stderr, flush=True)  # fmt: skip
        return runs[key]

    sweep_seed = args.seeds[0]
    best = {}
    for opt, lrs in (("muon", args.muon_lrs), ("adamw", args.adamw_lrs)):
        best[opt] = min(lrs, key=lambda lr: run(opt, lr, sweep_seed)["final_train_loss"])
    per_seed = []
    for seed in args.seeds:
        muon, adamw = run("muon", best["muon"], seed), run("adamw", best["adamw"], seed)
        pair = {"muon": muon, "adamw": adamw}
        per_seed.append(
            {
                "seed": seed,
                "targets": token_ratios(muon, adamw),
                "final_train_loss": {k: r["final_train_loss"] for k, r in pair.items()},
                "final_eval_loss": {k: r["final_eval_loss"] for k, r in pair.items()},
            }
        )
    ratios_by_target = {
        f: [s["targets"][i]["ratio"] for s in per_seed if s["targets"][i]["ratio"] is not None]
        for i, f in enumerate(TARGET_FRACTIONS)
    }
    all_ratios = [r for rs in ratios_by_target.values() for r in rs]
    stable_end = round(args.steps * 0.8)  # WSD: the decay is the last 20% of the steps
    window = max(2, min(100, stable_end // 3))
    result = {
        "model": "tiny preset (3 layers, 4 heads, 8 routed experts top-2, 64 wide), byte-level tokenizer",
        "steps": args.steps,
        "tokens_per_run": runs[next(iter(runs))]["tokens"][-1],
        "seeds": args.seeds,
        "sweep": {
            opt: {
                f"{r['lr']:g}": r["final_train_loss"]
                for r in runs.values()
                if r["optimizer"] == opt and r["seed"] == sweep_seed
            }
            for opt in ("muon", "adamw")
        },  # fmt: skip
        "best_lr": best,
        "per_seed": per_seed,
        "ratio_by_target": {f"{f:g}": spread(rs) if rs else None for f, rs in ratios_by_target.items()},
        "ratio_all_targets_and_seeds": spread(all_ratios) if all_ratios else None,
        "adamw_slope_per_1000_steps_before_decay": {
            str(seed): tail_slope(runs[f"adamw-lr{best['adamw']:g}-seed{seed}"], window, stable_end)
            for seed in args.seeds
        },
        "muon_slope_per_1000_steps_before_decay": {
            str(seed): tail_slope(runs[f"muon-lr{best['muon']:g}-seed{seed}"], window, stable_end)
            for seed in args.seeds
        },
        "slope_window_steps": window,
        "cpu_seconds_total": sum(r["cpu_seconds"] for r in runs.values()),
        "runs": runs,
    }
    write_result(out, NAME, result, plot, args)


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.6))
    sweep_seed = result["seeds"][0]
    for r in result["runs"].values():
        color = "C0" if r["optimizer"] == "muon" else "C3"
        is_best = r["lr"] == result["best_lr"][r["optimizer"]]
        if r["seed"] == sweep_seed:
            a.plot(r["tokens"], smooth(r["loss"]), color=color, lw=1.8 if is_best else 0.7,
                   alpha=1 if is_best else 0.45, label=f"{r['optimizer']} lr {r['lr']:g}")  # fmt: skip
        elif is_best:
            a.plot(r["tokens"], smooth(r["loss"]), color=color, lw=0.9, ls="--")
    a.set(xlabel="tokens", ylabel="train loss (10-step moving average)",
          title=f"sweep (seed {sweep_seed}); dashed: best lr, other seeds")  # fmt: skip
    lo = min(min(smooth(r["loss"])) for r in result["runs"].values())
    a.set_ylim(lo - 0.05, lo + 1.0)
    a.legend(fontsize=7, ncol=2)
    for opt, color in (("muon", "C0"), ("adamw", "C3")):
        lrs = sorted(result["sweep"][opt], key=float)
        b.plot([float(x) for x in lrs], [result["sweep"][opt][x] for x in lrs], "o-", color=color, label=opt)
    b.set(xscale="log", xlabel="learning rate", ylabel="final train loss (last 10 steps)", title="lr sweep")
    b.legend()
    for s in result["per_seed"]:
        xs = [t["target"] for t in s["targets"] if t["ratio"] is not None]
        ys = [t["ratio"] for t in s["targets"] if t["ratio"] is not None]
        c.plot(xs, ys, "o-", label=f"seed {s['seed']}")
    c.axhline(1.0, color="gray", lw=0.8)
    c.axhline(0.5, color="gray", lw=0.8, ls=":", label="~Moonlight at scale")
    c.invert_xaxis()
    c.set(xlabel="target loss (AdamW's at 40/60/80/100% of its run)", ylabel="tokens Muon / tokens AdamW",
          title="token ratio to reach the target")  # fmt: skip
    c.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
