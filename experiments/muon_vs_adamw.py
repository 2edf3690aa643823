"""Muon vs AdamW at equal tokens: the same small MoE, the same batches, a small learning-rate sweep for
each optimizer; the best run of each is compared. Writes docs/muon_vs_adamw.json and .png.

    python experiments/muon_vs_adamw.py

Token ratio: the first point where Muon's best run (train loss, 10-step moving average) gets down to
AdamW's best final loss (same average over its last 10 steps), divided by AdamW's total tokens. Below
1 means Muon needs fewer tokens for the same loss.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from qk_clip import train  # noqa: E402


def smooth(xs: list[float], w: int = 10) -> list[float]:
    return [sum(xs[max(0, i - w + 1) : i + 1]) / len(xs[max(0, i - w + 1) : i + 1]) for i in range(len(xs))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--muon-lrs", type=float, nargs="+", default=[0.01, 0.03])
    p.add_argument("--adamw-lrs", type=float, nargs="+", default=[3e-3, 1e-2])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--out", default="runs/experiments/muon_vs_adamw")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    args = p.parse_args()
    common = dict(preset="tiny", corpus="shakespeare", max_chars=2_000_000, steps=args.steps,
                  batch_size=8, seq_len=128, warmup_steps=10, eval_every=40, eval_batches=4)  # fmt: skip
    out = Path(args.out)
    runs = {}
    for opt, lrs in (("muon", args.muon_lrs), ("adamw", args.adamw_lrs)):
        for lr in lrs:
            runs[f"{opt}-lr{lr:g}"] = train(f"{opt}-lr{lr:g}", out, optimizer=opt, lr=lr, **common)
    for r in runs.values():
        r["smoothed_loss"] = smooth(r["loss"])
    best = {
        opt: min((k for k in runs if k.startswith(opt + "-")), key=lambda k: runs[k]["final_train_loss"])
        for opt in ("muon", "adamw")
    }
    muon, adamw = runs[best["muon"]], runs[best["adamw"]]
    target = adamw["final_train_loss"]
    reach = next((t for t, loss in zip(muon["tokens"], muon["smoothed_loss"]) if loss <= target), None)
    result = {
        "command": "python experiments/muon_vs_adamw.py",
        "model": "tiny preset (3 layers, 8 routed experts top-2), byte-level tokenizer, Shakespeare",
        "tokens_per_run": adamw["tokens"][-1],
        "final_train_loss": {k: v["final_train_loss"] for k, v in runs.items()},
        "final_eval_loss": {k: v["final_eval_loss"] for k, v in runs.items()},
        "best": best,
        "adamw_best_final_loss": target,
        "muon_tokens_to_reach_it": reach,
        "token_ratio_muon_over_adamw": reach / adamw["tokens"][-1] if reach else None,
        "runs": runs,
    }
    docs = Path(args.docs)
    docs.mkdir(exist_ok=True)
    (docs / "muon_vs_adamw.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, docs / "muon_vs_adamw.png")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in result["runs"].items():
        color = "C0" if name.startswith("muon") else "C3"
        lw = 2 if name in result["best"].values() else 0.8
        ax.plot(r["tokens"], r["smoothed_loss"], color=color, lw=lw, alpha=1 if lw == 2 else 0.5, label=name)
    ax.axhline(result["adamw_best_final_loss"], color="gray", ls="--", lw=1, label="AdamW best final")
    if result["muon_tokens_to_reach_it"]:
        ax.axvline(result["muon_tokens_to_reach_it"], color="C0", ls=":", lw=1)
    ratio = result["token_ratio_muon_over_adamw"]
    title = "Muon vs AdamW, equal tokens" + (
        f" (Muon reaches AdamW's final loss at {ratio:.2f}x)" if ratio else ""
    )
    ax.set(xlabel="tokens", ylabel="train loss (10-step moving average)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
