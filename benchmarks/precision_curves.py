"""Mixed precision against fp32 over the main job: `openk2 train` (the `small` preset, its defaults)
run twice, `--precision fp32` and `--precision bf16`, same seed and data, then both loss curves in
one plot and a JSON record with the tolerance check.

    python benchmarks/precision_curves.py [--steps 200] [--threads 1] [--out docs/precision_curves]

Both runs use the same Newton-Schulz precision (`--ns-dtype`, default float32) so that only the
forward/backward precision differs. The tolerance (stated, checked, and recorded in the JSON):

* the final eval loss of the bf16 run within 1% of the fp32 run's;
* every point of the train loss smoothed over 10 steps within 2% of fp32's (single steps are noisy:
  bf16 rounding changes which tokens a router sends where, so per-step losses jitter).

The two runs go in parallel, one process each with `--threads` threads; each run's CPU seconds are
recorded (wall time means little on a shared machine). Exits 1 when the tolerance is not met.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openk2.distributed.device import cpu_model_and_flags  # noqa: E402
from openk2.train.logging import read_metrics  # noqa: E402

EVAL_TOLERANCE = 0.01
SMOOTH = 10
TRAIN_TOLERANCE = 0.02


def smoothed(values: list[float], window: int = SMOOTH) -> list[float]:
    """Mean of each value and the window - 1 before it (fewer at the start)."""
    return [
        sum(values[max(0, i - window + 1) : i + 1]) / (i - max(0, i - window + 1) + 1)
        for i in range(len(values))
    ]


def launch(precision: str, out: Path, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "openk2", "train", "--precision", precision, "--ns-dtype", args.ns_dtype,
           "--steps", str(args.steps), "--threads", str(args.threads), "--out-dir", str(out), "--no-resume",
           "--no-progress", "--no-tensorboard", "--no-sample", *args.extra]  # fmt: skip
    log = open(out.with_suffix(".log"), "w")
    env = {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=ROOT)


def compare(runs: dict[str, list[dict]]) -> dict:
    """The tolerance check of the bf16 curve against the fp32 one."""
    train = {p: [m["loss"] for m in ms if m["kind"] == "train"] for p, ms in runs.items()}
    evals = {p: [(m["step"], m["loss"]) for m in ms if m["kind"] == "eval"] for p, ms in runs.items()}
    s32, s16 = smoothed(train["fp32"]), smoothed(train["bf16"])
    train_gap = max(abs(a - b) / a for a, b in zip(s32, s16))
    final32, final16 = evals["fp32"][-1][1], evals["bf16"][-1][1]
    eval_gap = abs(final16 - final32) / final32
    return {
        "final_eval_loss": {"fp32": final32, "bf16": final16},
        "final_eval_gap_nats": final16 - final32,
        "final_eval_gap_relative": eval_gap,
        "max_eval_gap_nats": max(abs(a[1] - b[1]) for a, b in zip(evals["fp32"], evals["bf16"])),
        "max_smoothed_train_gap_relative": train_gap,
        "max_step_train_gap_nats": max(abs(a - b) for a, b in zip(train["fp32"], train["bf16"])),
        "tolerance": {
            "final_eval_relative": EVAL_TOLERANCE,
            f"train_smoothed_{SMOOTH}_relative": TRAIN_TOLERANCE,
        },
        "within_tolerance": eval_gap <= EVAL_TOLERANCE and train_gap <= TRAIN_TOLERANCE,
    }


def plot(runs: dict[str, list[dict]], report: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (precision, ms), color in zip(runs.items(), ("tab:blue", "tab:orange")):
        train = [m for m in ms if m["kind"] == "train"]
        evals = [m for m in ms if m["kind"] == "eval"]
        ax.plot([m["step"] for m in train], smoothed([m["loss"] for m in train]), color=color, lw=1.2,
                label=f"{precision} train (mean of {SMOOTH} steps)")  # fmt: skip
        ax.plot([m["step"] for m in evals], [m["loss"] for m in evals], "o--", color=color, ms=4,
                label=f"{precision} eval")  # fmt: skip
    final = report["final_eval_loss"]
    ax.set(xlabel="step", ylabel="loss (nats)", title=title)
    ax.text(0.98, 0.7, f"final eval: fp32 {final['fp32']:.4f}, bf16 {final['bf16']:.4f}\n"
            f"gap {100 * report['final_eval_gap_relative']:.2f}% (tolerance {100 * EVAL_TOLERANCE:.0f}%)",
            transform=ax.transAxes, ha="right", fontsize=9)  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="the main job's 200 unless shortened")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ns-dtype", default="float32")
    ap.add_argument("--out", default=str(ROOT / "docs" / "precision_curves"), help="writes OUT.png, OUT.json")
    ap.add_argument("--reuse", help="a work directory of an earlier (or still running) invocation: plot and "
                    "check its runs' metrics so far instead of training")  # fmt: skip
    ap.add_argument("extra", nargs="*", help="further `openk2 train` flags (after --)")
    args = ap.parse_args()
    cpu, flags = cpu_model_and_flags()
    work = Path(args.reuse) if args.reuse else Path(tempfile.mkdtemp(prefix="precision-curves-"))
    print(f"runs in {work}", flush=True)
    t0 = time.perf_counter()
    procs = {p: None if args.reuse else launch(p, work / p, args) for p in ("fp32", "bf16")}
    failed = [p for p, proc in procs.items() if proc is not None and proc.wait() != 0]
    cpu_s = resource.getrusage(resource.RUSAGE_CHILDREN)
    if failed:
        for p in failed:
            print((work / f"{p}.log").read_text()[-3000:], file=sys.stderr)
        print(f"error: the {', '.join(failed)} run failed (logs in {work})", file=sys.stderr)
        return 1
    runs = {p: read_metrics(work / p) for p in procs}
    done = min(sum(m["kind"] == "train" for m in ms) for ms in runs.values())
    for p, ms in runs.items():  # a reused, unfinished pair: compare the steps both have done
        train = [m for m in ms if m["kind"] == "train"][:done]
        runs[p] = train + [m for m in ms if m["kind"] == "eval" and m["step"] <= done]
    report = compare(runs)
    report["command"] = "python benchmarks/precision_curves.py " + " ".join(sys.argv[1:])
    report["train_command"] = (
        f"openk2 train --precision {{fp32,bf16}} --ns-dtype {args.ns_dtype} --steps {args.steps} "
        f"--threads {args.threads} {' '.join(args.extra)}"
    ).strip()
    report["cpu"] = cpu
    report["cpu_bf16_flags"] = sorted(f for f in flags if "bf16" in f or f.startswith("amx"))
    report["threads_per_run"] = args.threads
    report["steps_compared"] = done
    report["cpu_seconds_both_runs"] = None if args.reuse else cpu_s.ru_utime + cpu_s.ru_stime
    report["wall_seconds"] = time.perf_counter() - t0
    for p, ms in runs.items():
        train = [m for m in ms if m["kind"] == "train"]
        report[f"{p}_median_step_seconds"] = sorted(m["step_time"] for m in train)[len(train) // 2]
        report[f"{p}_curve"] = {
            "train": [m["loss"] for m in train],
            "eval": [[m["step"], m["loss"]] for m in ms if m["kind"] == "eval"],
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(
        runs,
        report,
        out.with_suffix(".png"),
        f"openk2 train (small, {done} of {args.steps} steps): bf16 autocast vs fp32",
    )
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    print(
        f"{cpu} [{' '.join(report['cpu_bf16_flags']) or 'no bf16 units'}], {args.threads} thread(s) per run"
    )
    for p in procs:
        step_s = report[f"{p}_median_step_seconds"]
        print(f"{p}: final eval loss {report['final_eval_loss'][p]:.4f}, median step {step_s:.2f} s")
    gap, rel = report["final_eval_gap_nats"], 100 * report["final_eval_gap_relative"]
    train_gap = 100 * report["max_smoothed_train_gap_relative"]
    print(f"final eval gap {gap:+.4f} nats ({rel:.2f}%, tolerance {100 * EVAL_TOLERANCE:.0f}%); max smoothed "
          f"train gap {train_gap:.2f}% (tolerance {100 * TRAIN_TOLERANCE:.0f}%)")  # fmt: skip
    verdict = "within" if report["within_tolerance"] else "OUTSIDE"
    print(f"{verdict} tolerance over {done} steps; wrote {out.with_suffix('.png')} and .json (CPU seconds, "
          f"both runs: {report['cpu_seconds_both_runs']})")  # fmt: skip
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if report["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
