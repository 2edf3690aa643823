"""The RL trainer: rollouts from the in-process engine, the K1.5 loss, MuonClip, weight sync.

One iteration:
  1. temperature from the decay schedule; draw prompts from the environments (by weight);
  2. roll out K samples per prompt through the engine (budget control, partial rollout); groups
     that finish in this iteration are scored by their verifier or by the self-critic;
  3. pi_old: the trainer recomputes the log-probs of the sampled tokens (a multi-turn episode's tool
     outputs and user turns are context, outside the loss mask) with the current weights before the
     update. These are the weights the engine sampled with (they are synced after every step), so
     this *is* the rollout policy; recomputing rather than reusing the engine's recorded log-probs
     keeps the loss exact for resumed partial rollouts (their early tokens came from older weights)
     and free of the small numeric gap between the engine's absorbed-MLA cached path and the
     training forward. The gap is logged (`engine_logprob_gap`) as a sync health check;
  4. `updates_per_step` MuonClip steps on loss = K1.5 + ptx_weight * PTX (+ critic refresh);
  5. copy the weights into the engine (`Engine.load_weights`, timed), evaluate now and then, log.

`RLTrainer.train` runs these iterations on the one run driver (`openk2.train.run.Run`): the run
directory and its refusals, metrics.jsonl, SIGINT/SIGTERM, and checkpoints with the model, the
tokenizer and the trainer state, so a run directory loads in `openk2 sample/serve/eval` and resumes.
A resume restores weights, optimizer, RNGs, the task and rollout counters, the partial rollouts in
flight (`step_tokens`) and a separate critic, so it continues the run exactly: a run killed with
SIGKILL and resumed ends with the same weights, bit for bit, as one never interrupted.

With `rollout_server`, the engine is another process (`openk2 serve --weight-update-token`,
openk2.rl.weight_sync): rollouts go to it over HTTP and step 5 pushes the weights to it.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from openk2.checkpoint import load_model
from openk2.config import PRESETS, ModelConfig
from openk2.model.transformer import Transformer
from openk2.optim.muon import MuonClip
from openk2.rl.critique import CritiqueConfig, SelfCritic, question_text
from openk2.rl.env import Environment, Task, make_env
from openk2.rl.loss import k15_loss, masked_lm_loss, pack_sequences, sequence_logprobs
from openk2.rl.rollout import Budget, Group, RolloutWorker, prompt_ids, run_requests
from openk2.rl.schedules import TemperatureSchedule
from openk2.rl.state import from_plain, to_plain
from openk2.rl.weight_sync import RemoteEngine
from openk2.serve.engine import Engine
from openk2.serve.sampling import SamplingParams
from openk2.tokenizer import K2Tokenizer
from openk2.tokenizer.chat import encode_chat
from openk2.train.config import (
    NS_DTYPES,
    ConfigError,
    RunOptions,
    check_tokenizer_name,
    from_mapping,
    read_config_file,
)


@dataclass
class EnvSpec:
    name: str
    kwargs: dict = field(default_factory=dict)
    max_tokens: int = 64  # budget: a response (multi-turn: a turn) reaching it unstopped is truncated
    max_turns: int = 8  # multi-turn environments: assistant turns per episode
    episode_tokens: int | None = None  # multi-turn: sampled tokens per episode (None: max_tokens * max_turns)
    tool_tokens: int = 256  # multi-turn: tokens appended after one turn; longer tool outputs are clipped
    tool_choice: str = "auto"  # multi-turn: "required" or a tool name forces the first turn to call tools
    weight: float = 1.0  # share of each step's prompts
    reward: str = "verifier"  # "verifier" or "critique" (self-critique rubric reward)

    def budget(self) -> Budget:
        return Budget(self.max_tokens, self.max_turns, self.episode_tokens, self.tool_tokens)


@dataclass(kw_only=True)
class RLConfig(RunOptions):
    """`openk2 rl`: the shared run options (out_dir, steps, seed, cadences) with RL's defaults, plus
    the environments, the rollout and the K1.5 loss. The optimizer is MuonClip (lr for the Muon part,
    adamw_lr for the rest)."""

    envs: list[EnvSpec]
    model: str = "tiny"  # a preset name, or a checkpoint or run directory
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields, for presets
    tokenizer: str = "byte"  # a tokenizer name (byte, default, ...) or directory; a checkpoint brings its own
    out_dir: str | None = "runs/rl"
    steps: int = 50
    eval_every: int = 10
    log_every: int = 1
    progress: bool = False  # RL prints a line per step instead
    prompts_per_step: int = 8
    samples_per_prompt: int = 8  # K
    tau: float = 0.1
    updates_per_step: int = 1  # optimizer steps on one batch of rollouts
    lr: float = 0.002
    adamw_lr: float | None = None
    weight_decay: float = 0.0
    # Newton-Schulz precision (auto: bfloat16 where the CPU has bf16 units, else float32). Pin it
    # to make a result reproduce across CPUs: the two precisions take different trajectories.
    ns_dtype: str = "auto"
    temperature_start: float = 1.0
    temperature_end: float = 0.7
    temperature_steps: int | None = None  # None: decay over the whole run
    temperature_kind: str = "cosine"
    step_tokens: int | None = None  # partial rollout: tokens per sample per iteration (None: off)
    truncation_penalty: float = 0.5  # reward of a truncated sample is -truncation_penalty
    ptx_data: str | None = None  # JSONL of {"messages": [...]} (curated data for the PTX loss)
    ptx_weight: float = 0.0
    ptx_batch: int = 16
    critic: str = "policy"  # "policy" or a checkpoint directory
    critic_weight: float = 1.0  # weight of the critic-refresh loss
    critic_lr: float = 0.002  # for a separate critic checkpoint
    # the critic's rubrics and refresh sizes (a [critique] table: core, prescriptive, max_pairs_per_group,
    # max_response_tokens); the judge prompt must fit the critic's positions
    critique: CritiqueConfig = field(default_factory=CritiqueConfig)
    system_prompt: str | None = ""  # None: the chat template's default system message
    eval_tasks: int = 100  # held-out tasks per environment
    eval_temperature: float = 0.0
    eval_samples: int = 1  # samples per held-out task (> 1 with a temperature > 0)
    engine_batch: int = 128
    # roll out on this `openk2 serve --weight-update-token` process (http://host:port) instead of an
    # in-process engine; the weights are pushed to it after every step (the token comes from
    # $OPENK2_WEIGHT_UPDATE_TOKEN, never from the config, which is recorded in the run)
    rollout_server: str | None = None

    @classmethod
    def from_dict(cls, d: dict, where: str = "RL config") -> RLConfig:
        """The config from a dict (a parsed file); `where` names it in error messages."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a table of keys, got {type(d).__name__}")
        if not d.get("envs"):
            raise ConfigError(f"{where}: an RL config needs a non-empty `envs` list")
        if not isinstance(d["envs"], list):
            raise ConfigError(f"{where}: key 'envs' expects a list of tables, got {d['envs']!r}")
        envs = [from_mapping(EnvSpec, e, f"{where} envs[{i}]") for i, e in enumerate(d["envs"])]
        return from_mapping(cls, {**d, "envs": envs}, where).validate()

    @classmethod
    def load(cls, path: str | Path) -> RLConfig:
        return cls.from_dict(read_config_file(path, "RL config"), f"RL config {path}")

    def validate(self) -> RLConfig:
        self.validate_run()
        for e in self.envs:
            if e.reward not in ("verifier", "critique"):
                raise ConfigError(f"env {e.name}: reward must be 'verifier' or 'critique', got {e.reward!r}")
            if e.max_tokens < 1 or e.weight <= 0:
                raise ConfigError(f"env {e.name}: max_tokens must be >= 1 and weight > 0")
            try:
                e.budget()
            except ValueError as err:
                raise ConfigError(f"env {e.name}: {err}") from None
        if self.prompts_per_step < 1 or self.updates_per_step < 1:
            raise ConfigError("prompts_per_step and updates_per_step must be >= 1")
        if self.samples_per_prompt < 2:
            raise ConfigError("samples_per_prompt (K) must be >= 2: the advantage is relative to the group")
        if self.ptx_weight > 0 and not self.ptx_data:
            raise ConfigError("ptx_weight > 0 needs ptx_data (a JSONL file of chat examples)")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.ns_dtype not in NS_DTYPES:
            raise ConfigError(f"unknown ns_dtype {self.ns_dtype!r}; choose one of {', '.join(NS_DTYPES)}")
        if self.device not in ("auto", "cpu"):
            raise ConfigError(f"RL runs on the CPU for now; device {self.device!r}")
        check_tokenizer_name(self.tokenizer)
        if self.rollout_server is not None and not self.rollout_server.startswith(("http://", "https://")):
            raise ConfigError(
                f"rollout_server must be an http:// or https:// URL, got {self.rollout_server!r}"
            )
        return self

    def temperature_schedule(self) -> TemperatureSchedule:
        return TemperatureSchedule(
            self.temperature_start,
            self.temperature_end,
            self.temperature_steps or self.steps,
            self.temperature_kind,
        )


def build_model(name: str, overrides: dict) -> tuple[Transformer, Path | None]:
    """(model, its checkpoint or None): a preset (with `overrides`), or a checkpoint / run directory."""
    if name in PRESETS:
        config = ModelConfig.from_preset(name)
        for k, v in overrides.items():
            if not hasattr(config, k):
                raise ConfigError(f"unknown ModelConfig field in model_overrides: {k!r}")
            setattr(config, k, v)
        return Transformer(config), None
    from openk2.checkpoint import resolve_checkpoint

    if not Path(name).exists():
        raise FileNotFoundError(
            f"model {name!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint or run directory"
        )
    ckpt = resolve_checkpoint(name)
    return load_model(ckpt, dtype=torch.float32), ckpt


def load_chat_jsonl(path: str | Path, tokenizer) -> list[tuple[list[int], list[bool]]]:
    """Curated chat examples -> (ids, assistant mask) pairs for the PTX / SFT loss."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
            enc = encode_chat(tokenizer, ex["messages"], tools=ex.get("tools"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{n}: not a chat example ({type(e).__name__}: {e})") from e
        if not any(enc.assistant_mask):
            raise ValueError(f"{path}:{n}: the example has no assistant tokens to train on")
        rows.append((enc.ids, enc.assistant_mask))
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def lm_batch(rows: list[tuple[list[int], list[bool]]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, (x, m) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(m)] = torch.tensor(m)
    return ids, mask


def evaluate(
    engine: Engine,
    env: Environment,
    tasks: list[Task],
    max_tokens: int | Budget,
    temperature: float = 0.0,
    samples: int = 1,
    seed: int = 0,
    system_prompt: str | None = "",
    tool_choice: str = "auto",
) -> dict:
    """Mean verifier reward on held-out tasks (truncated responses count as 0), and mean length.
    A multi-turn environment's tasks run as whole episodes, as in training (`max_tokens` then is their
    Budget, `tool_choice` their first turn's); their length is the sampled tokens per episode, and the
    turns and tool calls are averaged too."""
    if env.multi_turn:
        return _evaluate_episodes(
            engine, env, tasks, max_tokens, temperature, samples, seed, system_prompt, tool_choice
        )
    if isinstance(max_tokens, Budget):
        max_tokens = max_tokens.turn_tokens
    tok = engine.tokenizer
    prompts = [prompt_ids(tok, t, system_prompt) for t in tasks]
    params = [
        SamplingParams(max_tokens=max_tokens, temperature=temperature, n=samples, seed=seed * 7919 + i)
        for i in range(len(tasks))
    ]
    rewards, lengths, truncated = [], [], 0
    for task, out in zip(tasks, run_requests(engine, prompts, params)):
        for c in out.completions:
            lengths.append(len(c.token_ids))
            if c.finish_reason == "length":
                truncated += 1
                rewards.append(0.0)
            else:
                rewards.append(env.verify(task, c.text))
    return {
        "reward": sum(rewards) / len(rewards),
        "length": sum(lengths) / len(lengths),
        "truncation": truncated / len(rewards),
    }


def _evaluate_episodes(
    engine, env, tasks, budget, temperature, samples, seed, system_prompt, tool_choice
) -> dict:
    budget = budget if isinstance(budget, Budget) else Budget(budget)
    worker = RolloutWorker(
        engine,
        {env.name: env},
        {env.name: budget},
        samples,
        truncation_penalty=0.0,
        system_prompt=system_prompt,
        tool_choice={env.name: tool_choice},
    )
    episodes = [
        s for g in worker.rollout([(env.name, t) for t in tasks], temperature, seed) for s in g.samples
    ]
    n = len(episodes)
    return {
        "reward": sum(s.reward for s in episodes) / n,
        "length": sum(s.sampled_tokens for s in episodes) / n,
        "truncation": sum(s.truncated for s in episodes) / n,
        "turns": sum(s.episode.turns for s in episodes) / n,
        "tool_calls": sum(s.episode.tool_calls for s in episodes) / n,
    }


class RLTrainer:
    def __init__(
        self,
        config: RLConfig,
        model: Transformer | None = None,
        tokenizer: K2Tokenizer | None = None,
        log_fn=print,
    ):
        self.config = c = config.validate()
        torch.manual_seed(c.seed)
        self.rng = random.Random(c.seed)
        checkpoint = None
        if model is None:
            model, checkpoint = build_model(c.model, c.model_overrides)
        self.model = model
        if tokenizer is None and checkpoint is not None:
            from openk2.checkpoint import load_tokenizer

            tokenizer = load_tokenizer(checkpoint, model.config.vocab_size)
        if tokenizer is None:
            from openk2.train.loop import tokenizer_by_name

            tokenizer = tokenizer_by_name(c.tokenizer, model.config.vocab_size)
        self.tokenizer = tokenizer
        self.model.train()
        self.envs = {}
        for e in c.envs:
            try:
                self.envs[e.name] = make_env(e.name, **e.kwargs)
            except KeyError as err:
                raise ConfigError(err.args[0]) from None
            except (TypeError, ValueError) as err:
                raise ConfigError(f"env {e.name}: bad kwargs {e.kwargs} ({err})") from None
        self.specs = {e.name: e for e in c.envs}
        self.eval_sets = {
            name: env.sample_tasks(c.eval_tasks, seed=c.seed, split="test") for name, env in self.envs.items()
        }
        # The engine serves its own copy of the weights, as a colocated inference engine does, or
        # is another process (`rollout_server`); `sync` copies or pushes the trainer's weights into
        # it after every step.
        if c.rollout_server:
            self.engine = RemoteEngine(c.rollout_server, self.tokenizer, max_parallel=c.engine_batch)
        else:
            self.engine = Engine(
                build_model_like(self.model),
                self.tokenizer,
                max_batch=max(c.engine_batch, c.samples_per_prompt),
                max_seq_len=self._context_length(),
            )
        self.sync()
        self.optimizer = MuonClip(
            self.model,
            lr=c.lr,
            weight_decay=c.weight_decay,
            adamw_lr=c.adamw_lr,
            qk_clip_tau=100.0,
            ns_dtype=c.ns_dtype,
        )
        self.worker = RolloutWorker(
            self.engine,
            self.envs,
            {e.name: e.budget() for e in c.envs},
            c.samples_per_prompt,
            step_tokens=c.step_tokens,
            truncation_penalty=c.truncation_penalty,
            system_prompt=c.system_prompt,
            tool_choice={e.name: e.tool_choice for e in c.envs},
        )
        self.temperature = c.temperature_schedule()
        self.ptx_rows = load_chat_jsonl(c.ptx_data, self.tokenizer) if c.ptx_data else []
        self.critic: SelfCritic | None = None
        self.critic_optimizer: MuonClip | None = None
        if any(e.reward == "critique" for e in c.envs):
            if c.critic == "policy":
                self.critic = SelfCritic(self.model, self.tokenizer, c.critique)
            else:
                critic_model = load_model(c.critic, dtype=torch.float32)
                self.critic = SelfCritic(critic_model, self.tokenizer, c.critique)
                self.critic_optimizer = MuonClip(
                    critic_model, lr=c.critic_lr, weight_decay=0.0, ns_dtype=c.ns_dtype
                )
            self._check_judge_fits()
        self._task_seed = 0
        self.log_fn = log_fn
        self.history: list[dict] = []
        self._flat_steps = 0  # steps in which no group had reward spread
        self.checkpoint: Path | None = None  # the last checkpoint `train` wrote
        self.interrupted: str | None = None  # the signal that stopped `train`, if one did

    # ------------------------------------------------------------------ pieces
    def _context_length(self) -> int:
        """The engine's context: the longest prompt seen (the held-out tasks and a draw of training
        tasks) with 25% headroom, plus the episode budget (turn budget, or for multi-turn: episode
        tokens + appended tool outputs), and never less than the turn budget + 512 it always had;
        capped by the model's positions. A prompt too long for it later is truncated, not a crash; a
        model whose positions cannot hold the prompts seen is a config error."""
        positions = self.model.config.max_position_embeddings
        need, longest_prompt = 0, 0
        for name, env in self.envs.items():
            tasks = self.eval_sets[name] + env.sample_tasks(8, seed=-1)
            choice = self.specs[name].tool_choice
            if choice not in ("auto", "required"):
                offered = {t["function"]["name"] for task in tasks for t in task.tools or []}
                if choice not in offered:
                    raise ConfigError(
                        f"env {name}: tool_choice must be 'auto', 'required' or one of its tools "
                        f"({', '.join(sorted(offered)) or 'none offered'}), got {choice!r}"
                    )
            longest = max(len(prompt_ids(self.tokenizer, t, self.config.system_prompt)) for t in tasks)
            spec = self.specs[name]
            need = max(need, spec.max_tokens + 512, spec.budget().context(longest * 5 // 4, env.multi_turn))
            longest_prompt = max(longest_prompt, longest)
        if longest_prompt >= positions:
            raise ConfigError(
                f"the prompts need {longest_prompt} tokens but the model has {positions} positions "
                "(raise max_position_embeddings in model_overrides, or use a denser tokenizer)"
            )
        return min(positions, need)

    def _check_judge_fits(self) -> None:
        """A judge prompt (rubrics, question, two responses at their budget) longer than the critic's
        positions is a config error: the critic would judge from positions it was never trained on, and
        stays at chance (measured: the default rubrics make a 560-token prompt for a 256-position model)."""
        positions = self.critic.model.config.max_position_embeddings
        for name in self.envs:
            question = max((question_text(t.messages) for t in self.eval_sets[name]), key=len)
            response = min(self.specs[name].max_tokens, self.config.critique.max_response_tokens)
            need = len(self.critic.judge_prompt(question, "", "")) + 2 * response
            if need > positions:
                raise ConfigError(
                    f"env {name}: a judge prompt needs up to {need} tokens but the critic has {positions} "
                    "positions (shorten [critique] core/prescriptive rubrics or max_response_tokens, or "
                    "use a critic with more positions)"
                )

    def sync(self) -> float:
        """Trainer -> engine weights: a copy in-process, a push to a rollout server; returns seconds."""
        return self.engine.load_weights(self.model)

    def draw_tasks(self) -> list[tuple[str, Task]]:
        names = list(self.specs)
        weights = [self.specs[n].weight for n in names]
        picks = self.rng.choices(names, weights, k=self.config.prompts_per_step)
        tasks = []
        for name in names:
            count = picks.count(name)
            if count:
                self._task_seed += 1
                tasks += [(name, t) for t in self.envs[name].sample_tasks(count, seed=self._task_seed)]
        return tasks

    def critique(self, groups: list[Group]) -> None:
        """Replace the rewards of critique-scored groups by the critic's round-robin win rates
        (truncated samples keep their penalty)."""
        self.model.eval()
        for g in groups:
            if self.specs[g.env].reward != "critique":
                continue
            wins = self.critic.rewards(question_text(g.task.messages), [s.text for s in g.samples])
            for s, w in zip(g.samples, wins):
                if not s.truncated:
                    s.reward, s.info = w, {"reason": "critique"}
        self.model.train()

    def critic_pairs(self, groups: list[Group]) -> list:
        pairs = []
        for g in groups:
            if self.specs[g.env].reward == "verifier":
                q = question_text(g.task.messages)
                pairs += self.critic.refresh_pairs(
                    q, [s.text for s in g.samples], [s.reward for s in g.samples], self.rng
                )
        return pairs

    def ptx_loss(self) -> torch.Tensor:
        rows = self.rng.sample(self.ptx_rows, min(self.config.ptx_batch, len(self.ptx_rows)))
        ids, mask = lm_batch(rows)
        return masked_lm_loss(self.model(ids), ids, mask)

    def _remote_sync_stats(self) -> dict:
        """With a rollout server, the last weight push's size and speed (its seconds are `sync_s`)."""
        stats = getattr(self.engine, "last_sync", None)
        return {} if stats is None else {"sync_bytes": stats.bytes, "sync_gbps": stats.gbps}

    # ------------------------------------------------------------------ one iteration
    def step(self, it: int) -> dict:
        c = self.config
        t0 = time.perf_counter()
        temperature = self.temperature(it)
        groups = self.worker.rollout(self.draw_tasks(), temperature, seed=c.seed)
        t_rollout = time.perf_counter() - t0
        if self.critic is not None:
            self.critique(groups)
        samples = [s for g in groups for s in g.samples]
        rec = {
            "step": it,
            "temperature": temperature,
            "groups": len(groups),
            "paused": len(self.worker.pending),
        }
        if not samples:
            rec["rollout_s"] = t_rollout
            return rec
        batch = pack_sequences(
            [s.prompt_ids for s in samples],
            [s.response_ids for s in samples],
            loss_masks=[s.loss_mask for s in samples],
        )
        group_ids = torch.tensor([gi for gi, g in enumerate(groups) for _ in g.samples])
        rewards = torch.tensor([s.reward for s in samples])
        with torch.no_grad():
            logp_old = sequence_logprobs(self.model, batch)
        engine_lp = torch.tensor([sum(s.engine_logprobs) for s in samples])
        fresh = torch.tensor([s.segments == 1 for s in samples])
        pairs = self.critic_pairs(groups) if self.critic is not None else []
        # Groups whose samples all got the same reward carry no signal; when no group has any, the K1.5
        # gradient is zero up to rounding, and a scale-free optimizer (Muon, Adam) would turn that
        # rounding noise into a full-size step. Such steps skip the RL term.
        signal = [len({s.reward for s in g.samples}) > 1 for g in groups]
        rec["signal_groups"] = sum(signal)
        use_ptx = bool(self.ptx_rows) and c.ptx_weight > 0
        use_critic = bool(pairs) and self.critic_optimizer is None
        self.model.record_stats(True)
        for _ in range(c.updates_per_step if any(signal) or use_ptx or use_critic else 0):
            loss = torch.zeros(())
            if any(signal):
                logp = sequence_logprobs(self.model, batch)
                loss = k15_loss(logp, logp_old, rewards, group_ids, c.tau)
                rec["rl_loss"] = loss.item()
                # mean |log pi_theta - log pi_old| per sample: 0 at the first update, the size of what
                # tau regularises at the later ones
                rec["log_ratio"] = float((logp.detach() - logp_old).abs().mean())
            if use_ptx:
                ptx = self.ptx_loss()
                loss = loss + c.ptx_weight * ptx
                rec["ptx_loss"] = ptx.item()
            if use_critic:
                critic_loss, acc = self.critic.refresh_loss(pairs)
                loss = loss + c.critic_weight * critic_loss
                rec["critic_loss"], rec["critic_accuracy"] = critic_loss.item(), acc
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            rec["qk_clipped"] = self.optimizer.step()
        self.model.record_stats(False)
        if pairs and self.critic_optimizer is not None:
            critic_loss, acc = self.critic.refresh_loss(pairs)
            self.critic_optimizer.zero_grad(set_to_none=True)
            critic_loss.backward()
            self.critic_optimizer.step()
            rec["critic_loss"], rec["critic_accuracy"] = critic_loss.item(), acc
        with torch.no_grad():
            logp_new = sequence_logprobs(self.model, batch)
        n_tokens = batch["response_mask"].sum(-1).clamp(min=1)
        rec.update(
            reward=float(rewards.mean()),
            length=float(n_tokens.mean()),
            truncation=float(sum(s.truncated for s in samples) / len(samples)),
            resumed=float((~fresh).float().mean()),
            # KL-like drift: mean over rollout samples of log pi_old - log pi_new, per token
            drift=float(((logp_old - logp_new) / n_tokens).mean()),
            engine_logprob_gap=float(((engine_lp - logp_old).abs() / n_tokens)[fresh].mean())
            if bool(fresh.any())
            else None,
            rollout_s=t_rollout,
        )
        episodes = [(g.env, s) for g in groups for s in g.samples if s.episode is not None]
        if episodes:
            rec["turns"] = sum(s.episode.turns for _, s in episodes) / len(episodes)
            rec["tool_calls"] = sum(s.episode.tool_calls for _, s in episodes) / len(episodes)
            rec["episodes"] = [episode_record(env, s) for env, s in episodes]
        rec["sync_s"] = self.sync()
        rec["step_s"] = time.perf_counter() - t0
        rec.update(self._remote_sync_stats())
        return rec

    def evaluate(self, seed: int = 0) -> dict:
        c = self.config
        out = {}
        for name, tasks in self.eval_sets.items():
            r = evaluate(
                self.engine, self.envs[name], tasks, self.specs[name].budget(),
                c.eval_temperature, c.eval_samples, seed, c.system_prompt, self.specs[name].tool_choice,
            )  # fmt: skip
            out.update({f"eval/{name}/{k}": v for k, v in r.items()})
        out["eval/reward"] = sum(v for k, v in out.items() if k.endswith("/reward")) / len(self.eval_sets)
        return out

    # ------------------------------------------------------------------ the run
    def state_dict(self) -> dict:
        """What an exact resume needs besides the policy's weights: the optimizers, every RNG (torch,
        numpy, python, the task draw's), the task and rollout counters, the paused partial rollouts
        and a separate critic's weights, all in types `torch.load(weights_only=True)` reads."""
        from openk2.checkpoint.store import rng_state

        state = {
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
            "task_rng": self.rng.getstate(),
            "task_seed": self._task_seed,
            "rollout_worker": to_plain(self.worker.state_dict(), "rollout worker"),  # paused rollouts
            "flat_steps": self._flat_steps,
        }
        if self.critic_optimizer is not None:
            state["critic_optimizer"] = self.critic_optimizer.state_dict()
            state["critic_model"] = {k: v.detach().clone() for k, v in self.critic.model.state_dict().items()}
        return state

    def load(self, checkpoint: Path, state: dict) -> None:
        """Resume from a checkpoint written by `train`: its weights, then `state` (`state_dict`), then
        sync the engine. Checkpoints written before paused rollouts were kept restart them."""
        from openk2.checkpoint.hf import load_weights_
        from openk2.checkpoint.store import set_rng_state

        load_weights_(self.model, checkpoint)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.critic_optimizer is not None and "critic_optimizer" in state:
            self.critic.model.load_state_dict(state["critic_model"])
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.rng.setstate(state["task_rng"])
        self._task_seed = state["task_seed"]
        if "rollout_worker" in state:
            self.worker.load_state_dict(from_plain(state["rollout_worker"]))
        else:  # written before paused rollouts were kept
            self.worker.load_state_dict({"iteration": state["rollout_iteration"], "pending": []})
        self._flat_steps = state.get("flat_steps", 0)
        set_rng_state(state["rng"])
        self.sync()

    def train(self, resume: bool = True, overwrite: bool = False) -> list[dict]:
        """The run: `steps` iterations on the run driver, a held-out evaluation first (fresh runs) and
        every `eval_every`, checkpoints every `save_every` and at the end, rl.png. Returns the step
        records (step 0: the first evaluation)."""
        from openk2.train.logging import read_metrics
        from openk2.train.run import Run

        c = self.config
        if c.threads:
            torch.set_num_threads(c.threads)
        run = Run(
            c, job="rl", config=asdict(c), model_config=self.model.config, resume=resume, overwrite=overwrite
        )
        state = run.open()
        step = 0
        if state is not None:
            self.load(run.checkpoint, state)
            step = state["step"]
            self._print(f"resuming {run.checkpoint} at step {step}")
        else:
            run.log({"kind": "config", "config": asdict(c), "model": self.model.config.to_hf_dict(),
                     "run_id": run.run_id})  # fmt: skip
            first = {"kind": "rl", "step": 0, **self.evaluate(seed=c.seed)}
            run.log(first)
            self._record(first)

        def one_step() -> dict:
            nonlocal step
            step += 1
            rec = {"kind": "rl", **self.step(step)}
            self._warn_without_signal(rec)
            warning = drift_warning(rec)
            if warning:
                self._print(warning)
            return rec

        def save() -> Path:
            state = {"step": step, **self.state_dict()}
            return run.save(step, self.model, self.tokenizer, state)

        result = run.loop(
            one_step,
            start_step=step,
            last_step=c.steps,
            save_fn=save,
            eval_fn=lambda s: self.evaluate(seed=c.seed),
            console=_RLConsole(self),
            desc="rl",
        )
        self.checkpoint, self.interrupted = result.last_saved, result.interrupted
        by_step = {m["step"]: m for m in read_metrics(run.dir) if m.get("kind") == "rl"}
        history = [by_step[k] for k in sorted(by_step)]
        plot_history(history, run.dir / "rl.png")
        if self._flat_steps:
            self._print(
                f"warning: {self._flat_steps} of {len(history) - 1} steps had no reward spread in any group"
            )
        return history if state is not None else self.history

    def _warn_without_signal(self, rec: dict) -> None:
        """Say so when no group has reward spread: the K1.5 loss then has no signal (first time, then
        every 10th such step)."""
        if rec.get("groups") and rec.get("signal_groups") == 0:
            self._flat_steps += 1
            if self._flat_steps % 10 == 1:
                reward = rec.get("reward")
                self._print(
                    f"warning: step {rec['step']}: no group has reward spread (all samples of each prompt "
                    f"scored {reward:.3g}), so no RL update; the policy may be too weak or too strong for "
                    "the task (start from an SFT checkpoint, raise max_tokens or samples_per_prompt)"
                )

    def _print(self, message: str) -> None:
        if self.log_fn is not None:
            self.log_fn(message)

    def _record(self, rec: dict) -> None:
        self.history.append(rec)
        if self.log_fn is not None:
            keys = ("step", "temperature", "reward", "length", "truncation", "drift", "eval/reward", "sync_s")
            self.log_fn(" ".join(f"{k}={_fmt(rec[k])}" for k in keys if k in rec))


DRIFT_WARNING = 0.1
"""Nats per token of KL-like drift in one step above which the console warns. Measured on the lookup
worked example: healthy runs stayed under 0.06 in every step; at a learning rate that wrecked the
policy (its samples turned to garbage and every reward to 0) the wrecking step drifted 0.13-0.22."""


def drift_warning(rec: dict) -> str | None:
    """The console line for a step whose update moved the policy far on its own rollouts, or None."""
    drift = rec.get("drift")
    if drift is None or not drift > DRIFT_WARNING:
        return None
    return (
        f"warning: step {rec['step']}: the update moved the policy {drift:.3g} nats/token on its own "
        f"rollouts (drift above {DRIFT_WARNING}); steps this large can wreck a policy, watch the reward "
        "and lower lr if it falls"
    )


class _RLConsole:
    """The run loop's console hook for RL: one line per step through the trainer's log_fn."""

    def __init__(self, trainer: RLTrainer):
        self.trainer = trainer

    def update(self, record: dict, eval_record: dict | None = None) -> None:
        self.trainer._record(record)
        return None


def episode_record(env: str, s) -> dict:
    """One multi-turn episode in the step's log record."""
    ep = s.episode
    return {
        "env": env,
        "turns": ep.turns,
        "tool_calls": ep.tool_calls,
        "tool_call_errors": len(ep.tool_call_errors),
        "sampled_tokens": s.sampled_tokens,
        "appended_tokens": len(s.response_ids) - s.sampled_tokens,  # tool outputs, user turns, templates
        "reward": s.reward,
        "finish": s.finish_reason,
        "reason": s.info.get("reason"),
        "cut_by": s.info.get("truncated"),  # the budget that truncated it, if one did
    }


def build_model_like(model: Transformer) -> Transformer:
    """A second model with the same config (the engine's copy)."""
    copy = Transformer(model.config)
    copy.load_state_dict(model.state_dict())
    return copy.to(next(model.parameters()).dtype)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def plot_history(history: list[dict], path: str | Path, title: str = "RL") -> None:
    """Reward (train and held-out), response length, truncation rate and KL-like drift per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(h["step"], h[key]) for h in history if h.get(key) is not None and not math.isnan(h[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    axes[0].plot(*series("reward"), label="rollout reward", alpha=0.6)
    axes[0].plot(*series("eval/reward"), "o-", label="held-out reward")
    axes[0].legend(fontsize=8)
    for ax, key, name in zip(
        axes[1:], ("length", "truncation", "drift"), ("response tokens", "truncation rate", "KL-like drift")
    ):
        ax.plot(*series(key))
        ax.set_title(name, fontsize=10)
    axes[0].set_title("reward", fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
