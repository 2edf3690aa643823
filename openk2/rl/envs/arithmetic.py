"""Multi-digit arithmetic and sorting: task families a tiny model trained from scratch can partly solve.

Difficulty is a knob (digits, list length), generation is deterministic by seed, and answers are
integers or integer lists, so the verifier is exact. The prompt is short and plain (no chat persona),
and a bare answer such as `579` is accepted, because a tiny model will not learn `\\boxed{}` for free.
"""

from __future__ import annotations

import random
import re

from openk2.rl.env import Environment, Task, extract_answer, register_env

_INT = re.compile(r"[-+]?\d+")


def _answer_text(text: str) -> str:
    """The boxed / `Answer:` part if present, else the whole response."""
    found = extract_answer(text)
    return (found if found is not None else text).strip()


@register_env("arithmetic")
class ArithmeticEnv(Environment):
    """`a OP b` with a and b of min_digits..max_digits digits; OP from `ops`."""

    def __init__(self, min_digits: int = 1, max_digits: int = 3, ops: str = "+-*"):
        super().__init__()
        if not 1 <= min_digits <= max_digits <= 18:
            raise ValueError(f"need 1 <= min_digits <= max_digits <= 18, got {min_digits}, {max_digits}")
        if not ops or set(ops) - set("+-*"):
            raise ValueError(f"ops must be a non-empty subset of '+-*', got {ops!r}")
        self.min_digits, self.max_digits, self.ops = min_digits, max_digits, ops

    def _number(self, rng: random.Random) -> int:
        d = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (d - 1) if d > 1 else 0, 10**d - 1)

    def generate(self, rng: random.Random) -> Task:
        a, b, op = self._number(rng), self._number(rng), rng.choice(self.ops)
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        question = f"{a}{op}{b}="
        return Task(
            id=f"arithmetic:{question}",
            messages=[{"role": "user", "content": question}],
            answer=answer,
            metadata={"a": a, "b": b, "op": op, "digits": max(len(str(a)), len(str(b)))},
        )

    def score(self, task: Task, text: str) -> tuple[float, dict]:
        got = _answer_text(text)
        if not re.fullmatch(r"[-+]?\d{1,40}", got):
            return 0.0, {"reason": f"malformed: not an integer: {got[:40]!r}"}
        ok = int(got) == task.answer
        return float(ok), {"reason": None if ok else "wrong", "parsed": int(got)}


@register_env("sorting")
class SortingEnv(Environment):
    """Sort a list of min_len..max_len integers in [0, max_value] ascending; answer space-separated."""

    def __init__(self, min_len: int = 3, max_len: int = 8, max_value: int = 99):
        super().__init__()
        if not 1 <= min_len <= max_len <= 1000 or max_value < 1:
            raise ValueError(f"bad sorting sizes: min_len={min_len} max_len={max_len} max_value={max_value}")
        self.min_len, self.max_len, self.max_value = min_len, max_len, max_value

    def generate(self, rng: random.Random) -> Task:
        xs = [rng.randint(0, self.max_value) for _ in range(rng.randint(self.min_len, self.max_len))]
        question = "sort: " + " ".join(map(str, xs)) + " ="
        return Task(
            id=f"sorting:{question}",
            messages=[{"role": "user", "content": question}],
            answer=sorted(xs),
            metadata={"length": len(xs)},
        )

    def score(self, task: Task, text: str) -> tuple[float, dict]:
        got = _answer_text(text).strip("[]")
        tokens = [t for t in re.split(r"[\s,]+", got) if t]
        if not tokens or not all(re.fullmatch(r"[-+]?\d{1,20}", t) for t in tokens):
            return 0.0, {"reason": f"malformed: not a list of integers: {got[:60]!r}"}
        ok = [int(t) for t in tokens] == task.answer
        return float(ok), {"reason": None if ok else "wrong"}


PRAISE = "Great question! "  # the opener the "No initial praise" rubric forbids


@register_env("arithmetic_rubric")
class RubricArithmeticEnv(ArithmeticEnv):
    """Addition asked in words (`What is 12+34?`), graded against rubrics rather than by exact match.

    Meant for `reward = "critique"`: the policy's reward then comes from the self-critic, never from
    `score`. `score` is the rubric written as code, the ground truth that held-out evaluation and the
    self-critique worked example measure the critic and the policy against: 1 for the bare correct
    answer; 0.5 for the correct answer with anything around it (praise, filler: it breaks the
    "No initial praise" / "Clarity" rubrics); 0 for a wrong or missing number."""

    def generate(self, rng: random.Random) -> Task:
        task = super().generate(rng)
        m = task.metadata
        question = f"What is {m['a']}{m['op']}{m['b']}?"
        task.id, task.messages = f"arithmetic_rubric:{question}", [{"role": "user", "content": question}]
        return task

    def task_key(self, task: Task) -> str:
        """The split of the `a+b=` form: a problem held out of `arithmetic` is held out here too."""
        m = task.metadata
        return f"{m['a']}{m['op']}{m['b']}="

    def score(self, task: Task, text: str) -> tuple[float, dict]:
        bare = text.strip()
        if re.fullmatch(r"[-+]?\d{1,40}", bare):
            ok = int(bare) == task.answer
            return float(ok), {"reason": None if ok else "wrong"}
        numbers = _INT.findall(bare)
        if numbers and int(numbers[-1]) == task.answer:
            return 0.5, {"reason": "correct, with text around the answer"}
        return 0.0, {"reason": "wrong" if numbers else "malformed: no number"}
