"""Worked example 2: multi-turn RL on a task the model can only solve by calling a tool.

    python experiments/rl_tool_use.py            # results in runs/rl_tool_use/
    python experiments/rl_tool_use.py --docs     # ... in docs/rl_tool_use/ (what docs/rl_tool_use.md shows)
    python experiments/rl_tool_use.py --quick    # a smoke run in seconds (the test suite runs it)

The `lookup` environment (openk2/rl/envs/lookup.py) asks for the value of a key in a random table drawn
per task (keys of 3 digits here, see ENV_KWARGS), which only the `lookup(key)` tool can read. An episode
is: the question -> an assistant turn with a K2 tool call (`<|tool_calls_section_begin|>...`) -> the
tool's reply, appended by the rollout worker through the chat template -> an assistant turn with the
value. Success needs the right key in the call and the value copied back; guessing has one chance in
900.

1. A small dense K2-architecture model (MLA, byte-level tokenizer) gets an SFT warm-up on 4000
   demonstration episodes (loss on the assistant turns only), stopped early by a validation-success
   rule (`sft`), while it solves only part of the held-out tasks at T = 1.
2. From that one checkpoint, `--seeds` independent RL runs (`RLTrainer`: multi-turn rollouts through
   the in-process engine, the real environment step and tool, the K1.5 loss over the assistant
   tokens, MuonClip with float32 Newton-Schulz) each train for `--rl-steps` steps.
3. Held-out success (test-split tasks, whole episodes, never trained on) is measured greedy and at
   T = 1 over several evaluation seeds (the measurement noise) for the SFT checkpoint and after each
   RL run (the run-to-run spread). Results go to OUT/results.json and OUT/rl_tool_use.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared harness, when imported from elsewhere
from harness import stop_if_interrupted, write_json

from openk2.config import ModelConfig
from openk2.model.transformer import Transformer
from openk2.optim.muon import MuonClip
from openk2.rl.env import make_env
from openk2.rl.loss import masked_lm_loss
from openk2.rl.rollout import Budget, prompt_messages
from openk2.rl.trainer import EnvSpec, RLConfig, RLTrainer, evaluate, lm_batch, plot_history
from openk2.serve.engine import Engine
from openk2.tokenizer import K2Tokenizer
from openk2.tokenizer.chat import encode_chat

ENV = "lookup"
# Keys are digit strings ("What is the value of 482?"): with letter keys this model never learns to
# copy the key into the call (docs/rl_tool_use.md), with digit keys it does.
ENV_KWARGS = {"table_size": 4, "key_len": 3, "value_digits": 3, "max_turns": 3, "alphabet": "0123456789"}
# per assistant turn (a call is ~38 byte tokens), turns per episode, tokens per appended tool reply
SPEC = {"max_tokens": 48, "max_turns": 3, "tool_tokens": 96}
NS_DTYPE = "float32"  # pinned: the result must not depend on whether the CPU has bf16 units
POSITIONS = 1024


def model_config() -> ModelConfig:
    """The `tiny` preset made dense and a little wider (as in the arithmetic example), with room for
    a whole episode: the prompt with its tool declaration is ~265 byte tokens."""
    c = ModelConfig.from_preset("tiny")
    c.hidden_size, c.intermediate_size, c.num_hidden_layers = 96, 384, 2
    c.n_routed_experts = 0
    c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank = 4, 64, 64
    c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim = 32, 16, 32
    c.rope_scaling = None
    c.max_position_embeddings = POSITIONS
    return c


def budget() -> Budget:
    return EnvSpec(ENV, ENV_KWARGS, **SPEC).budget()


def demonstration(task) -> list[dict]:
    """The oracle episode of a task: call lookup with the asked key, answer with its value."""
    key = task.metadata["key"]
    call = {
        "id": "functions.lookup:0",
        "type": "function",
        "function": {"name": "lookup", "arguments": json.dumps({"key": key})},
    }
    return [
        *prompt_messages(task, ""),
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "functions.lookup:0", "content": task.metadata["table"][key]},
        {"role": "assistant", "content": task.answer},
    ]


def sft(
    model: Transformer,
    tokenizer,
    demos: int,
    steps: int,
    batch: int,
    lr: float,
    log,
    curve_tasks: int = 50,
    start: int = 0,
    stop_at: float = 0.0,
) -> list[dict]:
    """Warm-up on `demos` demonstration episodes (train split), loss on the assistant turns only.
    Returns the curve: loss, and greedy held-out success on `curve_tasks` tasks every 50 steps.
    `start` > 0 continues weights already trained that many steps (a fresh optimizer state).

    `stop_at` > 0 stops early, at the first check (every 5 steps once the batch loss is below 0.25)
    where greedy success on `curve_tasks` validation tasks (train split, tables never trained on)
    reaches it. The copy skills this task needs arrive in a jump (held-out success goes from 0.1 to
    1.0 within ~20 steps), so a fixed step count lands on a different point of the jump with another
    thread count or CPU; a success threshold lands on the same point everywhere."""
    env = make_env(ENV, **ENV_KWARGS)
    rows = []
    for task in env.sample_tasks(demos, seed=0):
        enc = encode_chat(tokenizer, demonstration(task), tools=task.tools)
        rows.append((enc.ids, enc.assistant_mask))
    opt = MuonClip(model, lr=lr, adamw_lr=lr / 3, weight_decay=0.0, ns_dtype=NS_DTYPE)
    rng = random.Random(start)
    model.train()
    curve = []
    for step in range(start + 1, steps + 1):
        ids, mask = lm_batch(rng.sample(rows, min(batch, len(rows))))
        loss = masked_lm_loss(model(ids), ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if stop_at > 0 and step % 5 == 0 and loss.item() < 0.25:
            val = held_out(model, tokenizer, curve_tasks, [], split="train", seed=777)["greedy"]
            model.train()
            log(f"sft step {step} loss {loss.item():.3f} validation greedy ({curve_tasks} tasks) {val:.2f}")
            if val >= stop_at:
                curve.append({"step": step, "loss": loss.item(), "validation_greedy": val, "stopped": True})
                break
        if step % 50 == 0 or step == steps:
            success = held_out(model, tokenizer, curve_tasks, [])["greedy"]
            model.train()
            curve.append({"step": step, "loss": loss.item(), "greedy_50": success})
            log(
                f"sft step {step}/{steps} loss {loss.item():.3f} "
                f"held-out greedy ({curve_tasks} tasks) {success:.2f}"
            )
    return curve


def held_out(
    model: Transformer, tokenizer, n_tasks: int, eval_seeds: list[int], split: str = "test", seed: int = 12345
) -> dict:
    """Success on test-split tasks, whole episodes: greedy, and one sample per task at T = 1 for each
    evaluation seed (their spread is the measurement noise). `split="train"` with another `seed`
    gives validation tasks (the SFT stopping rule's), never the held-out ones."""
    env = make_env(ENV, **ENV_KWARGS)
    tasks = env.sample_tasks(n_tasks, seed=seed, split=split)
    b = budget()
    prompt = max(len(encode_chat(tokenizer, prompt_messages(t, ""), tools=t.tools).ids) for t in tasks)
    engine = Engine(
        copy.deepcopy(model), tokenizer, max_batch=64, max_seq_len=min(POSITIONS, b.context(prompt + 8, True))
    )
    greedy = evaluate(engine, env, tasks, b, temperature=0.0)
    sampled = [evaluate(engine, env, tasks, b, 1.0, samples=1, seed=s)["reward"] for s in eval_seeds]
    return {
        "greedy": greedy["reward"],
        "greedy_tool_calls": greedy["tool_calls"],
        "greedy_truncation": greedy["truncation"],
        "sampled": sampled,
        "sampled_mean": statistics.fmean(sampled) if sampled else None,
    }


def _children_cpu() -> float:
    """CPU seconds of finished child processes (the --jobs workers)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def cpu_info() -> dict:
    flags = ""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    name = platform.processor()
    try:
        name = (
            next(line for line in open("/proc/cpuinfo") if line.startswith("model name"))
            .split(":")[1]
            .strip()
        )
    except (OSError, StopIteration):
        pass
    return {"cpu": name, "avx512_bf16": "avx512_bf16" in flags, "cores_visible": os.cpu_count()}


def _set_task(args: argparse.Namespace) -> None:
    """The task's size from the command line (in this process and in each --jobs worker)."""
    ENV_KWARGS["key_len"] = getattr(args, "key_len", ENV_KWARGS["key_len"])
    ENV_KWARGS["value_digits"] = getattr(args, "value_digits", ENV_KWARGS["value_digits"])
    ENV_KWARGS["alphabet"] = getattr(args, "alphabet", ENV_KWARGS["alphabet"])


def rl_run(job: tuple) -> dict:
    """One RL run from the SFT weights (a process of its own with --jobs > 1): train, then held-out."""
    seed, a, sft_path, eval_seeds, t_start = job
    args = argparse.Namespace(**a)
    _set_task(args)
    torch.set_num_threads(args.threads if args.jobs == 1 else 1)
    out = Path(args.out)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] rl{seed} {msg}", flush=True)

    tokenizer = K2Tokenizer.byte_level()
    policy = Transformer(model_config())
    policy.load_state_dict(torch.load(sft_path, weights_only=True)["model"])
    config = RLConfig(
        envs=[EnvSpec(ENV, ENV_KWARGS, **SPEC)],
        steps=args.rl_steps,
        prompts_per_step=args.prompts,
        samples_per_prompt=args.k,
        tau=0.1,
        lr=args.lr,
        adamw_lr=args.lr / 3,
        ns_dtype=NS_DTYPE,
        temperature_start=1.0,
        temperature_end=0.7,
        eval_every=max(1, args.rl_steps // 4),
        eval_tasks=min(args.eval_tasks, 50),
        engine_batch=64,
        seed=1000 + seed,
        out_dir=str(out / f"rl_seed{seed}"),
    )
    trainer = RLTrainer(config, model=policy, tokenizer=tokenizer, log_fn=log)
    history = trainer.train(resume=False, overwrite=True)  # a fresh run; an old one is moved aside
    stop_if_interrupted(trainer, f"rl seed {seed}")
    final = held_out(policy, tokenizer, args.eval_tasks, eval_seeds)
    log(f"final held-out: greedy {final['greedy']:.3f}, sampled {final['sampled']}")
    return {"seed": seed, "final": final, "history": history}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/rl_tool_use")
    ap.add_argument("--docs", action="store_true", help="write to docs/rl_tool_use (the documented run)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, seconds")
    ap.add_argument("--key-len", type=int, default=ENV_KWARGS["key_len"], help="characters per key")
    ap.add_argument("--alphabet", default=ENV_KWARGS["alphabet"], help="characters keys are drawn from")
    ap.add_argument("--value-digits", type=int, default=ENV_KWARGS["value_digits"], help="digits per value")
    ap.add_argument("--demos", type=int, default=4000, help="SFT demonstration episodes")
    ap.add_argument("--sft-steps", type=int, default=400, help="SFT steps at most")
    ap.add_argument(
        "--sft-stop-at",
        type=float,
        default=0.5,
        help="stop SFT once greedy success on 50 validation tasks reaches this (0: run --sft-steps)",
    )
    ap.add_argument("--sft-batch", type=int, default=16)
    ap.add_argument("--sft-lr", type=float, default=0.005)
    ap.add_argument("--rl-steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=3, help="independent RL runs from the SFT checkpoint")
    ap.add_argument("--eval-tasks", type=int, default=100)
    ap.add_argument("--eval-seeds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=6, help="prompts per RL step")
    ap.add_argument("--k", type=int, default=8, help="samples (episodes) per prompt")
    ap.add_argument("--lr", type=float, default=6e-4, help="RL learning rate (Muon; AdamW gets a third)")
    ap.add_argument(
        "--reuse-sft",
        action="store_true",
        help="load OUT/sft_state.pt left by an interrupted run (and continue it to --sft-steps)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads (per process with --jobs 1)")
    ap.add_argument("--jobs", type=int, default=3, help="RL runs in parallel processes, one thread each")
    args = ap.parse_args(argv)
    if args.docs:
        args.out = "docs/rl_tool_use"
    if args.quick:
        args.demos, args.sft_steps, args.rl_steps, args.seeds, args.jobs = 16, 4, 2, 2, 1
        args.eval_tasks, args.eval_seeds, args.prompts, args.k = 4, 2, 2, 2
    _set_task(args)
    try:
        make_env(ENV, **ENV_KWARGS)
    except ValueError as e:
        ap.error(str(e))
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start, cpu_start = time.perf_counter(), time.process_time()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    torch.manual_seed(0)
    tokenizer = K2Tokenizer.byte_level()
    model = Transformer(model_config())
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, byte-level tokenizer")
    # the SFT weights and curve, in one file written atomically (a kill leaves the previous one whole);
    # kept until the RL runs finished, for --reuse-sft after a failure
    sft_path = out / "sft_state.pt"
    sft_curve, start = [], 0
    if args.reuse_sft and sft_path.is_file():
        saved = torch.load(sft_path, weights_only=True)
        model.load_state_dict(saved["model"])
        sft_curve = saved["sft_curve"]
        start = sft_curve[-1]["step"]
        log(f"SFT weights reused from {sft_path} (step {start})")
    stopped = bool(sft_curve) and sft_curve[-1].get("stopped", False)  # the stopping rule already met
    if start < args.sft_steps and not stopped:
        sft_curve += sft(
            model,
            tokenizer,
            args.demos,
            args.sft_steps,
            args.sft_batch,
            args.sft_lr,
            log,
            min(50, args.eval_tasks),
            start,
            args.sft_stop_at,
        )
        tmp = sft_path.with_name(f".{sft_path.name}.tmp")
        torch.save({"model": model.state_dict(), "sft_curve": sft_curve}, tmp)
        os.replace(tmp, sft_path)
    cpu_sft = time.process_time() - cpu_start
    eval_seeds = list(range(args.eval_seeds))
    base = held_out(model, tokenizer, args.eval_tasks, eval_seeds)
    log(f"post-SFT held-out: greedy {base['greedy']:.3f}, sampled {base['sampled']}")

    jobs = [(seed, vars(args), str(sft_path), eval_seeds, t_start) for seed in range(args.seeds)]
    if args.jobs > 1:  # separate processes (one thread each), as a result they do not share any state
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = list(pool.map(rl_run, jobs))
    else:
        runs = [rl_run(job) for job in jobs]
    sft_path.unlink()

    gains_g = [r["final"]["greedy"] - base["greedy"] for r in runs]
    gains_s = [r["final"]["sampled_mean"] - base["sampled_mean"] for r in runs]
    n = args.eval_tasks
    p = base["greedy"]
    results = {
        "task": {"env": ENV, **ENV_KWARGS, **SPEC, "eval_tasks": n},
        "command": " ".join(
            ["python", "experiments/rl_tool_use.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "args": vars(args),
        "ns_dtype": NS_DTYPE,
        "dtype": "float32",
        "sft_curve": sft_curve,
        "sft_continued_from_step": start or None,
        "post_sft": base,
        "post_rl": [r["final"] for r in runs],
        "gain_greedy": gains_g,
        "gain_sampled": gains_s,
        "gain_greedy_mean_std": [statistics.fmean(gains_g), _std(gains_g)],
        "gain_sampled_mean_std": [statistics.fmean(gains_s), _std(gains_s)],
        "eval_noise": {
            "post_sft_sampled_std_over_eval_seeds": _std(base["sampled"]),
            "binomial_std_greedy_post_sft": (p * (1 - p) / n) ** 0.5,
        },
        "time_s": {
            "wall_total": time.perf_counter() - t_start,
            "cpu_total": time.process_time() - cpu_start + _children_cpu(),
            "cpu_sft": cpu_sft,
        },
        "threads": args.threads,
        "machine": cpu_info(),
        "torch": torch.__version__,
    }
    write_json(out / "results.json", results, indent=2)
    for r in runs:
        plot_history(r["history"], out / f"rl_seed{r['seed']}.png", title=f"lookup RL seed {r['seed']}")
    plot_summary(results, runs, out / "rl_tool_use.png")
    log(json.dumps({k: results[k] for k in ("gain_greedy_mean_std", "gain_sampled_mean_std", "time_s")}))
    return results


def plot_summary(results: dict, runs: list[dict], path: Path) -> None:
    """Held-out success per RL seed over the run, the rollout reward, and tool calls per episode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    base = results["post_sft"]
    for r in runs:
        h = r["history"]
        ev = [(x["step"], x["eval/reward"]) for x in h if "eval/reward" in x]
        axes[0].plot(*zip(*ev), "o-", label=f"seed {r['seed']}")
        for ax, key in zip(axes[1:3], ("reward", "tool_calls")):
            pts = [(x["step"], x[key]) for x in h if key in x]
            if pts:
                ax.plot(*zip(*pts), alpha=0.8)
    n_during = min(results["task"]["eval_tasks"], 50)
    axes[0].set_title(f"held-out greedy success ({n_during} tasks, during RL)", fontsize=10)
    axes[0].legend(fontsize=8)
    axes[1].set_title("rollout reward", fontsize=10)
    axes[2].set_title("tool calls per episode", fontsize=10)
    labels = ["post-SFT"] + [f"RL seed {r['seed']}" for r in runs]
    greedy = [base["greedy"]] + [r["final"]["greedy"] for r in runs]
    sampled = [base["sampled_mean"]] + [r["final"]["sampled_mean"] for r in runs]
    sampled_err = [_std(base["sampled"])] + [_std(r["final"]["sampled"]) for r in runs]
    xs = range(len(labels))
    axes[3].bar([x - 0.2 for x in xs], greedy, 0.4, label="greedy")
    axes[3].bar(
        [x + 0.2 for x in xs], sampled, 0.4, yerr=sampled_err, capsize=3, label="T = 1 (std over eval seeds)"
    )
    axes[3].set_xticks(list(xs), labels, fontsize=8)
    axes[3].set_ylim(0, 1)
    axes[3].set_title(f"held-out success ({results['task']['eval_tasks']} tasks)", fontsize=10)
    axes[3].legend(fontsize=7)
    for ax in axes[:3]:
        ax.set_xlabel("RL step")
    fig.suptitle(
        "SFT warm-up, then multi-turn K1.5 RL on `lookup` (facts only a tool sees; tiny K2 model, CPU)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
