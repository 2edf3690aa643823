"""The RL gym's verifiable environments as benchmarks.

Each environment hands out its held-out `test` split (disjoint from what RL trains on by
construction), the model answers through a backend, and the environment's own verifier scores it: the
benchmark is exactly the reward RL optimises, measured on tasks RL never sees. Multi-turn environments
(tool use) are played out: the model's tool calls go to the environment, its replies come back as tool
turns, until the episode ends or `max_turns` is reached. Episodes of a batch advance in lockstep so the
backend still gets batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from openk2.client import Backend, ChatRequest
from openk2.eval.harness import Item, ResultStore, run_items
from openk2.rl.env import Environment, Task, list_envs, make_env


@dataclass
class GymConfig:
    envs: list[str] = field(default_factory=lambda: ["arithmetic", "sorting", "math", "game24"])
    n_tasks: int = 20  # per environment
    seed: int = 0
    split: str = "test"
    temperature: float = 0.0
    max_tokens: int = 512
    max_turns: int = 12  # multi-turn episodes

    def validate(self) -> GymConfig:
        known = list_envs()
        unknown = [e for e in self.envs if e not in known]
        if unknown or not self.envs:
            raise ValueError(
                f"unknown environment(s) {unknown or '(none given)'}; available: {', '.join(known)}"
            )
        if self.n_tasks < 1 or self.max_turns < 1:
            raise ValueError("n_tasks and max_turns must be >= 1")
        return self


@dataclass
class _Episode:
    env: Environment
    task: Task
    messages: list[dict]
    reward: float = 0.0
    done: bool = False
    turns: int = 0
    info: dict = field(default_factory=dict)
    error: str | None = None
    response: str = ""


def _request(ep: _Episode, cfg: GymConfig) -> ChatRequest:
    return ChatRequest(
        ep.messages,
        tools=ep.task.tools,
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        seed=cfg.seed,
    )


def play(batch: list[tuple[str, Task]], backend: Backend, cfg: GymConfig) -> list[dict]:
    episodes = []
    for name, task in batch:
        env = make_env(name)
        obs = env.reset(task=task)
        episodes.append(_Episode(env, task, list(obs.messages)))
    while True:
        active = [ep for ep in episodes if not ep.done]
        if not active:
            break
        results = backend.chat_many([_request(ep, cfg) for ep in active])
        for ep, res in zip(active, results):
            ep.turns += 1
            if res.error is not None:  # a backend failure ends the episode with reward 0
                ep.done, ep.error = True, res.error
                continue
            msg = res.message()
            ep.response = res.content
            step = ep.env.step(msg)
            ep.messages += [msg, *step.messages]
            ep.reward, ep.info = step.reward, step.info
            if step.done:
                ep.done = True
            elif ep.turns >= cfg.max_turns:
                ep.done, ep.info = True, {**step.info, "reason": "max_turns reached"}
    return [
        {
            "env": ep.env.name,
            "task_id": ep.task.id,
            "reward": ep.reward,
            "turns": ep.turns,
            "reason": f"backend: {ep.error}" if ep.error else ep.info.get("reason"),
            # single-turn: the answer; multi-turn: the final assistant text (the transcript is long)
            "response": ep.response,
        }
        for ep in episodes
    ]


def metrics(records: list[dict], envs: list[str]) -> dict:
    per_env = {}
    for name in envs:
        rs = [r for r in records if r["env"] == name]
        if rs:
            per_env[name] = {
                "n": len(rs),
                "mean_reward": sum(r["reward"] for r in rs) / len(rs),
                "solved": sum(r["reward"] >= 1.0 for r in rs) / len(rs),
                "backend_errors": sum(str(r["reason"]).startswith("backend:") for r in rs),
            }
    means = [m["mean_reward"] for m in per_env.values()]
    return {"mean_reward": sum(means) / len(means) if means else 0.0, "per_env": per_env}


def run(backend: Backend, cfg: GymConfig, store: ResultStore, **run_kw) -> dict:
    cfg.validate()
    items = []
    for name in cfg.envs:
        tasks = make_env(name).sample_tasks(cfg.n_tasks, seed=cfg.seed, split=cfg.split)
        items += [Item(f"{name}:{i:04d}", (name, t)) for i, t in enumerate(tasks)]
    records = run_items(store, items, lambda b: play([it.payload for it in b], backend, cfg), **run_kw)
    return store.finish(records, metrics(records, cfg.envs))
