"""The client package: retries, permanent failures, cache, resumable JSONL output, HTTP backend."""

import asyncio
import json
import socket
import threading
import time

import pytest

from openk2.client import (
    ChatRequest,
    ChatResult,
    EndpointBackend,
    LLMClient,
    LLMError,
    Rejected,
    RetryPolicy,
    ScriptedBackend,
    TransientError,
    extract_json,
    read_jsonl,
    run_jsonl,
)


def req(text: str, **kw) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": text}], **kw)


def test_retries_transient_then_succeeds_and_caches(tmp_path):
    failures = {"n": 2}

    def fn(r):
        if failures["n"]:
            failures["n"] -= 1
            return TransientError("503")
        return "hello " + r.messages[0]["content"]

    backend = ScriptedBackend(fn, RetryPolicy(max_retries=4, backoff_s=0.001))
    client = LLMClient(backend, cache_path=tmp_path / "cache.jsonl")
    assert asyncio.run(client.chat(req("x"))).content == "hello x"
    assert client.stats.retries == 2 and client.stats.requests == 1
    # Same request again: served from the cache, also by a new client reading the cache file.
    assert asyncio.run(client.chat(req("x"))).content == "hello x"
    again = LLMClient(backend, cache_path=tmp_path / "cache.jsonl")
    assert asyncio.run(again.chat(req("x"))).content == "hello x"
    assert backend.calls == 3 and again.stats.cache_hits == 1
    # A different seed is a different request.
    asyncio.run(again.chat(req("x", seed=1)))
    assert backend.calls == 4


def test_gives_up_after_max_retries_and_permanent_errors_fail_at_once():
    backend = ScriptedBackend(lambda r: TransientError("down"), RetryPolicy(max_retries=2, backoff_s=0.001))
    client = LLMClient(backend)
    with pytest.raises(LLMError, match="gave up after 3 attempts"):
        asyncio.run(client.chat(req("x")))
    assert backend.calls == 3 and client.stats.failures == 1
    backend = ScriptedBackend(lambda r: LLMError("HTTP 400"), RetryPolicy(max_retries=5, backoff_s=0.001))
    client = LLMClient(backend)
    with pytest.raises(LLMError, match="400"):
        asyncio.run(client.chat(req("x")))
    assert backend.calls == 1


def test_concurrency_is_bounded():
    state = {"now": 0, "peak": 0}
    lock = threading.Lock()

    def slow(r):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.02)
        with lock:
            state["now"] -= 1
        return ChatResult("ok")

    client = LLMClient(ScriptedBackend(slow), concurrency=3)

    async def main():
        await asyncio.gather(*(client.chat(req(str(i))) for i in range(20)))

    asyncio.run(main())
    assert state["peak"] == 3


def test_run_jsonl_rejects_and_resumes_without_duplicates(tmp_path):
    out = tmp_path / "out.jsonl"
    items = [{"id": f"i{k}", "n": k} for k in range(10)]
    calls = []

    async def work(item):
        calls.append(item["id"])
        if item["n"] % 3 == 0:
            raise Rejected("multiple_of_three")
        if item["n"] == 7 and len([c for c in calls if c == "i7"]) == 1:
            raise LLMError("server went away")  # fails the first time: not marked done
        return {"value": item["n"] * 10}

    client = LLMClient(ScriptedBackend(lambda r: "unused"))
    s1 = asyncio.run(run_jsonl(items[:6], work, out, client.stats, "step", workers=2))
    assert (s1.accepted, s1.rejected, s1.failed) == (4, 2, 0)
    # Simulate a crash in the middle of writing a line.
    with open(out, "a") as f:
        f.write('{"value": 99, "sour')
    s2 = asyncio.run(run_jsonl(items, work, out, client.stats, "step", workers=2))
    assert s2.skipped == 6 and s2.failed == 1 and s2.rejected == 2  # i6, i9 rejected; i7 failed
    s3 = asyncio.run(run_jsonl(items, work, out, client.stats, "step", workers=2))
    assert s3.skipped == 9 and s3.accepted == 1  # only i7 was left
    records = read_jsonl(out)
    ids = [r["source_id"] for r in records]
    assert sorted(ids) == sorted(f"i{k}" for k in range(10) if k % 3) and len(ids) == len(set(ids))
    assert calls.count("i1") == 1  # never redone
    table = client.stats.table()
    assert "step: accepted / rejected" in table and "multiple_of_three" in table


def test_items_need_unique_ids(tmp_path):
    async def work(item):
        return {}

    client = LLMClient(ScriptedBackend(lambda r: ""))
    with pytest.raises(ValueError, match="unique 'id'"):
        asyncio.run(run_jsonl([{"id": 1}, {"id": 1}], work, tmp_path / "o.jsonl", client.stats, "s"))


def test_extract_json():
    assert extract_json('Sure! ```json\n[1, {"a": 2}]\n``` done') == [1, {"a": 2}]
    assert extract_json('{"x": {broken} then {"ok": true}') == {"ok": True}
    with pytest.raises(Rejected):
        extract_json("no json here")


# ----------------------------------------------------------------------------------------------------
# HTTP backend against a real local server that fails on purpose


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def flaky_server():
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()
    seen = {"n": 0}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen["n"] += 1
        if seen["n"] % 2 == 1:
            return JSONResponse({"error": {"message": "try again"}}, status_code=503)
        if body["messages"][-1]["content"] == "bad":
            return JSONResponse({"error": {"message": "bad request"}}, status_code=400)
        calls = []
        if body.get("tools"):
            args = json.dumps({"city": "Oslo"})
            calls = [{"id": "functions.get_weather:0", "type": "function",
                      "function": {"name": "get_weather", "arguments": args}}]  # fmt: skip
        return {
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "tool_calls" if calls else "stop",
                         "message": {"role": "assistant", "tool_calls": calls or None,
                                     "content": "echo " + body["messages"][-1]["content"]}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        }  # fmt: skip

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


def test_endpoint_backend_retries_5xx_and_reads_tool_calls(flaky_server):
    client = LLMClient(EndpointBackend(flaky_server, "m", retry=RetryPolicy(max_retries=2, backoff_s=0.001)))
    r = asyncio.run(client.chat(req("hi")))
    assert r.content == "echo hi" and client.stats.retries == 1 and client.stats.prompt_tokens == 5
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    r = asyncio.run(client.chat(req("weather", tools=tools)))
    assert (r.tool_calls[0].name, r.tool_calls[0].arguments) == ("get_weather", '{"city": "Oslo"}')
    assert r.message()["tool_calls"][0]["id"] == "functions.get_weather:0"
    assert r.finish_reason == "tool_calls"
    with pytest.raises(LLMError, match="http_400"):
        asyncio.run(client.chat(req("bad")))
    assert client.stats.failures == 1


def test_request_body_leaves_unset_fields_to_the_server():
    body = ChatRequest([{"role": "user", "content": "x"}], max_tokens=None, seed=None).body("m")
    assert body == {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0.0}
    full = ChatRequest(
        [], tool_choice="required", top_p=0, parallel_tool_calls=False, logit_bias={"5": 1.0}, stream=True
    ).body("m")
    assert full["parallel_tool_calls"] is False and full["top_p"] == 0 and full["stream"] is True
    assert full["logit_bias"] == {"5": 1.0} and full["tool_choice"] == "required"
