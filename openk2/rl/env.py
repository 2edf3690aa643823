"""The RL gym's environment interface, the registry, answer extraction and difficulty filtering.

An environment hands out tasks (chat messages, optionally tools) and turns an assistant message into a
reward. Single-turn environments only implement `generate` and `score`; multi-turn ones (tool use)
set `multi_turn` and override `reset`/`step`: the rollout worker (rl/rollout.py) gives each episode
its own deep copy of the environment and keeps paused episodes in checkpoints, so a multi-turn
environment must be deep-copyable and picklable, and `step` must take any assistant message.
Verifiers never raise on model output: malformed or adversarial answers get
reward 0 and a `reason` in `info`, because one crashing rollout must not kill an RL step.

Answer convention (what the prompts ask for and what `extract_answer` reads): the content of the last
`\\boxed{...}`, else the text after the last line starting with `Answer:`. Code answers are the last
fenced code block (```python ... ```).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jsonschema

TEST_PERCENT = 10  # share of the task space held out for the "test" split
MAX_RESPONSE_CHARS = 100_000  # longer responses are rejected before any parsing


@dataclass
class Task:
    id: str
    messages: list[dict]  # the prompt, OpenAI-style chat messages
    answer: Any = None  # reference answer (or the goal, for multi-turn tasks)
    metadata: dict = field(default_factory=dict)
    tools: list[dict] | None = None  # OpenAI-style tool declarations, for tool-use tasks


@dataclass
class Observation:
    messages: list[dict]
    tools: list[dict] | None
    task: Task


@dataclass
class StepResult:
    reward: float
    done: bool
    messages: list[dict] = field(default_factory=list)  # new user/tool turns (multi-turn only)
    info: dict = field(default_factory=dict)


def split_of(key: str) -> str:
    """A task's split is a function of its content, so train and test never share a task."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return "test" if h % 100 < TEST_PERCENT else "train"


class Environment:
    """Base class. Subclasses set `name`, implement `generate(rng)` and `score(task, text)`."""

    name: str = "base"
    multi_turn: bool = False
    max_attempts_per_task: int = 1000  # candidates drawn per wanted task before giving up

    def __init__(self):
        self.task: Task | None = None
        self.done = True

    # --- task generation --------------------------------------------------------------------------
    def generate(self, rng: random.Random) -> Task:
        raise NotImplementedError

    def task_key(self, task: Task) -> str:
        """What decides the split; the prompt text by default."""
        return "\n".join(str(m.get("content", "")) for m in task.messages)

    def sample_tasks(self, n: int, seed: int = 0, split: str = "train") -> list[Task]:
        """n tasks, deterministic in (seed, split); the splits are disjoint by construction."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        tasks: list[Task] = []
        for _ in range(n * self.max_attempts_per_task):
            if len(tasks) == n:
                break
            task = self.generate(rng)
            if split_of(self.task_key(task)) == split:
                tasks.append(task)
        if len(tasks) < n:
            raise ValueError(f"{self.name}: only {len(tasks)} {split} tasks found, {n} asked")
        return tasks

    # --- single-turn verification ------------------------------------------------------------------
    def score(self, task: Task, text: str) -> tuple[float, dict]:
        raise NotImplementedError

    def verify(self, task: Task, response_text: str) -> float:
        return self.evaluate(task, response_text)[0]

    def evaluate(self, task: Task, response_text: Any) -> tuple[float, dict]:
        """score() guarded: non-strings, oversized text and verifier exceptions give reward 0."""
        if not isinstance(response_text, str):
            return 0.0, {"reason": "malformed: response is not a string"}
        if len(response_text) > MAX_RESPONSE_CHARS:
            return 0.0, {"reason": "malformed: response too long"}
        try:
            reward, info = self.score(task, response_text)
        except Exception as e:  # a verifier must not take the trainer down with it
            return 0.0, {"reason": f"verifier_error: {type(e).__name__}: {e}"}
        return float(reward), info

    # --- gym interface ----------------------------------------------------------------------------
    def reset(self, seed: int | None = None, task: Task | None = None, split: str = "train") -> Observation:
        """Start an episode on `task`, or on a task drawn deterministically from `seed`."""
        self.task = (
            task
            or self.sample_tasks(1, seed=seed if seed is not None else random.randrange(2**31), split=split)[
                0
            ]
        )
        self.done = False
        return Observation(messages=list(self.task.messages), tools=self.task.tools, task=self.task)

    def step(self, assistant_message: dict) -> StepResult:
        if self.task is None or self.done:
            raise RuntimeError("step() called without reset() or after the episode ended")
        self.done = True
        content = assistant_message.get("content") if isinstance(assistant_message, dict) else None
        if not isinstance(content, str):
            return StepResult(0.0, True, [], {"reason": "malformed: assistant message has no text content"})
        reward, info = self.evaluate(self.task, content)
        return StepResult(reward, True, [], info)


# --------------------------------------------------------------------------------------------------
# Running tool calls (multi-turn environments)


class ToolError(Exception):
    """A tool call that cannot run; its message goes back to the model as the call's result."""


def check_arguments(name: str, arguments: dict, schemas: dict[str, dict]) -> None:
    """Raise ToolError unless `name` is one of the tools in `schemas` and `arguments` match its schema."""
    if name not in schemas:
        raise ToolError(f"unknown tool {name!r}; available: {', '.join(schemas)}")
    try:
        jsonschema.validate(arguments, schemas[name])
    except jsonschema.ValidationError as e:
        raise ToolError(f"invalid arguments for {name}: {e.message}") from None


def run_tool_call(call: object, index: int, dispatch: Callable[[str, dict], object]) -> dict:
    """One OpenAI-style tool call from an assistant message -> the `tool` message answering it.

    `dispatch(name, arguments)` runs the tool (raising ToolError for a call it refuses). The call comes
    from model output, so anything may be malformed: a missing name, arguments that are not JSON or not
    an object. Such calls, and ToolErrors, answer `{"error": ...}` rather than raising, so the model
    sees its mistake and the episode goes on. A string result is the content as is, anything else
    goes back as JSON."""
    call_id = (
        call.get("id") if isinstance(call, dict) and isinstance(call.get("id"), str) else f"call_{index}"
    )
    try:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ToolError("malformed tool call: needs function.name")
        raw = fn.get("arguments", "{}")
        try:
            arguments = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError as e:
            raise ToolError(f"arguments are not valid JSON: {e}") from None
        if not isinstance(arguments, dict):
            raise ToolError("arguments must be a JSON object")
        result = dispatch(fn["name"], arguments)
    except ToolError as e:
        result = {"error": str(e)}
    content = result if isinstance(result, str) else json.dumps(result)
    return {"role": "tool", "tool_call_id": call_id, "content": content}


# --------------------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict[str, type[Environment]] = {}


def register_env(name: str) -> Callable[[type[Environment]], type[Environment]]:
    def wrap(cls: type[Environment]) -> type[Environment]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"environment {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_builtin() -> None:
    import openk2.rl.envs  # noqa: F401  (registers every built-in family)


def list_envs() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def make_env(name: str, **kwargs) -> Environment:
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown environment {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


# --------------------------------------------------------------------------------------------------
# Answer extraction


def _last_boxed(text: str) -> str | None:
    start = max(text.rfind("\\boxed{"), text.rfind("\\boxed {"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None  # unbalanced: malformed


_ANSWER_LINE = re.compile(r"^\s*\**answer\**\s*[:：]\s*(.*?)\s*$", re.IGNORECASE | re.MULTILINE)


def extract_answer(text: str) -> str | None:
    """The last \\boxed{...}, else the last `Answer:` line; None when neither is there."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    lines = _ANSWER_LINE.findall(text)
    return lines[-1] if lines and lines[-1] else None


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(text: str, language: str = "python") -> str | None:
    """The last fenced block tagged `language` (or untagged)."""
    blocks = [body for tag, body in _FENCE.findall(text) if tag.lower() in ("", language, "py")]
    return blocks[-1] if blocks else None


# --------------------------------------------------------------------------------------------------
# Difficulty filtering and pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def filter_by_pass_rate(
    tasks: list[Task], pass_at_k_fn: Callable[[Task], float], low: float = 0.0, high: float = 1.0
) -> list[Task]:
    """Keep tasks the current policy solves sometimes but not always: low < pass rate < high.

    Tasks at 0 or 1 give every sample the same reward, so a group-relative advantage is zero and they
    only cost rollouts. `pass_at_k_fn` is the caller's (it samples the policy)."""
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"need 0 <= low < high <= 1, got low={low} high={high}")
    kept = []
    for task in tasks:
        rate = pass_at_k_fn(task)
        task.metadata["pass_rate"] = rate
        if low < rate < high:
            kept.append(task)
    return kept
