"""QK-Clip ablation: one small MoE trained twice at an aggressive learning rate, with plain Muon and
with MuonClip, from the same seed on the same batches. Writes docs/qk_clip.json and docs/qk_clip.png.

    python experiments/qk_clip.py

tau = 30 (not K2's 100): like the report's small-scale ablation, a CPU-sized run only reaches logits of
a few tens, so the threshold has to sit where plain Muon actually crosses it to show anything.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openk2.train.logging import read_metrics  # noqa: E402
from openk2.train.loop import TrainConfig, pretrain  # noqa: E402


def train(name: str, out: Path, **kw) -> dict:
    cfg = TrainConfig(out_dir=str(out / name), progress=False, tensorboard=False, save_every=10**9, **kw)
    t = time.perf_counter()
    shutil.rmtree(out / name, ignore_errors=True)  # each experiment run starts fresh
    summary = pretrain(cfg, resume=False)
    records = read_metrics(out / name)
    train_records = [r for r in records if r["kind"] == "train"]
    return {
        "config": {k: v for k, v in records[0]["config"].items() if k != "memory"},
        "final_train_loss": sum(r["loss"] for r in train_records[-10:]) / 10,  # mean of the last 10 steps
        "final_eval_loss": summary["eval_loss"],
        "max_logit": [r["max_logit"] for r in train_records],
        "loss": [r["loss"] for r in train_records],
        "heads_clipped": [r["heads_clipped"] for r in train_records],
        "tokens": [r["tokens"] for r in train_records],
        "seconds": time.perf_counter() - t,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lr", type=float, default=0.08)
    p.add_argument("--tau", type=float, default=30.0)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--out", default="runs/experiments/qk_clip")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    args = p.parse_args()
    common = dict(
        preset="tiny",
        corpus="shakespeare",
        max_chars=2_000_000,
        steps=args.steps,
        batch_size=8,
        seq_len=128,
        lr=args.lr,
        warmup_steps=10,
        eval_every=50,
        eval_batches=4,
    )
    out = Path(args.out)
    runs = {
        "muon": train("muon", out, optimizer="muon", **common),
        "muonclip": train("muonclip", out, optimizer="muonclip", qk_clip_tau=args.tau, **common),
    }
    muon, clip = runs["muon"], runs["muonclip"]
    result = {
        "command": "python experiments/qk_clip.py",
        "tau": args.tau,
        "lr": args.lr,
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
        "runs": runs,
    }
    docs = Path(args.docs)
    docs.mkdir(exist_ok=True)
    (docs / "qk_clip.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, docs / "qk_clip.png")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
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
