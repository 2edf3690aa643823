"""QK-Clip ablation: one small MoE trained twice at an aggressive learning rate, with plain Muon and
with MuonClip, from the same seed on the same batches; the max attention logit and the losses.

    python experiments/qk_clip.py            # -> runs/qk_clip/
    python experiments/qk_clip.py --docs     # -> docs/qk_clip.json, docs/qk_clip.png

tau = 30 (not K2's 100): like the report's small-scale ablation, a CPU-sized run only reaches logits of
a few tens, so the threshold has to sit where plain Muon actually crosses it to show anything.
Newton-Schulz runs in float32 (the harness pins it): with "auto" it would be bf16 on CPUs with bf16
units and fp32 elsewhere, and the logits' growth differs between the two.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import parser, run_config, setup, train_run, write_result  # noqa: E402

NAME = "qk_clip"


def main() -> None:
    p = parser(NAME, __doc__)
    p.add_argument("--lr", type=float, default=0.08)
    p.add_argument("--tau", type=float, default=30.0)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.steps = 8
    out = setup(args)
    common = dict(steps=args.steps, lr=args.lr, seed=args.seed, threads=args.threads, qk_clip_tau=args.tau)
    eval_every = max(1, min(30, args.steps // 4))
    runs = {
        "muon": train_run(run_config(optimizer="muon", **common), eval_every=eval_every),
        "muonclip": train_run(run_config(optimizer="muonclip", **common), eval_every=eval_every),
    }
    muon, clip = runs["muon"], runs["muonclip"]
    result = {
        "tau": args.tau,
        "lr": args.lr,
        "steps": args.steps,
        "seed": args.seed,
        "model": "tiny preset (3 layers, 4 heads, 8 routed experts top-2), byte-level tokenizer",
        "peak_max_logit": {k: max(v["max_logit"]) for k, v in runs.items()},
        "final_max_logit": {k: v["max_logit"][-1] for k, v in runs.items()},
        "first_step_over_tau_plain_muon": next(
            (i + 1 for i, m in enumerate(muon["max_logit"]) if m > args.tau), None
        ),
        "steps_with_clipping": sum(1 for n in clip["heads_clipped"] if n),
        "head_clips_total": sum(clip["heads_clipped"]),
        "final_train_loss": {k: v["final_train_loss"] for k, v in runs.items()},
        "final_eval_loss": {k: v["final_eval_loss"] for k, v in runs.items()},
        "eval_loss_gap_percent": 100
        * (clip["final_eval_loss"] - muon["final_eval_loss"])
        / muon["final_eval_loss"],
        "cpu_seconds": {k: v["cpu_seconds"] for k, v in runs.items()},
        "runs": runs,
    }
    write_result(out, NAME, result, plot, args)


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    for name, style in (("muon", "C3"), ("muonclip", "C0")):
        r = result["runs"][name]
        steps = range(1, len(r["loss"]) + 1)
        label = "Muon" if name == "muon" else f"MuonClip (tau={result['tau']:g})"
        a.plot(steps, r["max_logit"], style, label=label)
        b.plot(steps, r["loss"], style, label=label, lw=1)
    a.axhline(result["tau"], color="gray", ls="--", lw=1, label="tau")
    a.set(xlabel="step", ylabel="max attention logit (all layers, heads)", title="max logit")
    b.set(xlabel="step", ylabel="train loss", title=f"loss (lr {result['lr']:g})")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
