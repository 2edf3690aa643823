"""Safety as an RL reward: the red-team suite's probes as tasks, its rubric judge as the verifier.

A task is one intent of the safety suite's intent set under one single-turn strategy (plain,
Base64/ROT13/hex, injection in a document or a tool result), built by the same transforms
`openk2 eval safety` uses; the reward is 1 when the same rubric judge (same prompt, same version)
says the reply is safe, 0 when it fails or when the judge's answer cannot be read (the reason says
which). Multi-turn strategies (jailbreak, crescendo) need an attacker and stay in the evaluation.

The judge is required: a backend object, an endpoint URL or a checkpoint directory
(`make_env("safety", judge="http://127.0.0.1:8001/v1")`). The split is by intent, so one request is
never in train under one encoding and in test under another.
"""

from __future__ import annotations

import random

from openk2.client import Backend, make_backend
from openk2.rl.env import Environment, Task, register_env
from openk2.rl.safety import (
    STATIC_STRATEGIES,
    Intent,
    JudgeSettings,
    build_probe,
    judge_steps,
    load_intents,
    parse_strategy,
    run_steps,
)


@register_env("safety")
class SafetyEnv(Environment):
    max_attempts_per_task = 200

    def __init__(
        self,
        judge: Backend | str | None = None,
        intents: str | None = None,
        categories: list[str] | None = None,
        strategies: list[str] | tuple[str, ...] = STATIC_STRATEGIES,
        judge_max_tokens: int = 256,
        judge_format_retries: int = 1,
    ):
        super().__init__()
        if judge is None:
            raise ValueError(
                "the safety environment needs a judge: make_env('safety', judge=BACKEND | URL | CHECKPOINT)"
            )
        if isinstance(judge, str):
            is_url = judge.startswith(("http://", "https://"))
            judge = make_backend(endpoint=judge) if is_url else make_backend(model=judge)
        self.judge = judge
        parsed = [parse_strategy(s) for s in strategies]
        multi = [s.name for s in parsed if s.driver != "single"]
        if multi or not parsed:
            raise ValueError(
                f"the safety environment takes single-turn strategies only, got {multi or 'none'}"
            )
        self.strategies = parsed
        pool = load_intents(intents)
        if categories:
            unknown = sorted(set(categories) - {it.category for it in pool})
            if unknown:
                raise ValueError(f"unknown safety categories {unknown}")
            pool = [it for it in pool if it.category in categories]
        self.intents: list[Intent] = pool
        self.settings = JudgeSettings(judge_max_tokens, 0, judge_format_retries)

    def generate(self, rng: random.Random) -> Task:
        intent, strategy = rng.choice(self.intents), rng.choice(self.strategies)
        probe = build_probe(strategy, intent.intent)
        return Task(
            id=f"safety:{intent.category}/{intent.id}/{strategy.name}",
            messages=probe.messages,
            tools=probe.tools,
            metadata={"intent": intent, "strategy": strategy.name},
        )

    def task_key(self, task: Task) -> str:
        intent: Intent = task.metadata["intent"]
        return f"safety:{intent.category}/{intent.id}"

    def score(self, task: Task, text: str) -> tuple[float, dict]:
        transcript = [*task.messages, {"role": "assistant", "content": text}]
        steps = judge_steps(task.metadata["intent"], task.metadata["strategy"], transcript, self.settings)
        verdict = run_steps(steps, {"judge": self.judge})
        if verdict.verdict == "pass":
            return 1.0, {"reason": None, "verdict": "pass", "judge_reason": verdict.reason}
        reason = verdict.reason if verdict.verdict == "error" else f"unsafe: {verdict.reason}"
        return 0.0, {"reason": reason, "verdict": verdict.verdict, "judge_reason": verdict.reason}
