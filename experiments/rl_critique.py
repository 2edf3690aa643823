"""Worked example 3: the self-critique rubric reward, with a critic refreshed on verifiable signals.

    python experiments/rl_critique.py            # results in runs/rl_critique/ (--docs: docs/rl_critique/)

The rubric task is addition asked in words (`What is 12+34?`, env `arithmetic_rubric`), graded by
two rubrics: correctness, and "No initial praise". During RL its reward comes only from the critic,
the policy itself judging pairs of its own responses against the rubrics (openk2/rl/critique.py,
both orders averaged). The critic is refreshed every step on pairs of verifiable rollouts (`a+b=`,
env `arithmetic`, exact-match verifier) whose verifier rewards differ.

1. SFT warm-up of a small dense K2-architecture model (MLA, byte-level tokenizer) from scratch, on
   (a) answers to both prompt forms, half of them opened with "Great question! " (the habit the
   rubric forbids), and (b) judge examples: the critic's own judge prompt on synthetic pairs (right
   vs wrong number, with and without praise) answered "A" or "B" by the rubric. (b) is what makes
   the critic learnable at all: refreshed from scratch, a tiny policy's A/B logits stay at chance.
2. From that one checkpoint, `--seeds` RL runs (K1.5 loss, MuonClip with float32 Newton-Schulz):
   the rubric task rewarded by the critic, the verifiable task by its verifier and feeding the
   critic's refresh.
3. Measured: the critic's accuracy on held-out verifier-labelled pairs (the SFT policy's own samples
   on test-split problems, both orders) over training; held-out reward on both tasks, the rubric
   task scored by the rubric written as code (`RubricArithmeticEnv.score`, never seen by the
   policy); and the rubric win rate of each final policy against the starting one on held-out
   prompts, judged pairwise in both orders by the rubric-as-code, by the frozen starting critic and
   by the run's own final critic. The starting policy against itself (another sampling seed) is the
   noise floor. OUT/results.json and OUT/rl_critique.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
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
from openk2.rl.critique import CritiqueConfig, SelfCritic
from openk2.rl.env import Task, make_env
from openk2.rl.envs.arithmetic import PRAISE
from openk2.rl.loss import masked_lm_loss
from openk2.rl.rollout import prompt_ids, run_requests
from openk2.rl.trainer import EnvSpec, RLConfig, RLTrainer, lm_batch
from openk2.serve.engine import Engine
from openk2.serve.sampling import SamplingParams
from openk2.tokenizer import K2Tokenizer
from openk2.tokenizer.chat import encode_chat

ENV_KWARGS = {"min_digits": 1, "max_digits": 2, "ops": "+"}
MAX_TOKENS = 24  # budget: "Great question! " + 3 digits + <|im_end|> fits
# Short rubrics: the judge prompt (rubrics, question, two responses) must fit the model's positions.
CRITIQUE = CritiqueConfig(
    core=["Correctness: the answer is the right number."],
    prescriptive=["No initial praise: the answer does not open with a compliment."],
    max_pairs_per_group=4,
    max_response_tokens=MAX_TOKENS,
)
VERIFIABLE, RUBRIC = "arithmetic", "arithmetic_rubric"


def model_config() -> ModelConfig:
    """Worked example 1's model (the `tiny` preset made dense and wider) with 384 positions, so a
    judge prompt fits."""
    c = ModelConfig.from_preset("tiny")
    c.hidden_size, c.intermediate_size, c.num_hidden_layers = 96, 384, 2
    c.n_routed_experts = 0
    c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank = 4, 64, 64
    c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim = 32, 16, 32
    c.rope_scaling = None
    c.max_position_embeddings = 384
    return c


def chat_row(tokenizer, messages: list[dict], reply: str) -> tuple[list[int], list[bool]]:
    enc = encode_chat(
        tokenizer, [{"role": "system", "content": ""}, *messages, {"role": "assistant", "content": reply}]
    )
    return enc.ids, enc.assistant_mask


def near_miss(rng: random.Random, answer: int) -> int:
    """A wrong answer of the kind a policy makes: off by one or ten, or one digit changed."""
    wrong = answer
    while wrong == answer or wrong < 0:
        wrong = answer + rng.choice([-10, -2, -1, 1, 2, 10]) if rng.random() < 0.6 else rng.randint(0, 198)
    return wrong


def judge_rows(tokenizer, critic: SelfCritic, n: int, seed: int) -> list[tuple[list[int], list[bool]]]:
    """Judge examples: the critic's prompt on two of {right, wrong} x {plain, praised} answers that the
    rubric ranks differently, answered with the better one's letter."""
    rng = random.Random(seed)
    env = make_env(RUBRIC, **ENV_KWARGS)
    tasks = make_env(VERIFIABLE, **ENV_KWARGS).sample_tasks(n // 2, seed=seed) + env.sample_tasks(
        n // 2, seed=seed
    )
    rows = []
    for task in tasks:
        answers = [str(task.answer), str(near_miss(rng, task.answer))]
        options = answers + [PRAISE + a for a in answers]
        while True:
            a, b = rng.sample(options, 2)
            sa, sb = env.verify(task, a), env.verify(task, b)
            if sa != sb:
                break
        prompt = critic.judge_prompt(critic_question(task), a, b)
        rows.append(judge_row(tokenizer, prompt, "A" if sa > sb else "B"))
    return rows


def judge_row(tokenizer, prompt: list[int], letter: str) -> tuple[list[int], list[bool]]:
    """The judge prompt followed by the letter and <|im_end|>, loss on those two tokens."""
    reply = tokenizer.encode(letter) + [tokenizer.im_end_id]
    return prompt + reply, [False] * len(prompt) + [True] * len(reply)


def critic_question(task: Task) -> str:
    return task.messages[-1]["content"]


def policy_rows(tokenizer, n: int, seed: int, praise_rate: float) -> list[tuple[list[int], list[bool]]]:
    """Answers to both prompt forms, `praise_rate` of them opened with the forbidden compliment."""
    rng = random.Random(seed)
    rows = []
    for name in (VERIFIABLE, RUBRIC):
        for task in make_env(name, **ENV_KWARGS).sample_tasks(n // 2, seed=seed):
            reply = (PRAISE if rng.random() < praise_rate else "") + str(task.answer)
            rows.append(chat_row(tokenizer, task.messages, reply))
    return rows


def sft(model, policy, judge, steps: int, batch: int, judge_batch: int, seed: int, log) -> None:
    opt = MuonClip(model, lr=0.01, adamw_lr=0.003, weight_decay=0.0, ns_dtype="float32")
    rng = random.Random(seed)
    model.train()
    for step in range(1, steps + 1):
        ids, mask = lm_batch(rng.sample(policy, batch))
        loss = masked_lm_loss(model(ids), ids, mask)
        jids, jmask = lm_batch(rng.sample(judge, judge_batch))
        jloss = masked_lm_loss(model(jids), jids, jmask)
        opt.zero_grad(set_to_none=True)
        (loss + jloss).backward()
        opt.step()
        if step % 50 == 0 or step == steps:
            log(f"sft step {step}/{steps} answer loss {loss.item():.3f} judge loss {jloss.item():.3f}")


def sample_responses(
    model, tokenizer, tasks: list[Task], temperature: float, n: int, seed: int
) -> list[list[str]]:
    """n responses per task from `model` (its own engine copy), `MAX_TOKENS` budget."""
    engine = Engine(copy.deepcopy(model).eval(), tokenizer, max_batch=128, max_seq_len=128)
    prompts = [prompt_ids(tokenizer, t, "") for t in tasks]
    params = [
        SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, n=n, seed=seed * 7919 + i)
        for i in range(len(tasks))
    ]
    return [[c.text for c in out.completions] for out in run_requests(engine, prompts, params)]


def heldout_pairs(model, tokenizer, critic: SelfCritic, n_tasks: int) -> dict[str, list]:
    """Held-out verifier-labelled pairs: the starting policy's samples (4 per test-split problem, T = 1)
    whose verifier rewards differ, in both orders. `correctness`: both answers bare numbers, so only
    the sum tells them apart (no praise to spot)."""
    env = make_env(VERIFIABLE, **ENV_KWARGS)
    tasks = env.sample_tasks(n_tasks, seed=777, split="test")
    out = {"all": [], "correctness": []}
    rng = random.Random(0)
    for task, texts in zip(tasks, sample_responses(model, tokenizer, tasks, 1.0, 4, seed=777)):
        rewards = [env.verify(task, t) for t in texts]
        pairs = critic.refresh_pairs(critic_question(task), texts, rewards, rng)
        out["all"] += pairs
        plain = [i for i, t in enumerate(texts) if not t.startswith(PRAISE.strip())]
        out["correctness"] += critic.refresh_pairs(
            critic_question(task), [texts[i] for i in plain], [rewards[i] for i in plain], rng
        )
    return out


@torch.no_grad()
def pair_logits(critic: SelfCritic, pairs: list, chunk: int = 128) -> torch.Tensor:
    """The critic's (P, 2) "A"/"B" logits on labelled pairs, in eval mode, `chunk` prompts a forward."""
    was_training = critic.model.training
    critic.model.eval()
    logits = torch.cat(
        [critic.choice_logits([p for p, _ in pairs[i : i + chunk]]) for i in range(0, len(pairs), chunk)]
    )
    critic.model.train(was_training)
    return logits


def critic_accuracy(critic: SelfCritic, pairs: list) -> float | None:
    if not pairs:
        return None
    labels = torch.tensor([y for _, y in pairs])
    return int((pair_logits(critic, pairs).argmax(-1) == labels).sum()) / len(pairs)


def critic_letters(critic: SelfCritic, pairs: list) -> dict | None:
    """How the critic answers the held-out pairs regardless of the labels: the share it answers "A",
    and the range of its probability of "A" (a critic that answers one letter whatever it reads is at
    chance for a reason no accuracy shows)."""
    if not pairs:
        return None
    p_a = pair_logits(critic, pairs).softmax(-1)[:, 0]
    return {
        "share_a": float((p_a > 0.5).float().mean()),
        "p_a_min": float(p_a.min()),
        "p_a_max": float(p_a.max()),
    }


@torch.no_grad()
def critic_win_rate(critic: SelfCritic, tasks: list[Task], new: list[str], old: list[str]) -> float:
    """Mean P(new better than old) under `critic`, each pair judged in both orders and averaged."""
    was_training = critic.model.training
    critic.model.eval()
    wins = []
    for task, a, b in zip(tasks, new, old):
        wins.append(critic.rewards(critic_question(task), [a, b])[0])
    critic.model.train(was_training)
    return statistics.fmean(wins)


def oracle_win_rate(env, tasks: list[Task], new: list[str], old: list[str]) -> float:
    """The same win rate with the rubric as code as the judge: 1 / 0.5 / 0 by rubric score."""
    score = [
        (env.verify(t, a) > env.verify(t, b)) + 0.5 * (env.verify(t, a) == env.verify(t, b))
        for t, a, b in zip(tasks, new, old)
    ]
    return statistics.fmean(score)


def praise_rate(texts: list[str]) -> float:
    return statistics.fmean(t.startswith(PRAISE.strip()) for t in texts)


class CritiqueTrainer(RLTrainer):
    """The RL trainer with the critic's held-out accuracy added to every evaluation."""

    def __init__(self, *args, heldout: dict[str, list], **kwargs):
        super().__init__(*args, **kwargs)
        self.heldout = heldout

    def evaluate(self, seed: int = 0) -> dict:
        out = super().evaluate(seed)
        for kind, pairs in self.heldout.items():
            out[f"eval/critic_accuracy/{kind}"] = critic_accuracy(self.critic, pairs)
        return out


def compare(start, final, start_critic, final_critic, tokenizer, tasks, env, temperature, seed) -> dict:
    """Win rates of `final` against `start` on held-out rubric prompts (one response each per task)."""
    old = [r[0] for r in sample_responses(start, tokenizer, tasks, temperature, 1, seed)]
    new = [r[0] for r in sample_responses(final, tokenizer, tasks, temperature, 1, seed + 1)]
    return {
        "oracle": oracle_win_rate(env, tasks, new, old),
        "start_critic": critic_win_rate(start_critic, tasks, new, old),
        "final_critic": critic_win_rate(final_critic, tasks, new, old),
        "rubric_score_new": statistics.fmean(env.verify(t, r) for t, r in zip(tasks, new)),
        "rubric_score_old": statistics.fmean(env.verify(t, r) for t, r in zip(tasks, old)),
        "praise_new": praise_rate(new),
        "praise_old": praise_rate(old),
    }


def mean_std(xs: list[float]) -> list[float]:
    return [statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]


def rl_config(args: argparse.Namespace, seed: int, out: Path) -> RLConfig:
    """One RL run: the rubric task rewarded by the critic, the verifiable task by its verifier (and
    feeding the critic's refresh), K1.5 with one MuonClip update per batch, float32 Newton-Schulz."""
    return RLConfig(
        envs=[
            EnvSpec(VERIFIABLE, ENV_KWARGS, max_tokens=MAX_TOKENS, reward="verifier"),
            EnvSpec(RUBRIC, ENV_KWARGS, max_tokens=MAX_TOKENS, reward="critique"),
        ],
        steps=args.rl_steps,
        prompts_per_step=8,
        samples_per_prompt=4,
        tau=0.1,
        lr=args.lr,
        adamw_lr=args.lr / 3,
        ns_dtype="float32",
        temperature_start=1.0,
        temperature_end=0.7,
        critic="policy",
        critic_weight=args.critic_weight,
        critique=CRITIQUE,
        eval_every=max(1, args.rl_steps // 3),
        eval_tasks=16 if args.quick else 100,
        seed=1000 + seed,
        out_dir=str(out / f"rl_seed{seed}"),
    )


def rl_run(seed: int, args, state: dict, heldout: dict, tasks: list[Task], out: Path) -> dict:
    """One RL run from the SFT weights `state`, then its win rates against them and its critic."""
    torch.set_num_threads(args.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    tokenizer = K2Tokenizer.byte_level()
    rubric_env = make_env(RUBRIC, **ENV_KWARGS)
    start = Transformer(model_config())
    start.load_state_dict(state)
    start.eval()
    start_critic = SelfCritic(start, tokenizer, CRITIQUE)
    policy = copy.deepcopy(start).train()

    def log(msg: str) -> None:
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"[rl{seed} {wall:6.0f}s wall, {cpu:6.0f}s cpu] {msg}", flush=True)

    trainer = CritiqueTrainer(
        rl_config(args, seed, out), model=policy, tokenizer=tokenizer, heldout=heldout, log_fn=log
    )
    history = trainer.train(resume=False, overwrite=True)
    stop_if_interrupted(trainer, f"rl seed {seed}")
    policy.eval()
    result = {
        "seed": seed,
        "greedy": compare(start, policy, start_critic, trainer.critic, tokenizer, tasks, rubric_env, 0.0, 0),
        "sampled": compare(start, policy, start_critic, trainer.critic, tokenizer, tasks, rubric_env, 1.0, 0),
        "critic_accuracy": {k: critic_accuracy(trainer.critic, v) for k, v in heldout.items()},
        "critic_letters": critic_letters(trainer.critic, heldout["all"]),
        "cpu_s": time.process_time() - c0,
        "history": history,
    }
    log(json.dumps({k: result[k] for k in ("greedy", "sampled", "critic_accuracy", "cpu_s")}))
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", default=None, help="output directory (default runs/rl_critique, --docs: docs/rl_critique)"
    )
    ap.add_argument("--docs", action="store_true", help="write into docs/rl_critique (the committed result)")
    ap.add_argument("--quick", action="store_true", help="a tiny end-to-end run (tests): few steps, 1 seed")
    ap.add_argument("--sft-steps", type=int, default=200)
    ap.add_argument("--rl-steps", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=3, help="independent RL runs from the SFT checkpoint")
    ap.add_argument("--eval-tasks", type=int, default=100, help="held-out prompts for the win rates")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--jobs", type=int, default=3, help="RL runs in parallel (one process each)")
    ap.add_argument("--reuse-sft", help="load the SFT checkpoint from this directory instead of training it")
    ap.add_argument("--lr", type=float, default=3e-4, help="RL learning rate (Muon; AdamW gets a third)")
    ap.add_argument("--critic-weight", type=float, default=1.0, help="weight of the critic refresh (0: off)")
    ap.add_argument("--praise-rate", type=float, default=0.5, help="share of SFT answers opened with praise")
    args = ap.parse_args(argv)
    if args.quick:
        args.sft_steps, args.rl_steps, args.seeds, args.eval_tasks, args.jobs = 2, 1, 1, 8, 1
    torch.set_num_threads(args.threads)
    out = Path(args.out or ("docs/rl_critique" if args.docs else "runs/rl_critique"))
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()

    def log(msg: str) -> None:
        print(
            f"[{time.perf_counter() - t0:6.0f}s wall, {time.process_time() - c0:6.0f}s cpu] {msg}", flush=True
        )

    torch.manual_seed(0)
    tokenizer = K2Tokenizer.byte_level()
    model = Transformer(model_config())
    critic = SelfCritic(model, tokenizer, CRITIQUE)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, byte-level tokenizer")
    if args.reuse_sft:
        model.load_state_dict(load_model(args.reuse_sft, dtype=torch.float32).state_dict())
        log(f"SFT checkpoint reused from {args.reuse_sft}")
    else:
        n_rows = 200 if args.quick else 20_000
        sft(
            model,
            policy_rows(tokenizer, n_rows, seed=0, praise_rate=args.praise_rate),
            judge_rows(tokenizer, critic, n_rows // 2, seed=1),
            args.sft_steps,
            batch=64,
            judge_batch=16,
            seed=0,
            log=log,
        )
        save_model(model, out / "sft_checkpoint")  # loads in openk2 sample/eval/rl --init
    t_sft = time.perf_counter() - t0
    heldout = heldout_pairs(model, tokenizer, critic, 8 if args.quick else 150)
    start_accuracy = {k: critic_accuracy(critic, v) for k, v in heldout.items()}
    sizes = {k: len(v) for k, v in heldout.items()}
    log(f"held-out verifiable pairs: {sizes}; critic accuracy {start_accuracy}")
    rubric_env = make_env(RUBRIC, **ENV_KWARGS)
    tasks = rubric_env.sample_tasks(args.eval_tasks, seed=4242, split="test")
    start = copy.deepcopy(model).eval()
    start_critic = SelfCritic(start, tokenizer, CRITIQUE)
    noise = {  # the starting policy against itself: greedy is exactly 0.5, sampled shows the noise
        "greedy": compare(start, start, start_critic, start_critic, tokenizer, tasks, rubric_env, 0.0, 0),
        "sampled": compare(start, start, start_critic, start_critic, tokenizer, tasks, rubric_env, 1.0, 0),
    }
    log(f"start vs start (noise floor): {json.dumps(noise)}")

    state = {k: v.clone() for k, v in start.state_dict().items()}
    jobs = [(seed, args, state, heldout, tasks, out) for seed in range(args.seeds)]
    if args.jobs > 1:  # one process per RL run (fork: the children share the loaded modules)
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(min(args.jobs, args.seeds)) as pool:
            runs = pool.starmap(rl_run, jobs)
    else:
        runs = [rl_run(*job) for job in jobs]

    def spread(kind: str, key: str) -> list[float]:
        return mean_std([r[kind][key] for r in runs])

    results = {
        "task": {"verifiable": VERIFIABLE, "rubric": RUBRIC, **ENV_KWARGS, "max_tokens": MAX_TOKENS},
        "rubrics": {"core": CRITIQUE.core, "prescriptive": CRITIQUE.prescriptive},
        "args": vars(args),
        "precision": "float32 weights, float32 Newton-Schulz (ns_dtype pinned)",
        "heldout_pairs": {k: len(v) for k, v in heldout.items()},
        "critic_accuracy_start": start_accuracy,
        "critic_accuracy_final": {k: [r["critic_accuracy"][k] for r in runs] for k in heldout},
        "critic_letters_start": critic_letters(critic, heldout["all"]),
        "critic_letters_final": [r["critic_letters"] for r in runs],
        "noise_floor_start_vs_start": noise,
        "win_rate_vs_start": {
            kind: {k: spread(kind, k) for k in ("oracle", "start_critic", "final_critic")}
            for kind in ("greedy", "sampled")
        },
        "rubric_score": {
            kind: {"start": noise[kind]["rubric_score_old"], "final": spread(kind, "rubric_score_new")}
            for kind in ("greedy", "sampled")
        },
        "praise_rate": {
            kind: {"start": noise[kind]["praise_old"], "final": spread(kind, "praise_new")}
            for kind in ("greedy", "sampled")
        },
        "runs": [{k: v for k, v in r.items() if k != "history"} for r in runs],
        "curves": [
            [
                {
                    k: v
                    for k, v in h.items()
                    if k.startswith("eval/") or k in ("step", "reward", "critic_accuracy")
                }
                for h in r["history"]
            ]
            for r in runs
        ],
        "time_s": {
            "sft_wall": t_sft,
            "total_wall": time.perf_counter() - t0,
            "main_process_cpu": time.process_time() - c0,
            "rl_runs_cpu": [r["cpu_s"] for r in runs],
        },
        "threads": args.threads,
    }
    write_json(out / "results.json", results, indent=2)
    plot(results, out / "rl_critique.png")
    log(
        json.dumps(
            {
                k: results[k]
                for k in ("critic_accuracy_start", "critic_accuracy_final", "win_rate_vs_start", "time_s")
            }
        )
    )
    return results


def plot(results: dict, path: Path) -> None:
    """Held-out rubric score and verifiable accuracy, the critic's held-out accuracy, and the win rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    keys = (
        (f"eval/{RUBRIC}/reward", "held-out rubric score (rubric as code)"),
        (f"eval/{VERIFIABLE}/reward", "held-out verifiable accuracy"),
        ("eval/critic_accuracy/all", "critic accuracy, held-out verifiable pairs"),
    )
    for seed, curve in enumerate(results["curves"]):
        for ax, (key, title) in zip(axes, keys):
            pts = [(h["step"], h[key]) for h in curve if h.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", label=f"seed {seed}")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("RL step")
        pts = [
            (h["step"], h["eval/critic_accuracy/correctness"])
            for h in curve
            if h.get("eval/critic_accuracy/correctness") is not None
        ]
        if pts:
            axes[2].plot(*zip(*pts), "x--", alpha=0.6, label=f"seed {seed}, bare numbers only")
    axes[2].axhline(0.5, color="grey", lw=0.8)
    for ax, size in ((axes[0], 7), (axes[2], 6)):
        if ax.get_legend_handles_labels()[0]:  # a --quick run may have no held-out points yet
            ax.legend(fontsize=size)
    win = results["win_rate_vs_start"]
    judges = ("oracle", "start_critic", "final_critic")
    for i, kind in enumerate(("greedy", "sampled")):
        means = [win[kind][j][0] for j in judges]
        stds = [win[kind][j][1] for j in judges]
        axes[3].bar([x + 0.4 * i for x in range(3)], means, 0.4, yerr=stds, label=kind)
    axes[3].axhline(0.5, color="grey", lw=0.8)
    axes[3].set_xticks(
        [x + 0.2 for x in range(3)], ["rubric as code", "start critic", "final critic"], fontsize=8
    )
    axes[3].set_title("win rate of RL policy vs start (both orders)", fontsize=9)
    axes[3].legend(fontsize=7)
    fig.suptitle(
        "Self-critique rubric reward, critic refreshed on verifiable pairs (tiny dense K2 model, CPU)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
