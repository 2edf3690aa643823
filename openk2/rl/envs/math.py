"""Math with symbolic checking: the answer is compared to the reference as a sympy expression by
`math-verify` (1/2, 0.5, \\frac{2}{4} are all right), never by string match.

Built-in problems are generated with exact rational answers (linear equations, fractions, derivatives,
integrals, roots, gcd); `problems=[{"question", "answer"}]` plugs in any other set.
"""

from __future__ import annotations

import random
import re
import threading
from fractions import Fraction

import sympy
from math_verify import parse, verify

from openk2.rl.env import Environment, Task, extract_answer, register_env

INSTRUCTION = "Put your final answer in \\boxed{}."
MAX_ANSWER_CHARS = 200
_NESTED_POWER = re.compile(r"\^\s*\{[^{}]*\^|\^\s*\(?[^()]*\^|\*\*.*\*\*")


def _poly(rng: random.Random, degree: int, x: sympy.Symbol) -> sympy.Expr:
    return sum(rng.randint(-6, 6) * x**k for k in range(degree + 1)) + x**degree


def _problem(rng: random.Random) -> tuple[str, sympy.Expr, str]:
    x = sympy.Symbol("x")
    kind = rng.choice(["linear", "fractions", "derivative", "integral", "roots", "gcd"])
    if kind == "linear":
        a, c = rng.sample([k for k in range(-9, 10) if k], 2)
        b, d = rng.randint(-20, 20), rng.randint(-20, 20)
        lhs, rhs = sympy.sympify(a * x + b), sympy.sympify(c * x + d)
        return f"Solve for x: {sympy.sstr(lhs)} = {sympy.sstr(rhs)}.", sympy.Rational(d - b, a - c), kind
    if kind == "fractions":
        p, q = (Fraction(rng.randint(1, 12), rng.randint(2, 12)) for _ in range(2))
        op = rng.choice("+-*")
        value = {"+": p + q, "-": p - q, "*": p * q}[op]
        return (
            f"Compute {p} {op} {q} as an exact fraction.",
            sympy.Rational(value.numerator, value.denominator),
            kind,
        )
    if kind == "derivative":
        f, at = _poly(rng, rng.randint(2, 3), x), rng.randint(-3, 3)
        return f"Let f(x) = {sympy.sstr(f)}. Compute f'({at}).", sympy.diff(f, x).subs(x, at), kind
    if kind == "integral":
        f, hi = _poly(rng, rng.randint(1, 3), x), rng.randint(1, 4)
        return (
            f"Compute the integral of {sympy.sstr(f)} dx from x = 0 to x = {hi}.",
            sympy.integrate(f, (x, 0, hi)),
            kind,
        )
    if kind == "roots":
        r1, r2 = rng.randint(-9, 9), rng.randint(-9, 9)
        f = sympy.expand((x - r1) * (x - r2))
        return f"Find the largest real root of {sympy.sstr(f)} = 0.", sympy.Integer(max(r1, r2)), kind
    a, b = rng.randint(12, 400), rng.randint(12, 400)
    return f"Compute gcd({a}, {b}) + lcm({a}, {b}).", sympy.Integer(sympy.gcd(a, b) + sympy.lcm(a, b)), kind


def _timeout() -> int | None:
    """math-verify's timeouts use SIGALRM, which only works in the main thread."""
    return 2 if threading.current_thread() is threading.main_thread() else None


def answers_match(reference: sympy.Expr | str, answer: str) -> tuple[bool, str | None]:
    """Symbolic equality of a reference and an extracted answer string; (match, reason-if-not)."""
    if len(answer) > MAX_ANSWER_CHARS:
        return False, "malformed: answer too long"
    if _NESTED_POWER.search(answer):
        return False, "rejected: nested powers (too expensive to evaluate)"
    parsed = parse(f"${answer}$", parsing_timeout=_timeout())
    if not parsed:
        return False, f"malformed: cannot parse {answer[:60]!r}"
    gold = parse(f"${reference}$", parsing_timeout=_timeout()) if isinstance(reference, str) else [reference]
    ok = verify(gold, parsed, timeout_seconds=_timeout())
    return ok, None if ok else "wrong"


@register_env("math")
class MathEnv(Environment):
    def __init__(self, problems: list[dict] | None = None):
        super().__init__()
        if problems is not None and not all({"question", "answer"} <= set(p) for p in problems):
            raise ValueError("each problem needs 'question' and 'answer'")
        self.problems = problems

    def generate(self, rng: random.Random) -> Task:
        if self.problems:
            p = rng.choice(self.problems)
            question, answer, kind = p["question"], str(p["answer"]), p.get("kind", "given")
        else:
            question, answer, kind = _problem(rng)
        return Task(
            id=f"math:{question}",
            messages=[{"role": "user", "content": f"{question}\n\n{INSTRUCTION}"}],
            answer=answer,
            metadata={"kind": kind},
        )

    def score(self, task: Task, text: str) -> tuple[float, dict]:
        answer = extract_answer(text)
        if answer is None:
            return 0.0, {"reason": "malformed: no \\boxed{} or Answer: line"}
        ok, reason = answers_match(task.answer, answer)
        return float(ok), {"reason": reason, "extracted": answer}
