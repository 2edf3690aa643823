"""Logic puzzles generated with known solutions: the 24 game, sudoku and cryptarithms.

Each verifier checks the *rules*, not a stored string, so any valid solution earns the reward (a
puzzle may have several), and it parses answers itself instead of evaluating them: the 24-game
expression is walked as a Python AST that admits only numbers, + - * / and parentheses.
"""

from __future__ import annotations

import ast
import itertools
import random
import re
from fractions import Fraction

from openk2.rl.env import Environment, Task, extract_answer, register_env

# --------------------------------------------------------------------------------------------------
# 24 game


def solve24(numbers: list[int], target: int = 24) -> str | None:
    """An expression over all numbers that equals target, by combining pairs recursively."""

    def search(items: list[tuple[Fraction, str]]) -> str | None:
        if len(items) == 1:
            return items[0][1] if items[0][0] == target else None
        for i, j in itertools.permutations(range(len(items)), 2):
            (a, ea), (b, eb) = items[i], items[j]
            rest = [items[k] for k in range(len(items)) if k not in (i, j)]
            options = [(a + b, f"({ea}+{eb})"), (a - b, f"({ea}-{eb})"), (a * b, f"({ea}*{eb})")]
            if b != 0:
                options.append((a / b, f"({ea}/{eb})"))
            for value, expr in options:
                found = search([*rest, (value, expr)])
                if found:
                    return found
        return None

    return search([(Fraction(n), str(n)) for n in numbers])


def _eval_arith(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval_arith(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a, b = _eval_arith(node.left, used), _eval_arith(node.right, used)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if b == 0:
            raise ZeroDivisionError("division by zero")
        return a / b
    raise ValueError(f"not allowed in a 24-game answer: {type(node).__name__}")


@register_env("game24")
class Game24Env(Environment):
    """Combine four numbers in 1..max_number with + - * / and parentheses to make 24."""

    def __init__(self, max_number: int = 13, target: int = 24):
        super().__init__()
        self.max_number, self.target = max_number, target

    def generate(self, rng: random.Random) -> Task:
        while True:
            numbers = sorted(rng.randint(1, self.max_number) for _ in range(4))
            solution = solve24(numbers, self.target)
            if solution:
                break
        nums = " ".join(map(str, numbers))
        prompt = (
            f"Use the numbers {nums} exactly once each, with + - * / and parentheses, to make {self.target}. "
            "Give the expression as `Answer: <expression>`."
        )
        return Task(
            id=f"game24:{nums}",
            messages=[{"role": "user", "content": prompt}],
            answer=solution,
            metadata={"numbers": numbers, "target": self.target},
        )

    def score(self, task: Task, text: str) -> tuple[float, dict]:
        expr = extract_answer(text)
        if expr is None:
            return 0.0, {"reason": "malformed: no Answer: line"}
        expr = (
            expr.strip("`$ ")
            .replace("×", "*")
            .replace("÷", "/")
            .replace("\\times", "*")
            .replace("\\div", "/")
        )
        expr = re.sub(rf"\s*=\s*{task.metadata['target']}\s*$", "", expr)
        if len(expr) > 100:
            return 0.0, {"reason": "malformed: expression too long"}
        used: list[int] = []
        try:
            value = _eval_arith(ast.parse(expr, mode="eval"), used)
        except (SyntaxError, ValueError, ZeroDivisionError) as e:
            return 0.0, {"reason": f"malformed: {e}"}
        if sorted(used) != task.metadata["numbers"]:
            return 0.0, {"reason": f"uses {sorted(used)}, not {task.metadata['numbers']}"}
        ok = value == task.metadata["target"]
        return float(ok), {"reason": None if ok else f"evaluates to {value}"}


# --------------------------------------------------------------------------------------------------
# Sudoku


def solved_grid(rng: random.Random, box: int) -> list[list[int]]:
    """A random full grid: the canonical pattern with rows, columns, bands and digits shuffled."""
    n = box * box
    pattern = lambda r, c: (box * (r % box) + r // box + c) % n  # noqa: E731
    groups = lambda: [g * box + i for g in rng.sample(range(box), box) for i in rng.sample(range(box), box)]  # noqa: E731
    rows, cols, digits = groups(), groups(), rng.sample(range(1, n + 1), n)
    return [[digits[pattern(r, c)] for c in cols] for r in rows]


def sudoku_errors(grid: list[list[int]], givens: list[list[int]], box: int) -> str | None:
    n = box * box
    if len(grid) != n or any(len(row) != n for row in grid):
        return f"not a {n}x{n} grid"
    for r, c in itertools.product(range(n), range(n)):
        if givens[r][c] and grid[r][c] != givens[r][c]:
            return f"changes the given at row {r + 1}, column {c + 1}"
    full = set(range(1, n + 1))
    units = [[(r, c) for c in range(n)] for r in range(n)] + [[(r, c) for r in range(n)] for c in range(n)]
    units += [
        [(br + i, bc + j) for i in range(box) for j in range(box)]
        for br in range(0, n, box)
        for bc in range(0, n, box)
    ]
    for unit in units:
        if {grid[r][c] for r, c in unit} != full:
            return f"a row, column or box is not 1..{n}: {unit[0]}"
    return None


@register_env("sudoku")
class SudokuEnv(Environment):
    """box=2 gives 4x4, box=3 the usual 9x9; `blanks` cells are emptied. Any valid completion wins."""

    def __init__(self, box: int = 3, blanks: int = 30):
        super().__init__()
        if box not in (2, 3) or not 1 <= blanks < (box**4):
            raise ValueError(f"need box in (2, 3) and 1 <= blanks < {box**4}, got box={box} blanks={blanks}")
        self.box, self.blanks = box, blanks

    def generate(self, rng: random.Random) -> Task:
        n = self.box**2
        solution = solved_grid(rng, self.box)
        givens = [row[:] for row in solution]
        for i in rng.sample(range(n * n), self.blanks):
            givens[i // n][i % n] = 0
        board = "\n".join("".join(str(v) if v else "." for v in row) for row in givens)
        prompt = (
            f"Solve this {n}x{n} sudoku ('.' is empty; every row, column and {self.box}x{self.box} box holds "
            f"1-{n} once). Reply with the solved grid as {n} lines of {n} digits.\n\n{board}"
        )
        return Task(
            id=f"sudoku:{board}",
            messages=[{"role": "user", "content": prompt}],
            answer=solution,
            metadata={"givens": givens, "box": self.box},
        )

    def score(self, task: Task, text: str) -> tuple[float, dict]:
        n = task.metadata["box"] ** 2
        rows = [re.sub(r"[\s|,]", "", line) for line in text.splitlines()]
        rows = [r for r in rows if len(r) == n and r.isdigit()]
        if len(rows) < n:
            return 0.0, {"reason": f"malformed: fewer than {n} lines of {n} digits"}
        grid = [[int(ch) for ch in row] for row in rows[-n:]]
        error = sudoku_errors(grid, task.metadata["givens"], task.metadata["box"])
        return float(error is None), {"reason": error}


# --------------------------------------------------------------------------------------------------
# Cryptarithms


@register_env("cryptarithm")
class CryptarithmEnv(Environment):
    """WORD + WORD = WORD made by hiding the digits of a true sum behind letters."""

    def __init__(self, min_digits: int = 2, max_digits: int = 4):
        super().__init__()
        if not 1 <= min_digits <= max_digits <= 8:
            raise ValueError(f"need 1 <= min_digits <= max_digits <= 8, got {min_digits}, {max_digits}")
        self.min_digits, self.max_digits = min_digits, max_digits

    def generate(self, rng: random.Random) -> Task:
        letters = rng.sample("ABCDEFGHIJKLMNOPQRSTUVWXYZ", 10)
        a, b = (
            rng.randint(10 ** (d - 1), 10**d - 1)
            for d in rng.choices(range(self.min_digits, self.max_digits + 1), k=2)
        )
        words = ["".join(letters[int(ch)] for ch in str(v)) for v in (a, b, a + b)]
        puzzle = f"{words[0]} + {words[1]} = {words[2]}"
        used = sorted(set("".join(words)))
        prompt = (
            f"Solve the cryptarithm {puzzle}: each letter stands for a different digit and no number starts "
            f"with 0. Give every letter's digit as `Answer: A=1, B=2, ...`."
        )
        return Task(
            id=f"cryptarithm:{puzzle}",
            messages=[{"role": "user", "content": prompt}],
            answer={ch: letters.index(ch) for ch in used},
            metadata={"words": words},
        )

    def score(self, task: Task, text: str) -> tuple[float, dict]:
        answer = extract_answer(text)
        if answer is None:
            return 0.0, {"reason": "malformed: no Answer: line"}
        pairs = re.findall(r"([A-Za-z])\s*=\s*(\d+)", answer)
        words = task.metadata["words"]
        letters = set("".join(words))
        mapping: dict[str, int] = {}
        for letter, digit in pairs:
            letter = letter.upper()
            if letter in mapping or letter not in letters or len(digit) != 1:
                return 0.0, {"reason": f"malformed: bad or repeated assignment {letter}={digit}"}
            mapping[letter] = int(digit)
        if set(mapping) != letters:
            return 0.0, {"reason": f"malformed: letters {sorted(letters - set(mapping))} unassigned"}
        if len(set(mapping.values())) != len(mapping):
            return 0.0, {"reason": "two letters share a digit"}
        if any(len(w) > 1 and mapping[w[0]] == 0 for w in words):
            return 0.0, {"reason": "a number starts with 0"}
        a, b, c = (int("".join(str(mapping[ch]) for ch in w)) for w in words)
        ok = a + b == c
        return float(ok), {"reason": None if ok else f"{a} + {b} != {c}"}
