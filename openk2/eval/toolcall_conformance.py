"""Tool-call conformance: does a server call tools when it should, with arguments that fit the schema,
and does streaming say the same thing as a plain response?

The idea is Moonshot's K2 vendor verifier: the same requests against different deployments of one model
expose deployments whose parser or constrained decoding is broken, independently of model quality.
Each case (toolcall_cases.json) is a chat request with tools and a tool_choice plus the expected
behaviour: a call or none, and which tool. Every case is sent twice, plain and streamed, at temperature
0 with a fixed seed.

Metrics (over the plain responses unless said otherwise):
- trigger precision / recall / F1: "the model called a tool" against "a call was expected". A request
  that failed (timeout, HTTP error, malformed body) counts as the wrong behaviour either way.
- schema accuracy: of all emitted calls, the share whose name is an offered tool and whose arguments
  parse as a JSON object that validates against that tool's `parameters` (jsonschema). Reported over
  all calls and over the forced cases only (`required` or a named function), which is where
  constrained decoding applies.
- tool_choice compliance: `none` -> no call, `required` -> at least one call, named -> only that name.
- tool accuracy: among expected calls of a known tool that did call, the first call names it.
- stream agreement: plain and streamed responses have the same tool calls (name and parsed arguments)
  and the same content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jsonschema

from openk2.client import Backend, ChatRequest, ChatResult
from openk2.eval.harness import Item, ResultStore, run_items

CASES_PATH = Path(__file__).with_name("toolcall_cases.json")


@dataclass
class ConformanceConfig:
    cases: str | None = None  # another suite file; default: the shipped toolcall_cases.json
    seed: int = 0
    max_tokens: int = 512  # a call cut off by max_tokens counts as invalid (finish_reason 'length')
    stream: bool = True  # also send each case streamed and compare
    only: list[str] | None = None  # case ids (or id prefixes) to run


def load_cases(path: str | Path | None = None) -> list[dict]:
    """The suite with tool names expanded into OpenAI tool declarations."""
    path = Path(path) if path is not None else CASES_PATH
    data = json.loads(path.read_text())
    defs = data.get("tools", {})
    cases = []
    for c in data["cases"]:
        for key in ("id", "messages", "expect"):
            if key not in c:
                raise ValueError(f"{path}: case {c.get('id', '?')} lacks {key!r}")
        names = c.get("tools")
        if names is not None:
            unknown = [n for n in names if isinstance(n, str) and n not in defs]
            if unknown:
                raise ValueError(f"{path}: case {c['id']} uses undefined tools {unknown}")
        tools = None
        if names is not None:
            tools = [
                {"type": "function", "function": {"name": n, **defs[n]}} if isinstance(n, str) else n
                for n in names
            ]
        cases.append({**c, "tools": tools})
    ids = [c["id"] for c in cases]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate case ids")
    return cases


@lru_cache(maxsize=256)
def _validator(schema_json: str):
    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def check_call(call: dict, tools: list[dict] | None) -> tuple[bool, str | None]:
    """(valid, why not): the name is offered and the arguments validate against its parameters."""
    offered = {
        t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools or []
    }
    if call["name"] not in offered:
        return False, f"tool {call['name']!r} was not offered"
    try:
        args = json.loads(call["arguments"]) if call["arguments"].strip() else {}
    except ValueError as e:
        return False, f"arguments are not JSON: {e}"
    if not isinstance(args, dict):
        return False, "arguments are not a JSON object"
    errors = sorted(_validator(json.dumps(offered[call["name"]], sort_keys=True)).iter_errors(args), key=str)
    if errors:
        return False, f"schema: {errors[0].message}"
    return True, None


def _forced(choice) -> bool:
    return choice == "required" or isinstance(choice, dict)


def _complies(choice, calls: list[dict]) -> bool:
    if choice == "none":
        return not calls
    if choice == "required":
        return bool(calls)
    if isinstance(choice, dict):
        name = choice.get("function", {}).get("name")
        return bool(calls) and all(c["name"] == name for c in calls)
    return True  # auto / omitted: anything goes


def _canonical_calls(result: ChatResult) -> list[tuple[str, str]]:
    """Calls in a form where formatting differences do not count: (name, arguments re-serialised)."""
    out = []
    for c in result.tool_calls:
        try:
            args = json.dumps(json.loads(c.arguments), sort_keys=True)
        except ValueError:
            args = c.arguments
        out.append((c.name, args))
    return out


def evaluate_batch(batch: list[Item], backend: Backend, cfg: ConformanceConfig) -> list[dict]:
    cases = [it.payload for it in batch]

    def request(c: dict, stream: bool) -> ChatRequest:
        return ChatRequest(
            c["messages"], c["tools"], c.get("tool_choice"), cfg.max_tokens, 0.0, cfg.seed, stream=stream
        )

    plain = backend.chat_many([request(c, False) for c in cases])
    streamed = backend.chat_many([request(c, True) for c in cases]) if cfg.stream else [None] * len(cases)
    records = []
    for c, p, s in zip(cases, plain, streamed):
        calls = [{"name": t.name, "arguments": t.arguments} for t in p.tool_calls]
        checks = [check_call(call, c["tools"]) for call in calls]
        rec = {
            "expect": c["expect"],
            "tool_choice": c.get("tool_choice"),
            "forced": _forced(c.get("tool_choice")),
            "error": p.error,
            "called": bool(calls) if p.error is None else None,
            "calls": [{**call, "valid": ok, "why": why} for call, (ok, why) in zip(calls, checks)],
            "complies": _complies(c.get("tool_choice"), calls) if p.error is None else False,
            "content": p.content,
            "finish_reason": p.finish_reason,
            "truncated": p.finish_reason == "length",
        }
        if s is not None:
            rec["stream_error"] = s.error
            rec["stream_agrees"] = (
                p.error is None
                and s.error is None
                and _canonical_calls(p) == _canonical_calls(s)
                and p.content.strip() == s.content.strip()
            )
            if not rec["stream_agrees"] and s.error is None:
                rec["stream"] = s.to_record()
        records.append(rec)
    return records


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def metrics(records: list[dict]) -> dict:
    tp = fp = fn = tn = 0
    for r in records:
        want = bool(r["expect"]["call"])
        got = r["called"] if r["error"] is None else not want  # a failed request is always wrong
        tp += want and got
        fp += (not want) and got
        fn += want and not got
        tn += (not want) and not got
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
    calls = [c for r in records for c in r["calls"]]
    forced_calls = [c for r in records if r["forced"] for c in r["calls"]]
    named = [r for r in records if r["expect"].get("tool") and r["called"]]
    streamed = [r for r in records if "stream_agrees" in r]
    return {
        "cases": len(records),
        "errors": sum(r["error"] is not None for r in records),
        "trigger_precision": precision,
        "trigger_recall": recall,
        "trigger_f1": f1,
        "trigger_confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "calls": len(calls),
        "schema_accuracy": _ratio(sum(c["valid"] for c in calls), len(calls)),
        "truncated_responses": sum(bool(r.get("truncated")) for r in records),
        "forced_calls": len(forced_calls),
        "schema_accuracy_forced": _ratio(sum(c["valid"] for c in forced_calls), len(forced_calls)),
        "tool_choice_compliance": _ratio(sum(r["complies"] for r in records), len(records)),
        "tool_accuracy": _ratio(sum(r["calls"][0]["name"] == r["expect"]["tool"] for r in named), len(named)),
        "stream_agreement": _ratio(sum(r["stream_agrees"] for r in streamed), len(streamed)),
        "stream_errors": sum(r.get("stream_error") is not None for r in streamed),
    }


def run(backend: Backend, cfg: ConformanceConfig, store: ResultStore, **run_kw) -> dict:
    cases = load_cases(cfg.cases)
    if cfg.only:
        cases = [c for c in cases if any(c["id"] == o or c["id"].startswith(o) for o in cfg.only)]
        if not cases:
            raise ValueError(f"no case matches {cfg.only}")
    items = [Item(c["id"], c) for c in cases]
    records = run_items(store, items, lambda b: evaluate_batch(b, backend, cfg), **run_kw)
    return store.finish(records, metrics(records))
