"""Load: 32 concurrent streaming clients against one server with 8 cache slots (so most wait in the
queue). No request is lost, no stream gets another's tokens, and the server is healthy afterwards."""

from __future__ import annotations

import asyncio

import httpx
import openai
from serve_util import MODEL, LiveServer, tiny_engine

from openk2.serve.sampling import SamplingParams
from openk2.tokenizer.chat import encode_chat

CLIENTS = 32


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"client {i} says {'ab' * (i % 7)}"}]


def test_32_concurrent_streams():
    engine = tiny_engine(max_batch=8)
    # What each client must get: its own seeded sample (seeded sampling does not depend on what else
    # is in the batch), computed one at a time before serving.
    expected = []
    for i in range(CLIENTS):
        params = SamplingParams(max_tokens=24, temperature=1.0, seed=i, ignore_eos=True)
        prompt = encode_chat(engine.tokenizer, messages(i), add_generation_prompt=True).ids
        expected.append(engine.generate([prompt], params)[0].completions[0].text)
    assert len(set(expected)) > CLIENTS // 2  # distinct prompts give distinct outputs: mixing would show

    with LiveServer(engine) as srv:
        client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)

        async def one(i: int) -> tuple[str, str | None, int]:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=messages(i),
                max_tokens=24,
                temperature=1.0,
                seed=i,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            text, finish, used = [], None, 0
            async for chunk in stream:
                if chunk.choices:
                    text.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage:
                    used = chunk.usage.completion_tokens
            return "".join(text), finish, used

        async def main():
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(CLIENTS))), timeout=240)

        results = asyncio.run(main())
        assert len(results) == CLIENTS
        for i, (text, finish, used) in enumerate(results):
            assert finish == "length" and used == 24
            assert text == expected[i], f"client {i} got someone else's tokens"
        health = httpx.get(srv.url + "/health").json()
        assert health["status"] == "ok" and health["running"] == 0 and health["waiting"] == 0
        after = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        r = after.chat.completions.create(
            model=MODEL,
            messages=messages(0),
            max_tokens=24,
            seed=0,
            temperature=1.0,
            extra_body={"ignore_eos": True},
        )
        assert r.choices[0].message.content == expected[0]
