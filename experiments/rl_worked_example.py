"""Worked example: SFT warm-up, then RL with the K1.5 loss, on 1-2 digit addition, on CPU.

    python experiments/rl_worked_example.py            # ~193 CPU-seconds, 1 thread (docs/rl.md)
    python experiments/rl_worked_example.py --docs     # the same, and refresh docs/rl_worked_example/
    python experiments/rl_worked_example.py --quick --out /tmp/x   # a smoke test in seconds

1. A small dense K2-architecture model (MLA, byte-level tokenizer) is trained from scratch with a short
   SFT warm-up on `a+b=` (1-2 digit operands, chat template, loss on the assistant tokens only). It
   stops while it solves only part of the held-out problems. The checkpoint goes to
   OUT/sft_checkpoint, the `--init` of `openk2 rl configs/rl/arithmetic_tiny.json`.
2. From that one checkpoint, `--seeds` independent RL runs (different rollout seeds and prompts) each
   train with K samples per prompt from the in-process engine, the K1.5 loss and MuonClip, syncing
   weights into the engine after every step.
3. Held-out reward (exact-match accuracy on test-split problems, greedy and sampled at T = 1) is
   measured for the SFT checkpoint (over several evaluation seeds: the measurement noise) and after
   each RL run (the run-to-run noise). Results go to OUT/results.json and OUT/*.png; `--docs` copies
   them to docs/rl_worked_example/.

Newton-Schulz runs in float32 by default (`--ns-dtype`): MuonClip's `auto` picks bfloat16 on a CPU
with bf16 units and float32 elsewhere, and the two precisions take visibly different trajectories
(post-SFT greedy accuracy 0.685 vs 0.890 in one measurement), so the example pins one. Even pinned,
the SFT end point moves with float rounding (0.73 vs 0.33 between two orderings of the same
Newton-Schulz, docs/rl.md); the RL gain from it is what reproduces. The run records the CPU
seconds it took (`time.process_time`, all threads) and the CPU it ran on.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared harness, when imported from elsewhere
from harness import stop_if_interrupted, write_json

from openk2.checkpoint import load_model, save_model
from openk2.config import ModelConfig
from openk2.model.transformer import Transformer
from openk2.optim.muon import MuonClip
from openk2.rl.env import make_env
from openk2.rl.loss import masked_lm_loss
from openk2.rl.trainer import EnvSpec, RLConfig, RLTrainer, evaluate, lm_batch, plot_history
from openk2.serve.engine import Engine
from openk2.tokenizer import K2Tokenizer
from openk2.tokenizer.chat import encode_chat

ROOT = Path(__file__).resolve().parents[1]
DOCS_DIR = ROOT / "docs" / "rl_worked_example"
ENV_KWARGS = {"min_digits": 1, "max_digits": 2, "ops": "+"}
MAX_TOKENS = 8  # budget: answers are at most 3 digits + <|im_end|>
SFT_META = "worked_example_sft.json"  # what made an SFT checkpoint, so --reuse-sft reuses only a match


def model_config() -> ModelConfig:
    """The `tiny` preset made dense and a little wider: MoE routing only slows learning at this size."""
    c = ModelConfig.from_preset("tiny")
    c.hidden_size, c.intermediate_size, c.num_hidden_layers = 96, 384, 2
    c.n_routed_experts = 0
    c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank = 4, 64, 64
    c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim = 32, 16, 32
    c.rope_scaling = None
    return c


def sft(model: Transformer, tokenizer, steps: int, batch: int, seed: int, ns_dtype: str, log) -> None:
    """Supervised warm-up on `a+b=` chats, loss on the answer tokens (MuonClip lr 0.01)."""
    env = make_env("arithmetic", **ENV_KWARGS)
    rows = []
    for task in env.sample_tasks(20_000, seed=seed):
        messages = [{"role": "system", "content": ""}, *task.messages]
        messages.append({"role": "assistant", "content": str(task.answer)})
        enc = encode_chat(tokenizer, messages)
        rows.append((enc.ids, enc.assistant_mask))
    opt = MuonClip(model, lr=0.01, adamw_lr=0.003, weight_decay=0.0, ns_dtype=ns_dtype)
    rng = random.Random(seed)
    model.train()
    for step in range(1, steps + 1):
        ids, mask = lm_batch(rng.sample(rows, batch))
        loss = masked_lm_loss(model(ids), ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps:
            log(f"sft step {step}/{steps} loss {loss.item():.3f}")


def sft_checkpoint(out: Path, steps: int, ns_dtype: str, reuse: bool, log) -> tuple[Transformer, bool]:
    """The SFT-warmed model, saved to OUT/sft_checkpoint (with its tokenizer); with `reuse`, loaded from
    there when a previous run made it with the same settings. Returns (model, reused)."""
    path = out / "sft_checkpoint"
    meta = {"sft_steps": steps, "ns_dtype": ns_dtype, "seed": 0, "model": model_config().to_hf_dict()}
    if reuse and (path / SFT_META).is_file() and json.loads((path / SFT_META).read_text()) == meta:
        log(f"SFT checkpoint reused from {path}")
        return load_model(path, dtype=torch.float32), True
    torch.manual_seed(0)
    model = Transformer(model_config())
    tokenizer = K2Tokenizer.byte_level()
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, byte-level tokenizer")
    sft(model, tokenizer, steps, batch=64, seed=0, ns_dtype=ns_dtype, log=log)
    save_model(model, path)
    tokenizer.save_pretrained(path, model_max_length=model.config.max_position_embeddings)
    write_json(path / SFT_META, meta, indent=None)
    return model, False


def held_out(model: Transformer, tokenizer, n_tasks: int, seeds: list[int], samples: int = 4) -> dict:
    """Greedy accuracy, and accuracy of samples at T = 1 (`samples` per task) for each evaluation seed."""
    env = make_env("arithmetic", **ENV_KWARGS)
    tasks = env.sample_tasks(n_tasks, seed=12345, split="test")
    engine = Engine(copy.deepcopy(model), tokenizer, max_batch=128, max_seq_len=128)
    greedy = evaluate(engine, env, tasks, MAX_TOKENS, temperature=0.0)["reward"]
    sampled = [
        evaluate(engine, env, tasks, MAX_TOKENS, 1.0, samples=samples, seed=s)["reward"] for s in seeds
    ]
    return {"greedy": greedy, "sampled": sampled, "sampled_mean": statistics.fmean(sampled)}


def rl_config(
    seed: int,
    steps: int,
    out_dir: str | None,
    *,
    lr: float = 3e-4,
    tau: float = 0.1,
    updates: int = 1,
    ns_dtype: str = "float32",
    eval_tasks: int = 200,
    eval_every: int = 10,
) -> RLConfig:
    """The example's RL settings: 16 prompts x K = 8, temperature 1.0 -> 0.7 (cosine), budget 8 tokens."""
    return RLConfig(
        envs=[EnvSpec("arithmetic", dict(ENV_KWARGS), max_tokens=MAX_TOKENS)],
        steps=steps,
        prompts_per_step=16,
        samples_per_prompt=8,
        tau=tau,
        updates_per_step=updates,
        lr=lr,
        adamw_lr=lr / 3,
        ns_dtype=ns_dtype,
        temperature_start=1.0,
        temperature_end=0.7,
        eval_every=eval_every,
        eval_tasks=eval_tasks,
        seed=seed,
        out_dir=out_dir,
    )


def std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def cpu_report() -> dict:
    """The CPU and precision facts a number depends on (`openk2 env`'s rows)."""
    from openk2.cli import environment_report

    keep = ("cpu", "cpu features", "torch", "Newton-Schulz auto on cpu")
    return {k: v for k, v in environment_report() if k in keep}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/rl_worked_example", help="run directory (SFT checkpoint, RL runs)")
    ap.add_argument("--docs", action="store_true", help=f"also copy results.json and the plots to {DOCS_DIR}")
    ap.add_argument("--quick", action="store_true", help="a smoke test: a few steps of everything")
    ap.add_argument(
        "--ns-dtype",
        default="float32",
        choices=("float32", "bfloat16", "auto"),
        help="Newton-Schulz precision of MuonClip (SFT and RL)",
    )
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--rl-steps", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=3, help="independent RL runs from the SFT checkpoint")
    ap.add_argument("--eval-tasks", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-4, help="RL learning rate (Muon; AdamW gets a third)")
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--updates", type=int, default=1, help="optimizer steps per batch of rollouts")
    ap.add_argument(
        "--reuse-sft",
        action="store_true",
        help="reuse OUT/sft_checkpoint if a previous run made it with the same settings",
    )
    args = ap.parse_args()
    samples = 4
    if args.quick:
        args.sft_steps, args.rl_steps, args.seeds, args.eval_tasks, samples = 20, 2, 2, 16, 2
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    tokenizer = K2Tokenizer.byte_level()
    model, reused = sft_checkpoint(out, args.sft_steps, args.ns_dtype, args.reuse_sft, log)
    cpu_sft = time.process_time()  # including imports: the whole command's CPU time so far
    eval_seeds = list(range(3 if not args.quick else 2))
    base = held_out(model, tokenizer, args.eval_tasks, eval_seeds, samples)
    log(f"post-SFT held-out: greedy {base['greedy']:.3f}, sampled {base['sampled']}")
    sft_state = copy.deepcopy(model.state_dict())

    runs = []
    for seed in range(args.seeds):
        policy = Transformer(model_config())
        policy.load_state_dict(sft_state)
        config = rl_config(
            1000 + seed,
            args.rl_steps,
            str(out / f"rl_seed{seed}"),
            lr=args.lr,
            tau=args.tau,
            updates=args.updates,
            ns_dtype=args.ns_dtype,
            eval_tasks=args.eval_tasks,
        )
        trainer = RLTrainer(
            config, model=policy, tokenizer=tokenizer, log_fn=lambda m, s=seed: log(f"rl{s} {m}")
        )
        history = trainer.train(resume=False, overwrite=True)  # a fresh run; an old one is moved aside
        stop_if_interrupted(trainer, f"rl seed {seed}")
        final = held_out(policy, tokenizer, args.eval_tasks, eval_seeds, samples)
        sync = [h["sync_s"] for h in history if "sync_s" in h]
        log(f"rl seed {seed}: greedy {final['greedy']:.3f}, sampled {final['sampled']}")
        runs.append({"seed": seed, "final": final, "history": history, "sync_s_mean": statistics.fmean(sync)})

    gains_g = [r["final"]["greedy"] - base["greedy"] for r in runs]
    gains_s = [r["final"]["sampled_mean"] - base["sampled_mean"] for r in runs]
    n = args.eval_tasks
    results = {
        "command": "python experiments/rl_worked_example.py" + (" --quick" if args.quick else ""),
        "task": {"env": "arithmetic", **ENV_KWARGS, "eval_tasks": n, "eval_samples_per_task": samples},
        "ns_dtype": args.ns_dtype,
        "threads": args.threads,
        "machine": cpu_report(),
        "sft_steps": args.sft_steps,
        "sft_reused": reused,
        "rl": {
            "steps": args.rl_steps,
            "lr": args.lr,
            "tau": args.tau,
            "updates_per_step": args.updates,
            "seeds": [1000 + s for s in range(args.seeds)],
        },
        "post_sft": base,
        "post_sft_sampled_eval_noise_std": std(base["sampled"]),
        "greedy_binomial_std": (base["greedy"] * (1 - base["greedy"]) / n) ** 0.5,
        "post_rl": [r["final"] for r in runs],
        "gain_greedy": gains_g,
        "gain_sampled": gains_s,
        "gain_greedy_mean_std": [statistics.fmean(gains_g), std(gains_g)],
        "gain_sampled_mean_std": [statistics.fmean(gains_s), std(gains_s)],
        "weight_sync_s_mean": statistics.fmean(r["sync_s_mean"] for r in runs),
        # CPU seconds of this process (all threads), from the start of the script (imports included)
        "cpu_s": {"sft": cpu_sft, "total": time.process_time()},
        "wall_s": time.perf_counter() - t_start,
        "curves": {
            str(r["seed"]): [(h["step"], h["eval/reward"]) for h in r["history"] if "eval/reward" in h]
            for r in runs
        },
    }
    write_json(out / "results.json", results, indent=2)
    for r in runs:
        plot_history(r["history"], out / f"rl_seed{r['seed']}.png", title=f"RL seed {r['seed']}")
    plot_summary(runs, out / "rl_worked_example.png", args.ns_dtype)
    if args.docs:
        DOCS_DIR.mkdir(parents=True, exist_ok=True)
        for name in ["results.json", "rl_worked_example.png"] + [f"rl_seed{r['seed']}.png" for r in runs]:
            shutil.copy(out / name, DOCS_DIR / name)
        log(f"copied results.json and plots to {DOCS_DIR}")
    g, s = results["gain_greedy_mean_std"], results["gain_sampled_mean_std"]
    log(
        f"greedy {base['greedy']:.3f} -> {[r['final']['greedy'] for r in runs]}: gain {100 * g[0]:+.1f} "
        f"points (std {100 * g[1]:.1f} over {len(runs)} seeds); sampled gain {100 * s[0]:+.1f} "
        f"(std {100 * s[1]:.1f}); {results['cpu_s']['total']:.0f} CPU-s, Newton-Schulz {args.ns_dtype}; "
        f"{out / 'results.json'}"
    )


def plot_summary(runs: list[dict], path: Path, ns_dtype: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for r in runs:
        h = r["history"]
        ev = [(x["step"], x["eval/reward"]) for x in h if "eval/reward" in x]
        axes[0].plot(*zip(*ev), "o-", label=f"seed {r['seed']}")
        for ax, key in zip(axes[1:], ("reward", "length", "drift")):
            pts = [(x["step"], x[key]) for x in h if key in x]
            ax.plot(*zip(*pts), alpha=0.8)
    axes[0].set_title("held-out greedy accuracy", fontsize=10)
    axes[0].legend(fontsize=8)
    for ax, name in zip(axes[1:], ("rollout reward", "response tokens", "KL-like drift")):
        ax.set_title(name, fontsize=10)
    for ax in axes:
        ax.set_xlabel("RL step")
    fig.suptitle(
        f"SFT warm-up, then K1.5 RL on 1-2 digit addition (tiny dense K2 model, CPU, "
        f"Newton-Schulz {ns_dtype})",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
