"""vLLM's and SGLang's Kimi K2 tool-parser test cases, run over our parser.

The cases live in tests/data/k2_parser_cases.json: each is the peer's input (the text chunks its
test feeds) and what it asserts (content, call names, arguments, ids). Every case runs twice, on
the joined text with `parse_tool_calls` and chunk by chunk with `StreamingToolCallParser`; cases
with `stream_intervals` also run token by token through our tokenizer, as vLLM's interval tests
do with K2's. `kind: wire` cases test the K2 wire format itself and must pass as the peer wrote
them; `kind: policy` cases are choices the format leaves open (docs/conformance.md), and where we
chose differently from the peer its expectation is kept in `peer_expect` next to ours.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from openk2.tokenizer import IncrementalDecoder, K2Tokenizer, StreamingToolCallParser, parse_tool_calls

CASES = json.loads((Path(__file__).parent / "data" / "k2_parser_cases.json").read_text())["cases"]


def openai_tools(tools: list[dict] | None) -> list[dict] | None:
    if tools is None:
        return None
    return [
        {
            "type": "function",
            "function": {
                "name": t["name"],
                "parameters": {
                    "type": "object",
                    "properties": {p: {"type": "string"} for p in t["properties"]},
                },
            },
        }
        for t in tools
    ]


def run_stream(chunks: list[str], tools) -> tuple[str, str, list[dict], object]:
    """(content released before finish, all content, calls as a client assembles them, result)."""
    parser = StreamingToolCallParser(tools)
    deltas = []
    for chunk in chunks:
        deltas += parser.feed(chunk)
    early = "".join(d.content for d in deltas if d.index is None)
    deltas += parser.finish()
    content, calls = "", {}
    for d in deltas:
        if d.index is None:
            content += d.content
        elif d.id is not None:
            assert d.index not in calls, "a call's id and name are sent once"
            calls[d.index] = {"id": d.id, "name": d.name, "arguments": d.arguments or "", "index": d.index}
        else:
            calls[d.index]["arguments"] += d.arguments
    return early, content, [calls[i] for i in sorted(calls)], parser.result()


def check(expect: dict, content: str, calls: list[dict], early: str | None = None) -> None:
    if "content" in expect:
        assert content == expect["content"]
    for s in expect.get("content_includes", []):
        assert s in content
    for s in expect.get("content_excludes", []):
        assert s not in content
    if early is not None and "released_before_finish" in expect:
        assert early == expect["released_before_finish"]
    if "calls" not in expect:  # the peer only checks that parsing does not fail
        return
    assert [c["name"] for c in calls] == [c["name"] for c in expect["calls"]]
    for got, want in zip(calls, expect["calls"]):
        if "args" in want:
            assert json.loads(got["arguments"]) == want["args"]
        if "arguments" in want:
            assert got["arguments"] == want["arguments"]
        if "id" in want:
            assert got["id"] == want["id"]
        if "id_pattern" in want:
            assert re.fullmatch(want["id_pattern"], got["id"])
        if "index" in want:
            assert got["index"] == want["index"]
    if expect.get("unique_ids"):
        assert len({c["id"] for c in calls}) == len(calls)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_peer_case(case):
    tools = openai_tools(case["tools"])
    whole = parse_tool_calls("".join(case["chunks"]), tools=tools)
    whole_calls = [
        {"id": c.id, "name": c.name, "arguments": c.arguments, "index": c.index} for c in whole.tool_calls
    ]
    check(case["expect"], whole.content, whole_calls)
    early, content, calls, result = run_stream(case["chunks"], tools)
    check(case["expect"], content, calls, early)
    assert result == whole, "streamed and whole parses agree"


@pytest.fixture(scope="module")
def tok() -> K2Tokenizer:
    return K2Tokenizer.default()


INTERVAL_CASES = [(c, n) for c in CASES if c.get("stream_intervals") for n in c["stream_intervals"]]


@pytest.mark.parametrize("case,interval", INTERVAL_CASES, ids=[f"{c['id']}@{n}" for c, n in INTERVAL_CASES])
def test_peer_case_token_stream(tok, case, interval):
    """The text as a server streams it: ids (markers are single special ids) decoded `interval`
    tokens at a time through the incremental detokenizer."""
    ids = tok.encode("".join(case["chunks"]), allow_special=True)
    decoder = IncrementalDecoder(tok)
    chunks = [decoder.push_many(ids[i : i + interval]) for i in range(0, len(ids), interval)]
    chunks.append(decoder.flush())
    _, content, calls, _ = run_stream(chunks, openai_tools(case["tools"]))
    check(case["expect"], content, calls)


def test_case_file_is_consistent():
    """Wire-format cases carry the peer's own expectation; every deviation says why."""
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids))
    for c in CASES:
        assert c["kind"] in ("wire", "policy")
        if c["kind"] == "wire":
            assert "peer_expect" not in c
        if "peer_expect" in c:
            assert c["kind"] == "policy" and c["why"]
    assert sum(c["kind"] == "wire" for c in CASES) >= 70
