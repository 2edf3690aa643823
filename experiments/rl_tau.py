"""Does K1.5's tau act? RL from the worked example's SFT checkpoint for tau x updates_per_step.

    python experiments/rl_tau.py            # needs runs/rl_worked_example/sft_checkpoint (made if missing)
    python experiments/rl_tau.py --docs     # the same, and refresh docs/rl_tau/
    python experiments/rl_tau.py --quick --out /tmp/x --init CKPT   # a smoke test

The K1.5 loss is 1/K sum_i (A_i - tau * log(pi/pi_old)(y_i))^2 with A_i = r_i - mean r. On the first
update of a batch pi = pi_old, so its gradient is -2 tau/K sum_i A_i grad log pi: tau only scales it,
and MuonClip's update is (nearly) scale-free, so with `updates_per_step = 1` tau should make no
difference. From the second update on the log-ratio term acts: its minimum is at log(pi/pi_old) =
A_i / tau, so a large tau keeps the policy near pi_old and a small one lets it run. Each cell is an
RL run on 1-2 digit addition (the worked example's settings, `rl_worked_example.rl_config`) from the
same SFT checkpoint; it reports the held-out greedy reward change, the mean per-token drift per step
(log pi_old - log pi_new on the step's rollouts, after all its updates), the mean |log-ratio| per
sample at the step's last update, and an estimate of KL(pi_final || pi_SFT) per token on samples of
the final policy at T = 1 on held-out prompts. Newton-Schulz float32; 1 thread.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import multiprocessing
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from rl_worked_example import ENV_KWARGS, MAX_TOKENS, cpu_report, rl_config, sft_checkpoint, std

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared harness, when imported from elsewhere
from harness import stop_if_interrupted, write_json

from openk2.checkpoint import load_model
from openk2.rl.env import make_env
from openk2.rl.loss import pack_sequences, sequence_logprobs
from openk2.rl.rollout import prompt_ids, run_requests
from openk2.rl.trainer import RLTrainer
from openk2.serve.engine import Engine
from openk2.serve.sampling import SamplingParams
from openk2.tokenizer import K2Tokenizer

ROOT = Path(__file__).resolve().parents[1]
DOCS_DIR = ROOT / "docs" / "rl_tau"


def kl_to_reference(policy, reference, tokenizer, n_tasks: int, samples: int = 4, seed: int = 0) -> float:
    """Monte-Carlo KL(policy || reference) per sampled token: responses of `policy` at T = 1 to held-out
    prompts, mean over tokens of log policy - log reference."""
    env = make_env("arithmetic", **ENV_KWARGS)
    tasks = env.sample_tasks(n_tasks, seed=54321, split="test")
    engine = Engine(copy.deepcopy(policy), tokenizer, max_batch=128, max_seq_len=128)
    prompts = [prompt_ids(tokenizer, t, "") for t in tasks]
    params = [
        SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, n=samples, seed=seed * 7919 + i)
        for i in range(len(tasks))
    ]
    ps, rs = [], []
    for prompt, out in zip(prompts, run_requests(engine, prompts, params)):
        for c in out.completions:
            if c.token_ids:
                ps.append(prompt)
                rs.append(list(c.token_ids))
    batch = pack_sequences(ps, rs)
    with torch.no_grad():
        diff = sequence_logprobs(policy, batch) - sequence_logprobs(reference, batch)
    return float(diff.sum() / batch["response_mask"].sum())


def run_cell(job: tuple) -> dict:
    """One RL run from the SFT checkpoint (its own process with --jobs): the cell's numbers."""
    init, out_dir, tau, upd, seed, steps, lr, eval_tasks, threads = job
    torch.set_num_threads(threads)
    sft_model = load_model(init, dtype=torch.float32)
    policy = copy.deepcopy(sft_model)
    tokenizer = K2Tokenizer.byte_level()
    config = rl_config(
        seed, steps, out_dir, lr=lr, tau=tau, updates=upd, eval_tasks=eval_tasks, eval_every=steps
    )
    trainer = RLTrainer(config, model=policy, tokenizer=tokenizer, log_fn=None)
    history = trainer.train(resume=False, overwrite=True)
    stop_if_interrupted(trainer, f"cell tau {tau}, {upd} updates, seed {seed}")
    evals = [h["eval/reward"] for h in history if "eval/reward" in h]
    steps_ = [h for h in history if "drift" in h]
    ratios = [h["log_ratio"] for h in steps_ if "log_ratio" in h]
    return {
        "name": Path(out_dir).name,
        "tau": tau,
        "updates_per_step": upd,
        "seed": seed,
        "eval_start": evals[0],
        "eval_end": evals[-1],
        "eval_change": evals[-1] - evals[0],
        "drift_mean": statistics.fmean(h["drift"] for h in steps_),
        "log_ratio_last_update_mean": statistics.fmean(ratios) if ratios else None,
        "kl_final_vs_sft": kl_to_reference(policy, sft_model, tokenizer, eval_tasks),
        "drift_curve": [h["drift"] for h in steps_],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--init",
        default="runs/rl_worked_example/sft_checkpoint",
        help="the SFT checkpoint (made as the worked example makes it if missing)",
    )
    ap.add_argument("--out", default="runs/rl_tau")
    ap.add_argument("--docs", action="store_true", help=f"also copy the table and plot to {DOCS_DIR}")
    ap.add_argument("--quick", action="store_true", help="a smoke test: 2 steps, 1 seed, 2 cells")
    ap.add_argument("--taus", default="0.01,0.1,1")
    ap.add_argument("--updates", default="1,4")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--eval-tasks", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--redraw", action="store_true", help="only redo the table and plot from OUT/cells.json")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    args = ap.parse_args()
    taus = [float(x) for x in args.taus.split(",")]
    updates = [int(x) for x in args.updates.split(",")]
    if args.quick:
        taus, updates, args.seeds, args.steps, args.eval_tasks = taus[:1], updates, 1, 2, 16
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    init = Path(args.init)
    cells: list[dict] = []
    if args.redraw:  # the table and plot from the cells a run finished (its cells.json)
        cells = json.loads((out / "cells.json").read_text())
        taus = sorted({c["tau"] for c in cells})
        updates = sorted({c["updates_per_step"] for c in cells})
    elif not init.is_dir():
        log(f"{init} not found: making it (the worked example's SFT warm-up)")
        sft_checkpoint(init.parent, 20 if args.quick else 300, "float32", False, log)
    jobs = [
        (str(init), str(out / f"tau{tau:g}_u{upd}_s{seed}"), tau, upd, 1000 + seed, args.steps, args.lr,
         args.eval_tasks, args.threads)
        for tau, upd, seed in itertools.product(taus, updates, range(args.seeds))
    ]  # fmt: skip

    def done(cell: dict) -> None:
        cells.append(cell)
        log(
            f"{cell['name']}: held-out {cell['eval_start']:.3f} -> {cell['eval_end']:.3f}, drift/step "
            f"{cell['drift_mean']:.2e}, |log-ratio| {cell['log_ratio_last_update_mean'] or 0:.3g}, "
            f"KL to SFT {cell['kl_final_vs_sft']:.3e}"
        )
        write_json(out / "cells.json", cells)  # what is done so far

    if args.redraw:
        pass
    elif args.jobs > 1:
        pool = multiprocessing.get_context("spawn").Pool(args.jobs)
        for cell in pool.imap_unordered(run_cell, jobs):
            done(cell)
        pool.close()
        pool.join()
    else:
        for job in jobs:
            done(run_cell(job))
    cells.sort(key=lambda c: (c["tau"], c["updates_per_step"], c["seed"]))

    table = []
    for tau, upd in itertools.product(taus, updates):
        cs = [c for c in cells if c["tau"] == tau and c["updates_per_step"] == upd]
        if not cs:
            continue
        row = {"tau": tau, "updates_per_step": upd, "seeds": len(cs)}
        for key in ("eval_change", "drift_mean", "log_ratio_last_update_mean", "kl_final_vs_sft"):
            vals = [c[key] for c in cs if c[key] is not None]
            row[key] = [statistics.fmean(vals), std(vals)] if vals else None
        table.append(row)
    results = {
        "command": "python experiments/rl_tau.py" + (" --quick" if args.quick else ""),
        "init": str(init),
        "steps": args.steps,
        "lr": args.lr,
        "eval_tasks": args.eval_tasks,
        "ns_dtype": "float32",
        "threads": args.threads,
        "machine": cpu_report(),
        "table": table,
        "cells": cells,
        "jobs": args.jobs,
        # CPU seconds of this process and its worker processes (all threads), imports included
        "cpu_s": None if args.redraw else cpu_seconds(),
        "redrawn_from_cells": args.redraw,
        "wall_s": time.perf_counter() - t_start,
    }
    write_json(out / "rl_tau.json", results, indent=2)
    plot(results, out / "rl_tau.png")
    (out / "rl_tau.md").write_text(markdown_table(table))
    print(markdown_table(table))
    if args.docs:
        DOCS_DIR.mkdir(parents=True, exist_ok=True)
        for name in ("rl_tau.json", "rl_tau.png", "rl_tau.md"):
            shutil.copy(out / name, DOCS_DIR / name)
        log(f"copied the table and plot to {DOCS_DIR}")
    log(f"{results['cpu_s'] or 0:.0f} CPU-s; {out / 'rl_tau.json'}")


def cpu_seconds() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def markdown_table(table: list[dict]) -> str:
    def ms(v, scale=1.0, fmt=".1f"):
        return "-" if v is None else f"{v[0] * scale:{fmt}} ± {v[1] * scale:{fmt}}"

    lines = [
        "| tau | updates/step | held-out change (points) | drift per step (nats/token) "
        "| mean \\|log-ratio\\| at last update | KL(final \\|\\| SFT) per token |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['tau']:g} | {r['updates_per_step']} | {ms(r['eval_change'], 100)} "
            f"| {ms(r['drift_mean'], 1, '.2e')} | {ms(r['log_ratio_last_update_mean'], 1, '.3f')} "
            f"| {ms(r['kl_final_vs_sft'], 1, '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for r in results["table"]:
        label = f"tau {r['tau']:g}, {r['updates_per_step']} upd"
        cs = [
            c
            for c in results["cells"]
            if c["tau"] == r["tau"] and c["updates_per_step"] == r["updates_per_step"]
        ]
        curve = [statistics.fmean(xs) for xs in zip(*(c["drift_curve"] for c in cs))]
        axes[0].plot(
            range(1, len(curve) + 1), curve, label=label, ls="-" if r["updates_per_step"] > 1 else ":"
        )
        axes[1].errorbar(
            r["kl_final_vs_sft"][0],
            100 * r["eval_change"][0],
            xerr=r["kl_final_vs_sft"][1],
            yerr=100 * r["eval_change"][1],
            fmt="o",
            label=label,
            capsize=3,
        )
    axes[0].set_yscale("symlog", linthresh=1e-4)
    axes[0].set_title("drift per step (log pi_old - log pi_new, nats/token)", fontsize=10)
    axes[0].set_xlabel("RL step")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("KL(final || SFT) per token")
    axes[1].set_ylabel("held-out greedy change (points)")
    axes[1].set_title("learning vs distance from the SFT policy", fontsize=10)
    axes[1].legend(fontsize=7)
    fig.suptitle(
        f"K1.5 tau x updates per step, {results['steps']} RL steps from the SFT checkpoint (mean over seeds)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
