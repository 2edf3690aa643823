"""The resumable JSONL runner: apply a step to every item not done yet, writing results as they finish.

Each finished item is written to OUT (accepted) and to OUT.done (accepted or rejected, with the
reason); a rerun skips every id in either, and a line cut by a crash is dropped on open, so an
interrupted run continues where it stopped without duplicates. A tqdm bar shows progress.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from openk2.client.types import ContextOverflow, LLMError


class Rejected(Exception):
    """Raised by a pipeline step to reject an item (drifted rewrite, failed rubric) with a reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def extract_json(text: str) -> Any:
    """The first JSON object or array in a model's answer (models wrap JSON in prose and fences)."""
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "[{":
            try:
                return decoder.raw_decode(text, i)[0]
            except json.JSONDecodeError:
                continue
    raise Rejected("no_json")


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path, repair: bool = False) -> list[dict]:
    """Records of a JSONL file. A last line without its newline is what a crash leaves: with
    repair=True it is cut off the file, otherwise it is skipped. Any other bad line is an error."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        if repair:
            with open(path, "r+b") as f:
                f.truncate(cut)
        data = data[:cut]
    out = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
    return out


@dataclass
class RunSummary:
    total: int
    skipped: int  # already done by an earlier run
    accepted: int
    rejected: int
    failed: int  # LLM failures; not marked done, so a rerun tries them again


async def run_jsonl(
    items: Iterable[dict],
    work: Callable[[dict], Awaitable[dict | list[dict]]],
    out_path: str | Path,
    stats,
    step: str,
    workers: int = 8,
    desc: str | None = None,
) -> RunSummary:
    """Apply `work` to every item whose "id" is not done yet; write accepted results to out_path.

    `work` returns one record (or several) to keep, or raises Rejected(reason); a ContextOverflow
    rejects the item, any other LLMError leaves it for a rerun. Results are written as they finish
    (order follows completion), each record carrying the item's id as "source_id". `stats` (the
    client's `Stats`) counts acceptances and rejections per step."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done_path = out_path.with_name(out_path.name + ".done")
    done = {r["id"] for r in read_jsonl(done_path, repair=True)}
    done |= {r["source_id"] for r in read_jsonl(out_path, repair=True) if "source_id" in r}
    items = list(items)
    ids = [it.get("id") for it in items]
    if any(i is None for i in ids) or len(set(ids)) != len(ids):
        raise ValueError("every item needs a unique 'id' (that is how a resumed run knows what is done)")
    todo = [it for it in items if it["id"] not in done]
    summary = RunSummary(len(items), len(items) - len(todo), 0, 0, 0)
    queue: asyncio.Queue = asyncio.Queue()
    for it in todo:
        queue.put_nowait(it)
    bar = tqdm(total=len(items), initial=summary.skipped, desc=desc or step, unit="item", dynamic_ncols=True)

    async def worker() -> None:
        while not queue.empty():
            item = queue.get_nowait()
            try:
                try:
                    result = await work(item)
                except ContextOverflow:
                    raise Rejected("context_overflow") from None
            except Rejected as r:
                stats.rejected[f"{step}:{r.reason}"] += 1
                summary.rejected += 1
                append_jsonl(done_path, {"id": item["id"], "accepted": False, "reason": r.reason})
            except LLMError as e:
                summary.failed += 1
                bar.write(f"{step}: item {item['id']!r} failed: {e}")
            else:
                records = result if isinstance(result, list) else [result]
                for rec in records:
                    append_jsonl(out_path, {**rec, "source_id": item["id"]})
                append_jsonl(done_path, {"id": item["id"], "accepted": True})
                stats.accepted[step] += 1
                summary.accepted += 1
            bar.update(1)
            bar.set_postfix(ok=summary.accepted, rej=summary.rejected, fail=summary.failed)

    await asyncio.gather(*(worker() for _ in range(max(1, min(workers, len(todo))))))
    bar.close()
    return summary
