"""Worked example: SFT warm-up, then RL with the K1.5 loss, on multi-digit addition, on CPU.

    python experiments/rl_worked_example.py            # ~71 s on 2 idle CPU cores (see docs/rl.md)

1. A small dense K2-architecture model (MLA, byte-level tokenizer) is trained from scratch with a short
   SFT warm-up on `a+b=` (1-2 digit operands, chat template, loss on the assistant tokens only). It
   stops while it solves only part of the held-out problems.
2. From that one checkpoint, `--seeds` independent RL runs (different rollout seeds and prompts) each
   train with K samples per prompt from the in-process engine, the K1.5 loss and MuonClip, syncing
   weights into the engine after every step.
3. Held-out reward (exact-match accuracy on test-split problems, greedy and sampled at T = 1) is
   measured for the SFT checkpoint (over several evaluation seeds: the measurement noise) and after
   each RL run (the run-to-run noise). Results go to OUT/results.json and OUT/rl_worked_example.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from pathlib import Path

import torch

from openk2.checkpoint import save_model
from openk2.config import ModelConfig
from openk2.model.transformer import Transformer
from openk2.optim.muon import MuonClip
from openk2.rl.env import make_env
from openk2.rl.loss import masked_lm_loss
from openk2.rl.trainer import EnvSpec, RLConfig, RLTrainer, evaluate, lm_batch, plot_history
from openk2.serve.engine import Engine
from openk2.tokenizer import K2Tokenizer
from openk2.tokenizer.chat import encode_chat

ENV_KWARGS = {"min_digits": 1, "max_digits": 2, "ops": "+"}
MAX_TOKENS = 8  # budget: answers are at most 3 digits + <|im_end|>


def model_config() -> ModelConfig:
    """The `tiny` preset made dense and a little wider: MoE routing only slows learning at this size."""
    c = ModelConfig.from_preset("tiny")
    c.hidden_size, c.intermediate_size, c.num_hidden_layers = 96, 384, 2
    c.n_routed_experts = 0
    c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank = 4, 64, 64
    c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim = 32, 16, 32
    c.rope_scaling = None
    return c


def sft(model: Transformer, tokenizer, steps: int, batch: int, seed: int, log) -> None:
    env = make_env("arithmetic", **ENV_KWARGS)
    rows = []
    for task in env.sample_tasks(20_000, seed=seed):
        messages = [{"role": "system", "content": ""}, *task.messages]
        messages.append({"role": "assistant", "content": str(task.answer)})
        enc = encode_chat(tokenizer, messages)
        rows.append((enc.ids, enc.assistant_mask))
    opt = MuonClip(model, lr=0.01, adamw_lr=0.003, weight_decay=0.0)
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


def held_out(model: Transformer, tokenizer, n_tasks: int, seeds: list[int]) -> dict:
    """Greedy accuracy, and accuracy of samples at T = 1 (4 per task) for each evaluation seed."""
    env = make_env("arithmetic", **ENV_KWARGS)
    tasks = env.sample_tasks(n_tasks, seed=12345, split="test")
    engine = Engine(copy.deepcopy(model), tokenizer, max_batch=128, max_seq_len=128)
    greedy = evaluate(engine, env, tasks, MAX_TOKENS, temperature=0.0)["reward"]
    sampled = [evaluate(engine, env, tasks, MAX_TOKENS, 1.0, samples=4, seed=s)["reward"] for s in seeds]
    return {"greedy": greedy, "sampled": sampled, "sampled_mean": statistics.fmean(sampled)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/rl_worked_example")
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--rl-steps", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=3, help="independent RL runs from the SFT checkpoint")
    ap.add_argument("--eval-tasks", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4, help="RL learning rate (Muon; AdamW gets a third)")
    ap.add_argument("--updates", type=int, default=1, help="optimizer steps per batch of rollouts")
    ap.add_argument(
        "--reuse-sft", action="store_true", help="load OUT/sft_STEPS.pt if a previous run saved it"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    torch.manual_seed(0)
    tokenizer = K2Tokenizer.byte_level()
    model = Transformer(model_config())
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, byte-level tokenizer")
    cache = out / f"sft_{args.sft_steps}.pt"
    if args.reuse_sft and cache.is_file():
        model.load_state_dict(torch.load(cache))
        log(f"SFT checkpoint reused from {cache}")
    else:
        sft(model, tokenizer, args.sft_steps, batch=64, seed=0, log=log)
        torch.save(model.state_dict(), cache)
        save_model(model, out / "sft_checkpoint")  # for `openk2 rl configs/rl/... --init`
    t_sft = time.perf_counter() - t_start
    eval_seeds = list(range(args.seeds))
    base = held_out(model, tokenizer, args.eval_tasks, eval_seeds)
    log(f"post-SFT held-out: greedy {base['greedy']:.3f}, sampled {base['sampled']}")
    sft_state = copy.deepcopy(model.state_dict())

    runs = []
    for seed in range(args.seeds):
        policy = Transformer(model_config())
        policy.load_state_dict(sft_state)
        config = RLConfig(
            envs=[EnvSpec("arithmetic", ENV_KWARGS, max_tokens=MAX_TOKENS)],
            steps=args.rl_steps,
            prompts_per_step=16,
            samples_per_prompt=8,
            tau=0.1,
            updates_per_step=args.updates,
            lr=args.lr,
            adamw_lr=args.lr / 3,
            temperature_start=1.0,
            temperature_end=0.7,
            eval_every=10,
            eval_tasks=args.eval_tasks,
            seed=1000 + seed,
            out_dir=str(out / f"rl_seed{seed}"),
        )
        trainer = RLTrainer(
            config, model=policy, tokenizer=tokenizer, log_fn=lambda m, s=seed: log(f"rl{s} {m}")
        )
        history = trainer.train(resume=False, overwrite=True)  # a fresh run; an old one is moved aside
        final = held_out(policy, tokenizer, args.eval_tasks, eval_seeds)
        sync = [h["sync_s"] for h in history if "sync_s" in h]
        log(f"rl seed {seed}: greedy {final['greedy']:.3f}, sampled {final['sampled']}")
        runs.append({"seed": seed, "final": final, "history": history, "sync_s_mean": statistics.fmean(sync)})

    gains_g = [r["final"]["greedy"] - base["greedy"] for r in runs]
    gains_s = [r["final"]["sampled_mean"] - base["sampled_mean"] for r in runs]
    results = {
        "task": {"env": "arithmetic", **ENV_KWARGS, "eval_tasks": args.eval_tasks},
        "sft_steps": args.sft_steps,
        "rl_steps": args.rl_steps,
        "post_sft": base,
        "post_sft_sampled_eval_noise_std": statistics.stdev(base["sampled"]) if len(eval_seeds) > 1 else None,
        "post_rl": [r["final"] for r in runs],
        "gain_greedy": gains_g,
        "gain_sampled": gains_s,
        "gain_greedy_mean_std": [
            statistics.fmean(gains_g),
            statistics.stdev(gains_g) if len(runs) > 1 else 0,
        ],
        "gain_sampled_mean_std": [
            statistics.fmean(gains_s),
            statistics.stdev(gains_s) if len(runs) > 1 else 0,
        ],
        "weight_sync_s_mean": statistics.fmean(r["sync_s_mean"] for r in runs),
        "time_s": {"sft": t_sft, "total": time.perf_counter() - t_start},
        "threads": args.threads,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    for r in runs:
        plot_history(r["history"], out / f"rl_seed{r['seed']}.png", title=f"RL seed {r['seed']}")
    plot_summary(results, runs, out / "rl_worked_example.png")
    log(
        json.dumps(
            {k: results[k] for k in ("post_sft", "post_rl", "gain_greedy_mean_std", "gain_sampled_mean_std")}
        )
    )


def plot_summary(results: dict, runs: list[dict], path: Path) -> None:
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
    fig.suptitle("SFT warm-up, then K1.5 RL on 1-2 digit addition (tiny dense K2 model, CPU)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
