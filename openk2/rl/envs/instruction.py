"""Complex instruction following: a writing prompt plus constraints that code can check (length,
format, keywords, language/script, JSON validity, case, endings). The reward is the fraction of
constraints met (`strict=True`: 1 only when all are met); `info["constraints"]` lists each verdict.

Language is checked by script (share of Latin / Cyrillic / CJK / Greek letters), which is what code
can decide without a model: "answer in Russian" is verified as "write in Cyrillic".
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from openk2.rl.env import Environment, Task, register_env

TOPICS = [
    "the water cycle",
    "how bicycles stay upright",
    "the history of paper",
    "why the sky is blue",
    "composting at home",
    "how vaccines train the immune system",
    "the rules of chess",
    "a day in the life of a lighthouse keeper",
    "the benefits of walking",
    "how a compiler works",
    "volcanoes",
    "the invention of the printing press",
    "honeybees",
    "saving money",
    "the moon landing",
]
KEYWORDS = ["river", "energy", "window", "quiet", "balance", "orange", "signal", "harvest", "bridge", "maple"]
SCRIPTS = {
    "English": r"[A-Za-z]",
    "Russian": r"[\u0400-\u04FF]",
    "Greek": r"[\u0370-\u03FF]",
    "Chinese": r"[\u4E00-\u9FFF]",
}


@dataclass(frozen=True)
class Constraint:
    kind: str
    arg: object
    text: str  # how the prompt states it

    def check(self, response: str) -> bool:
        return CHECKS[self.kind](response, self.arg)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+(?:['-]\w+)*", text)


def _script_share(text: str, language: str) -> float:
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return 0.0
    return sum(bool(re.match(SCRIPTS[language], ch)) for ch in letters) / len(letters)


def _json_object(text: str) -> bool:
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*\n(.*)\n```", body, re.DOTALL)
    try:
        return isinstance(json.loads(fenced.group(1) if fenced else body), dict)
    except ValueError:
        return False


CHECKS: dict[str, Callable[[str, object], bool]] = {
    "min_words": lambda t, n: len(_words(t)) >= n,
    "max_words": lambda t, n: len(_words(t)) <= n,
    "include_keywords": lambda t, ks: all(re.search(rf"\b{re.escape(k)}\b", t, re.IGNORECASE) for k in ks),
    "exclude_keyword": lambda t, k: not re.search(rf"\b{re.escape(k)}\b", t, re.IGNORECASE),
    "bullets": lambda t, n: len(re.findall(r"^\s*[-*] \S", t, re.MULTILINE)) == n,
    "lowercase": lambda t, _: t == t.lower() and any(ch.isalpha() for ch in t),
    "uppercase": lambda t, _: t == t.upper() and any(ch.isalpha() for ch in t),
    "json": lambda t, _: _json_object(t),
    "ends_with": lambda t, s: t.rstrip().endswith(s),
    "language": lambda t, lang: _script_share(t, lang) >= 0.9,
    "no_commas": lambda t, _: "," not in t,
    "paragraphs": lambda t, n: len([p for p in re.split(r"\n\s*\n", t.strip()) if p.strip()]) == n,
}


def _sample_constraints(rng: random.Random, count: int) -> list[Constraint]:
    makers: dict[str, Callable[[], Constraint]] = {
        "length": lambda: (
            Constraint("min_words", n := rng.choice([50, 80, 120]), f"Use at least {n} words.")
            if rng.random() < 0.5
            else Constraint("max_words", n := rng.choice([30, 50, 80]), f"Use at most {n} words.")
        ),
        "keywords": lambda: Constraint(
            "include_keywords",
            ks := tuple(rng.sample(KEYWORDS, 2)),
            f"Include the words '{ks[0]}' and '{ks[1]}'.",
        ),
        "exclude": lambda: Constraint(
            "exclude_keyword",
            k := rng.choice(["very", "really", "thing", "also"]),
            f"Do not use the word '{k}'.",
        ),
        "bullets": lambda: Constraint(
            "bullets",
            n := rng.randint(2, 5),
            f"Format the answer as exactly {n} bullet points starting with '- '.",
        ),
        "case": lambda: (
            Constraint("lowercase", None, "Write everything in lowercase letters.")
            if rng.random() < 0.5
            else Constraint("uppercase", None, "Write everything in capital letters.")
        ),
        "json": lambda: Constraint("json", None, "Reply with a single valid JSON object and nothing else."),
        "ending": lambda: Constraint(
            "ends_with",
            s := rng.choice(["Is there anything else?", "The end."]),
            f"End your reply with the exact phrase '{s}'.",
        ),
        "language": lambda: Constraint(
            "language", lang := rng.choice(list(SCRIPTS)), f"Write your entire reply in {lang}."
        ),
        "commas": lambda: Constraint("no_commas", None, "Do not use any commas."),
        "paragraphs": lambda: Constraint(
            "paragraphs", n := rng.randint(2, 4), f"Write exactly {n} paragraphs separated by blank lines."
        ),
    }
    # formats that cannot hold together with JSON are not combined with it
    clash = {
        "json": {"bullets", "paragraphs", "ending", "case", "commas"},
        "language": {"keywords", "ending"},
    }
    chosen: list[str] = []
    for family in rng.sample(list(makers), len(makers)):
        if len(chosen) == count:
            break
        if any(family in clash.get(c, ()) or c in clash.get(family, ()) for c in chosen):
            continue
        chosen.append(family)
    return [makers[f]() for f in sorted(chosen)]


@register_env("instruction")
class InstructionEnv(Environment):
    def __init__(self, min_constraints: int = 2, max_constraints: int = 4, strict: bool = False):
        super().__init__()
        if not 1 <= min_constraints <= max_constraints <= 5:
            raise ValueError(
                f"need 1 <= min_constraints <= max_constraints <= 5, got {min_constraints}, {max_constraints}"
            )
        self.min_constraints, self.max_constraints, self.strict = min_constraints, max_constraints, strict

    def generate(self, rng: random.Random) -> Task:
        topic = rng.choice(TOPICS)
        constraints = _sample_constraints(rng, rng.randint(self.min_constraints, self.max_constraints))
        prompt = f"Write about {topic}.\n" + "\n".join(f"- {c.text}" for c in constraints)
        return Task(
            id=f"instruction:{prompt}",
            messages=[{"role": "user", "content": prompt}],
            answer=None,
            metadata={"constraints": constraints, "topic": topic},
        )

    def score(self, task: Task, text: str) -> tuple[float, dict]:
        if not text.strip():
            return 0.0, {"reason": "malformed: empty response", "constraints": {}}
        verdicts = {f"{c.kind}:{c.arg}": c.check(text) for c in task.metadata["constraints"]}
        met = sum(verdicts.values()) / len(verdicts)
        reward = float(met == 1.0) if self.strict else met
        return reward, {"reason": None if met == 1.0 else "constraints not met", "constraints": verdicts}
