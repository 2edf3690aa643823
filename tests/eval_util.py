"""Shared by the evaluation tests: a scripted OpenAI-compatible server on 127.0.0.1 that can be told to
time out, return 500s or send malformed JSON, and a tiny random checkpoint on disk.

The fake's "model" is a script, so every metric the harness reports has a value the test can derive
from the request alone:
- tools offered, tool_choice not "none", last turn from the user -> one call of the named tool (or the
  first offered), with arguments from VALID_ARGS (or '{"bogus": 1}' for tools in `bad_args`);
- a HumanEval prompt in the message -> the canonical solution in a ```python block;
- `A op B=` -> the right integer, except for `*`, where it answers one too many;
- anything else -> "Sure.".
A fault (`500`, `json`, `slow`, `stream`) is chosen by a substring of the last user message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import threading
import time

import httpx
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from openk2 import ModelConfig
from openk2.checkpoint import save_model
from openk2.model.transformer import Transformer
from openk2.rl.envs.code import load_humaneval
from openk2.tokenizer.tokenizer import K2Tokenizer

VALID_ARGS = {
    "get_weather": {"city": "Paris", "unit": "celsius"},
    "search_web": {"query": "james webb telescope news", "max_results": 3},
    "calculator": {"expression": "12345 * 6789"},
    "send_email": {"to": ["bob@example.com"], "subject": "Lunch", "body": "I'll be 10 minutes late."},
    "create_event": {"title": "Sync", "date": "2025-03-14", "duration_minutes": 30},
    "get_stock_price": {"symbol": "AAPL"},
    "get_time": {},
    "inventory.lookup-item": {"sku": "A-1042", "warehouse": "north"},
    "book_flight": {"origin": "LHR", "destination": "JFK", "passenger": {"name": "Ada Lovelace", "age": 36}},
    "set_thermostat": {"temperature_c": 21.5, "mode": "heat"},
}


def save_tiny_checkpoint(path, max_positions: int = 4096, seed: int = 0) -> None:
    """A random `tiny` model (byte-level tokenizer) whose context holds the suite's tool declarations."""
    torch.manual_seed(seed)
    config = dataclasses.replace(ModelConfig.from_preset("tiny"), max_position_embeddings=max_positions)
    save_model(Transformer(config), path)
    K2Tokenizer.byte_level().save_pretrained(path)


class FakeOpenAI:
    def __init__(self):
        self.faults: dict[str, str] = {}  # substring of the last user message -> fault
        self.bad_args: set[str] = set()  # tools whose calls get schema-invalid arguments
        self.slow_seconds = 3.0
        self.requests = 0
        self.canonical = {p["prompt"]: p["canonical_solution"] for p in load_humaneval()}
        self.app = self._build()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    # ---- the scripted model ---------------------------------------------------------------------
    def answer(self, body: dict) -> tuple[str, list[dict]]:
        messages, tools, choice = body["messages"], body.get("tools"), body.get("tool_choice", "auto")
        last = messages[-1]
        if tools and choice != "none" and last["role"] == "user":
            name = choice["function"]["name"] if isinstance(choice, dict) else tools[0]["function"]["name"]
            args = {"bogus": 1} if name in self.bad_args else VALID_ARGS[name]
            return "", [{"id": f"functions.{name}:0", "name": name, "arguments": json.dumps(args)}]
        text = str(last.get("content") or "")
        for prompt, solution in self.canonical.items():
            if prompt in text:
                return f"Here it is:\n```python\n{prompt}{solution}```", []
        m = re.fullmatch(r"(\d+)([+*-])(\d+)=", text.strip())
        if m:
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
            return str({"+": a + b, "-": a - b, "*": a * b + 1}[op]), []
        return "Sure.", []

    def fault(self, body: dict) -> str | None:
        users = [m for m in body.get("messages", []) if m.get("role") == "user"]
        text = str(users[-1].get("content")) if users else ""
        return next((f for key, f in self.faults.items() if key in text), None)

    # ---- HTTP -----------------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            self.requests += 1
            body = await request.json()
            fault = self.fault(body)
            if fault == "500":
                return PlainTextResponse("internal error", status_code=500)
            if fault == "json":
                return PlainTextResponse('{"choices": [{"message": ', media_type="application/json")
            if fault == "slow":
                await asyncio.sleep(self.slow_seconds)
            content, calls = self.answer(body)
            finish = "tool_calls" if calls else "stop"
            if not body.get("stream"):
                message = {"role": "assistant", "content": content or None}
                if calls:
                    message["tool_calls"] = [
                        {
                            "id": c["id"],
                            "type": "function",
                            "function": {"name": c["name"], "arguments": c["arguments"]},
                        }
                        for c in calls
                    ]
                choice = {"index": 0, "message": message, "finish_reason": finish}
                return JSONResponse({"id": "x", "object": "chat.completion", "choices": [choice]})
            return StreamingResponse(self._sse(content, calls, finish, fault), media_type="text/event-stream")

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            solution = self.canonical.get(body["prompt"], "")
            return {"choices": [{"index": 0, "text": solution, "finish_reason": "stop"}]}

        return app

    async def _sse(self, content: str, calls: list[dict], finish: str, fault: str | None):
        def chunk(delta: dict, finish_reason=None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return "data: " + json.dumps({"object": "chat.completion.chunk", "choices": [choice]}) + "\n\n"

        yield chunk({"role": "assistant"})
        for i in range(0, len(content), 3):  # content in 3-character pieces
            yield chunk({"content": content[i : i + 3]})
        if fault == "stream":
            yield "data: {not json\n\n"
        for k, c in enumerate(calls):
            head = {
                "index": k,
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": ""},
            }
            yield chunk({"tool_calls": [head]})
            for i in range(0, len(c["arguments"]), 5):  # arguments split mid-token, as servers do
                yield chunk(
                    {"tool_calls": [{"index": k, "function": {"arguments": c["arguments"][i : i + 5]}}]}
                )
        yield chunk({}, finish)
        yield "data: [DONE]\n\n"

    # ---- lifecycle ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.server.started:
                httpx.get(self.url + "/models", timeout=5).raise_for_status()
                return self
            time.sleep(0.05)
        raise RuntimeError("fake server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
