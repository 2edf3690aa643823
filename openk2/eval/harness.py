"""The runner every benchmark shares: resumable per-item records, final JSON, Markdown tables.

A run is (task, model label, config). Its items are evaluated in batches; each finished item is
appended to `results/<task>-<model>.jsonl` at once, so an interrupted run (Ctrl-C, a crash, a killed
job) loses at most the batch in flight: rerunning the same command skips the items already recorded
(the file is read by the client package's `read_jsonl`, which also cuts a line a crash left half-written).
The JSONL's first line holds the run's config; rerunning with a different config into the same file
is refused rather than silently mixing two runs' items. When all items are done, the task's metrics
are computed from the records and `results/<task>-<model>.json` gets config, metrics and records.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from openk2.client.runner import read_jsonl


@dataclass
class Item:
    id: str
    payload: Any  # whatever the task's evaluate function needs; never written to disk


def slug(name: str) -> str:
    """A file-name-safe label: `/ckpt/small-run3/` -> `small-run3`, `http://h:8000/v1` -> `h-8000-v1`."""
    name = name.rstrip("/").removeprefix("http://").removeprefix("https://")
    name = Path(name).name if os.sep in name and Path(name).name else name
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return s or "model"


class ResultStore:
    """`<dir>/<task>-<model>.jsonl` (header line + one record per item) and `<dir>/<task>-<model>.json`."""

    def __init__(self, out_dir: str | Path, task: str, model: str, config: dict):
        self.out_dir = Path(out_dir)
        self.task, self.model, self.config = task, model, config
        stem = f"{slug(task)}-{slug(model)}"
        self.jsonl_path = self.out_dir / f"{stem}.jsonl"
        self.json_path = self.out_dir / f"{stem}.json"

    def load(self, restart: bool = False) -> dict[str, dict]:
        """Records already written, by item id; creates the file (with its header) when new."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if restart or not self.jsonl_path.exists():
            self._write_header()
            return {}
        try:  # a line cut by a crash is dropped from the file, so the next append starts clean
            lines = read_jsonl(self.jsonl_path, repair=True)
        except ValueError as e:
            raise ValueError(f"{e}; not a results file of this runner, use --restart") from None
        if not lines:
            self._write_header()
            return {}
        header = lines[0]
        if not isinstance(header, dict) or "config" not in header:
            raise ValueError(f"{self.jsonl_path}: first line is not a run header; use --restart")
        if header.get("config") != _jsonable(self.config):
            raise ValueError(
                f"{self.jsonl_path} holds a run with another config ({json.dumps(header.get('config'))}); "
                "use --restart to start over or --out to write elsewhere"
            )
        return {str(rec["id"]): rec for rec in lines[1:] if isinstance(rec, dict) and "id" in rec}

    def _write_header(self) -> None:
        header = {"task": self.task, "model": self.model, "config": _jsonable(self.config)}
        self.jsonl_path.write_text(json.dumps(header) + "\n")

    def append(self, records: list[dict]) -> None:
        with self.jsonl_path.open("a") as f:
            for rec in records:
                f.write(json.dumps(rec, default=_default) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def finish(self, records: list[dict], metrics: dict, extra: dict | None = None) -> dict:
        result = {
            "task": self.task,
            "model": self.model,
            "config": _jsonable(self.config),
            "metrics": metrics,
            "n_items": len(records),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **(extra or {}),
            "records": records,
        }
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=_default) + "\n")
        tmp.replace(self.json_path)  # atomic: a reader never sees half a result file
        return result


def _default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(o)
    return str(o)


def _jsonable(o: Any) -> Any:
    return json.loads(json.dumps(o, default=_default))


def run_items(
    store: ResultStore,
    items: Sequence[Item],
    evaluate: Callable[[list[Item]], list[dict]],
    batch_size: int = 8,
    restart: bool = False,
    progress: bool = True,
    desc: str | None = None,
) -> list[dict]:
    """Evaluate the items not yet in the store, `batch_size` at a time; returns every item's record
    in item order. `evaluate(batch)` returns one record per item (the runner adds the `id`)."""
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("item ids must be unique")
    done = store.load(restart)
    todo = [it for it in items if it.id not in done]
    bar = tqdm(
        total=len(items),
        initial=len(items) - len(todo),
        desc=desc or store.task,
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        for i in range(0, len(todo), batch_size):
            batch = todo[i : i + batch_size]
            records = evaluate(batch)
            if len(records) != len(batch):
                raise RuntimeError(f"evaluate returned {len(records)} records for {len(batch)} items")
            records = [{"id": it.id, **rec} for it, rec in zip(batch, records)]
            store.append(records)
            for rec in records:
                done[rec["id"]] = rec
            bar.update(len(batch))
    except KeyboardInterrupt:
        bar.close()
        print(
            f"\ninterrupted: {len(done)}/{len(items)} items saved in {store.jsonl_path}; "
            "rerun the same command to resume",
            file=sys.stderr,
        )
        raise
    bar.close()
    return [done[i] for i in ids]


# ----------------------------------------------------------------------------------------------------
# Tables


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.1f}"
    return str(v)


def _flat(metrics: dict, prefix: str = "") -> dict[str, Any]:
    """Nested metric dicts become dotted keys (`per_env.math.mean_reward`)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def result_table(result: dict) -> str:
    """One run's metrics as a two-column Markdown table."""
    flat = _flat(result["metrics"])
    title = f"**{result['task']}** — {result['model']} ({result.get('n_items', '?')} items)\n\n"
    return title + markdown_table(["metric", "value"], [[k, v] for k, v in flat.items()])


def compare_table(results: list[dict]) -> str:
    """Several runs side by side: one row per metric, one column per run (metric keys in first-seen
    order; a run without a metric shows a dash)."""
    if not results:
        raise ValueError("nothing to compare")
    flats = [_flat(r["metrics"]) for r in results]
    keys: list[str] = []
    for f in flats:
        keys += [k for k in f if k not in keys]
    headers = ["metric"] + [f"{r['task']} · {r['model']}" for r in results]
    return markdown_table(headers, [[k] + [f.get(k) for f in flats] for k in keys])


def load_result(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no result file at {path}") from None
    except ValueError as e:
        raise ValueError(f"{path}: not a JSON result file ({e})") from None
    if not isinstance(data, dict) or not {"task", "model", "metrics"} <= set(data):
        raise ValueError(f"{path}: not an `openk2 eval` result (needs task, model, metrics)")
    return data


# ----------------------------------------------------------------------------------------------------
# What every benchmark's backend gets: max_tokens kept inside the context, and the raw samples logged


_PROMPT_TOKENS = (
    re.compile(r"prompt has (\d+) tokens"),  # openk2 serve
    re.compile(r"\((\d+) in the messages"),  # vLLM / OpenAI
)


def _context_error(error: str | None) -> bool:
    return bool(error) and error.startswith("http_400") and "context" in error.lower()


class ContextCappedBackend:
    """A backend whose requests never ask for more tokens than the model's context leaves.

    `context` is the model's context length (the engine's, or what the endpoint's /v1/models or
    /health reports); `prompt_tokens(request)` counts a request's prompt when the tokenizer is at
    hand (in-process). max_tokens is capped at `context - prompt` when the prompt can be counted and
    at `context - 1` otherwise; a request an endpoint still refuses as too long is sent again once
    with the room its error message states (or half the tokens when it states none)."""

    def __init__(self, backend, context: int | None, prompt_tokens=None):
        self.backend, self.context, self.prompt_tokens = backend, context, prompt_tokens
        self.capped = 0  # requests whose max_tokens was lowered

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    def _cap(self, req):
        if self.context is None:
            return req
        room = self.context - 1
        if self.prompt_tokens is not None:
            try:
                room = self.context - self.prompt_tokens(req) + 1
            except (ValueError, KeyError, TypeError):
                pass  # a malformed request: the backend reports it
        limit = max(1, room)
        if req.max_tokens is None or req.max_tokens > limit:  # None asks for as many as fit
            self.capped += 1
            return replace(req, max_tokens=limit)
        return req

    def _retry_room(self, req, error: str) -> int:
        asked = req.max_tokens if req.max_tokens is not None else (self.context or 2)
        for pattern in _PROMPT_TOKENS:
            m = pattern.search(error)
            if m and self.context is not None:
                return min(asked - 1, self.context - int(m.group(1)))
        return asked // 2

    def _send(self, method: str, requests: list) -> list:
        requests = [self._cap(r) for r in requests]
        results = getattr(self.backend, method)(requests)
        again = [i for i, r in enumerate(results) if _context_error(getattr(r, "error", None))]
        retry = []
        for i in again:
            room = self._retry_room(requests[i], results[i].error)
            if room >= 1:
                self.capped += 1
                retry.append((i, replace(requests[i], max_tokens=room)))
        if retry:
            for (i, _), result in zip(retry, getattr(self.backend, method)([r for _, r in retry])):
                results[i] = result
        return results

    def chat_many(self, requests: list) -> list:
        return self._send("chat_many", requests)

    def complete_many(self, requests: list) -> list:
        return self._send("complete_many", requests)


class SampleLog:
    """A backend that appends every request and the model's raw answer to a JSONL file
    (`--log-samples`), so what the model wrote can be read even where a task's record keeps only
    what it extracted (a code block, a parsed call)."""

    def __init__(self, backend, path: str | Path):
        self.backend, self.path = backend, Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    def _log(self, requests: list, results: list) -> None:
        with self.path.open("a") as f:
            for req, res in zip(requests, results):
                rec = {"request": _jsonable(req), "response": _jsonable(res)}
                f.write(json.dumps(rec, default=_default) + "\n")

    def chat_many(self, requests: list) -> list:
        results = self.backend.chat_many(requests)
        self._log(requests, results)
        return results

    def complete_many(self, requests: list) -> list:
        results = self.backend.complete_many(requests)
        self._log(requests, results)
        return results


def endpoint_context(base_url: str, api_key: str | None = None, timeout: float = 10.0) -> int | None:
    """The context length an OpenAI-compatible server reports: `max_model_len` in /v1/models (vLLM,
    openk2 serve) or `max_seq_len` in /health (openk2 serve); None when it reports neither."""
    import httpx

    base = base_url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    probes = ((f"{base}/models", ("data", 0, "max_model_len")), (f"{base[:-3]}/health", ("max_seq_len",)))
    for url, keys in probes:
        try:
            value: Any = httpx.get(url, headers=headers, timeout=timeout).json()
            for k in keys:
                value = value[k]
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            continue
    return None


def default_label(base: str, source: dict, config: dict) -> str:
    """`base-<hash>`: the same model and config give the same label (so rerunning resumes), another
    checkpoint or config a new one (so runs never collide in the results directory)."""
    import hashlib

    key = json.dumps({"source": _jsonable(source), "config": _jsonable(config)}, sort_keys=True)
    return f"{base}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
