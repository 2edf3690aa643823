"""The HTTP server end to end: a real uvicorn on 127.0.0.1, driven by the official `openai` client."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest
import torch
from serve_util import MODEL, LiveServer, serve_process, tiny_engine, tiny_model

from openk2.checkpoint import save_model
from openk2.tokenizer.chat import encode_chat

WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "London", "Tokyo"]}, "celsius": {"type": "boolean"}},
    "required": ["city", "celsius"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"tz": {"enum": ["UTC", "CET"]}},
    "required": ["tz"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "ns.get-time", "parameters": TIME}},
]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server():
    with LiveServer(tiny_engine(max_batch=8)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def schema_of(name: str) -> dict:
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["running"] == 0


def test_plain_and_streamed_chat_agree(client):
    kw = dict(model=MODEL, messages=USER, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens <= 12 and full.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason


def test_tool_call_round_trip(client):
    first = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=200,
        temperature=0.7,
        seed=1,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for i, call in enumerate(choice.message.tool_calls):
        assert call.id == f"functions.{call.function.name}:{i}"
        jsonschema.validate(json.loads(call.function.arguments), schema_of(call.function.name))
    assistant = choice.message.model_dump(exclude_none=True)
    results = [
        {"role": "tool", "tool_call_id": c.id, "name": c.function.name, "content": '{"temp": 21}'}
        for c in choice.message.tool_calls
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=USER + [assistant] + results, tools=TOOLS, tool_choice="none", max_tokens=10
    )
    assert second.choices[0].message.tool_calls is None
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_named_tool_choice(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "ns.get-time"}},
        max_tokens=100,
    )
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["ns.get-time"] and calls[0].id == "functions.ns.get-time:0"
    jsonschema.validate(json.loads(calls[0].function.arguments), TIME)


@pytest.mark.parametrize("seed", [0, 3, 5])
def test_streamed_tool_calls_reassemble_to_the_unstreamed_result(client, seed):
    kw = dict(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=300, seed=seed)
    full = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**kw, stream=True):
        delta = chunk.choices[0].delta
        finish = chunk.choices[0].finish_reason or finish
        for d in delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = d.id or call["id"]
            call["name"] = (d.function.name if d.function else None) or call["name"]
            call["arguments"] += (d.function.arguments or "") if d.function else ""
    expected = [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        for c in full.message.tool_calls
    ]
    assert [calls[i] for i in sorted(calls)] == expected
    assert finish == full.finish_reason == "tool_calls"


def test_json_schema_response_validates(client):
    schema = {
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no"]},
            "confidence": {"type": "integer", "enum": [1, 2, 3]},
        },
        "required": ["answer", "confidence"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}}
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL, messages=USER, response_format=fmt, max_tokens=80, seed=seed
        )
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        response_format={"type": "json_object"},
        max_tokens=200,
        seed=0,
        temperature=0.3,
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_n_and_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=USER, n=2, max_tokens=5, logprobs=True, top_logprobs=2, seed=4
    )
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert len(c.logprobs.content) == 5 and all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
        assert all(t.logprob <= 0 for t in c.logprobs.content)
    assert r.usage.completion_tokens == 10


def test_completions_endpoint(client):
    r = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=2
    )
    c = r.choices[0]
    assert len(c.logprobs.tokens) == r.usage.completion_tokens <= 6
    streamed = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(ch.choices[0].text for ch in streamed) == c.text
    batch = client.completions.create(
        model=MODEL, prompt=["a", "b"], max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert sorted(ch.index for ch in batch.choices) == [0, 1] and batch.usage.completion_tokens == 6


def _error(server, body, path="/v1/chat/completions", raw=None) -> tuple[int, dict]:
    r = httpx.post(server.url + path, content=raw, json=None if raw is not None else body, timeout=30)
    return r.status_code, r.json()["error"]


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": MODEL, "messages": USER, "temperature": 5}, "temperature"),
        ({"model": MODEL, "messages": USER, "top_p": 1.5}, "top_p"),
        ({"model": MODEL, "messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"model": MODEL, "messages": USER, "seed": 2**64}, "seed"),
        ({"model": MODEL, "messages": USER, "logit_bias": {"x": 1}}, "logit_bias"),
        ({"model": MODEL, "messages": USER, "logit_bias": {"5": 101}}, "logit_bias"),
        ({"model": MODEL, "messages": USER, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
        ({"model": MODEL, "messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": USER, "n": 99}, "n"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": MODEL, "messages": [USER[0], {"role": "user", "content": 5}]}, "messages[1]"),
        ({"model": MODEL, "messages": USER, "tool_choice": "required"}, "tool_choice"),
        (
            {
                "model": MODEL,
                "messages": USER,
                "tools": [{"type": "function", "function": {"name": "bad name!"}}],
            },
            "tools[0]",
        ),
        (
            {
                "model": MODEL,
                "messages": USER,
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
                ],
            },
            "tools[0]",
        ),
        ({"model": MODEL, "messages": USER, "response_format": {"type": "xml"}}, "response_format"),
    ],
)
def test_bad_requests_are_400(server, body, param):
    status, err = _error(server, body)
    assert status == 400 and err["type"] == "invalid_request_error" and err["message"]
    if param:
        assert err["param"] == param


def test_error_shapes(server):
    status, err = _error(server, None, raw=b'{"model": ')
    assert status == 400 and "not valid JSON" in err["message"]
    status, err = _error(server, {"model": "gpt-9", "messages": USER})
    assert status == 404 and err["code"] == "model_not_found"
    long = [{"role": "user", "content": "x" * 2000}]
    status, err = _error(server, {"model": MODEL, "messages": long})
    assert status == 400 and err["code"] == "context_length_exceeded"
    status, err = _error(server, {"model": MODEL, "messages": USER, "max_tokens": 5000})
    assert status == 400 and err["code"] == "context_length_exceeded"
    status, err = _error(server, {"model": MODEL, "prompt": [1, 10**9]}, path="/v1/completions")
    assert status == 400
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_disconnected_stream_frees_its_slot(server):
    body = {"model": MODEL, "messages": USER, "max_tokens": 900, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as h, h.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        next(lines)
        assert httpx.get(server.url + "/health").json()["running"] == 1
    deadline = time.time() + 20
    while httpx.get(server.url + "/health").json()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json()["running"] == 0


def test_disconnected_unstreamed_request_frees_its_slot(server):
    body = {"model": MODEL, "messages": USER, "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.5)
    deadline = time.time() + 20
    while httpx.get(server.url + "/health").json()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json()["running"] == 0


def test_special_tokens_never_leak_into_tool_replies():
    """A model that writes a reserved special token while tools are offered: the token is counted and
    has a logprob, but the reply text (plain and streamed) holds no special token."""
    engine = tiny_engine(max_batch=2, max_seq_len=1024)
    tok, model = engine.tokenizer, engine.model
    prompt = encode_chat(tok, USER, tools=TOOLS, add_generation_prompt=True).ids
    with torch.no_grad():
        first = int(model(torch.tensor([prompt]))[0, -1].argmax())
        reserved = next(i for name, i in tok.special_ids.items() if name.startswith("<|reserved_token_"))
        w = model.lm_head.weight
        w[[first, reserved]] = w[[reserved, first]]  # greedy now writes the reserved token first
    with LiveServer(engine) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        kw = dict(model=MODEL, messages=USER, tools=TOOLS, max_tokens=8, temperature=0)
        r = client.chat.completions.create(**kw, logprobs=True)
        assert r.choices[0].logprobs.content[0].token == tok.token_bytes(reserved).decode()
        content = r.choices[0].message.content or ""
        assert "<|" not in content and r.usage.completion_tokens == 8
        chunks = list(client.chat.completions.create(**kw, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content


def test_unconstrained_tool_choice_reports_what_the_model_wrote():
    """constrained_tools=False (`openk2 serve --no-constrained-tools`): tool_choice "required" adds no
    grammar, so the reply is exactly the unforced one; this random model writes no call."""
    with LiveServer(tiny_engine(max_batch=2, max_seq_len=1024), constrained_tools=False) as srv:
        assert httpx.get(srv.url + "/health").json()["constrained_tools"] is False
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        kw = dict(model=MODEL, messages=USER, tools=TOOLS, max_tokens=24, temperature=0)
        forced = client.chat.completions.create(**kw, tool_choice="required").choices[0]
        named = {"type": "function", "function": {"name": "get_weather"}}
        by_name = client.chat.completions.create(**kw, tool_choice=named).choices[0]
        free = client.chat.completions.create(**kw, tool_choice="auto").choices[0]
        assert forced.message.tool_calls is None and forced.finish_reason in ("stop", "length")
        assert forced.message.content == by_name.message.content == free.message.content


def test_api_key():
    with LiveServer(tiny_engine(max_batch=1, max_seq_len=512), api_key="sekret") as srv:
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
        assert good.models.list().data[0].id == MODEL
        assert httpx.get(srv.url + "/health").status_code == 200


def test_openk2_serve_cli(tmp_path):
    """`openk2 serve CHECKPOINT` in a real subprocess, loading a saved checkpoint."""
    save_model(tiny_model(seed=0, max_positions=512), tmp_path / "ckpt")
    args = ["--served-model-name", MODEL, "--max-batch", "2", "--no-constrained-tools"]
    with serve_process(tmp_path / "ckpt", *args, seconds=180) as url:  # starts in seconds; room for load
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4 or r.choices[0].finish_reason == "stop"
        health = httpx.get(url.removesuffix("/v1") + "/health").json()
        assert health["constrained_tools"] is False and health["compiled"] is False


@pytest.mark.slow
def test_openk2_serve_compile_cli(tmp_path):
    """`openk2 serve --compile`: the decode step is compiled before the server answers /health, and
    the streamed reply of the compiled server is the eager engine's greedy continuation."""
    from openk2.serve.engine import Engine
    from openk2.serve.sampling import SamplingParams
    from openk2.tokenizer.tokenizer import K2Tokenizer

    model = tiny_model(seed=0, max_positions=512)
    save_model(model, tmp_path / "ckpt")
    tok = K2Tokenizer.byte_level()
    prompt = "The latent cache holds"
    eager = Engine(model, tok, max_batch=2, max_seq_len=512)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    want = eager.generate([tok.encode(prompt)], greedy)[0].completions[0].text
    args = ["--served-model-name", MODEL, "--max-batch", "2", "--compile"]
    with serve_process(tmp_path / "ckpt", *args, seconds=300) as url:
        assert httpx.get(url.removesuffix("/v1") + "/health").json()["compiled"] is True
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        kw = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        whole = client.completions.create(**kw).choices[0].text
        streamed = "".join(
            c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices
        )
    assert whole == streamed == want


# ---------------------------------------------------------------------------------------------------
# The chat layer's request semantics, without HTTP (the openai-client versions: test_eval_parity.py)


def test_messages_are_normalised_before_rendering():
    from openk2.serve.openai_chat import RequestError, normalize_messages

    call = {"id": "search:0", "type": "function", "function": {"name": "search", "arguments": "{}"}}
    kept = {"id": "functions.get_weather:7", "type": "function", "function": {"name": "get_weather"}}
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [call, kept]},
        {"role": "tool", "tool_call_id": "search:0", "content": "r0"},
        {"role": "tool", "tool_call_id": "functions.get_weather:7", "content": "r1"},
    ]
    out, n_calls = normalize_messages(messages)
    assert out[0]["role"] == "system" and messages[0]["role"] == "developer"  # the caller's list is kept
    assert [c["id"] for c in out[2]["tool_calls"]] == ["functions.search:0", "functions.get_weather:7"]
    assert [m["tool_call_id"] for m in out[3:]] == ["functions.search:0", "functions.get_weather:7"]
    assert n_calls == 2
    # a result without an id answers the oldest open call, as the template reads it
    unnamed = [*messages[:3], {"role": "tool", "content": "r0"}, {"role": "tool", "content": "r1"}]
    assert normalize_messages(unnamed)[1] == 2
    for bad, param in [
        ([{"role": "tool", "tool_call_id": "x", "content": ""}], "messages[0].tool_call_id"),
        ([{"role": "user", "content": "q"}, {"role": "tool", "content": ""}], "messages[1].tool_call_id"),
        (
            [*messages[:4], {"role": "tool", "content": ""}, {"role": "tool", "content": ""}],
            "messages[5].tool_call_id",
        ),
        ([{"role": "tool", "tool_call_id": 5, "content": ""}], "messages[0].tool_call_id"),
        ([{"role": "assistant", "tool_calls": [{"function": {}}]}], "messages[0].tool_calls[0]"),
        ([{"role": "assistant", "tool_calls": "no"}], "messages[0].tool_calls"),
        (["hi"], "messages[0]"),
        ([], "messages"),
    ]:
        with pytest.raises(RequestError) as e:
            normalize_messages(bad)
        assert e.value.param == param and e.value.status == 400


def test_top_p_zero_is_greedy_and_logit_bias_moves_the_choice():
    from openk2.serve.sampling import SamplingParams, sample

    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    best = logits.argmax(-1).tolist()
    hot = [SamplingParams(temperature=2.0, top_p=0.0).validate(50) for _ in range(4)]
    for _ in range(5):
        assert sample(logits, hot, [None] * 4, [None] * 4)[0] == best
    biased = [SamplingParams(temperature=0.0, logit_bias={7: 100.0}).validate(50)] * 4
    tokens, _ = sample(logits, biased, [None] * 4, [None] * 4)
    assert tokens == [7] * 4
    banned = [SamplingParams(temperature=0.0, logit_bias={b: -100.0}, logprobs=True) for b in best]
    tokens, records = sample(logits, banned, [None] * 4, [None] * 4)
    assert all(t != b for t, b in zip(tokens, best))
    # logprobs stay the model's own (before the bias)
    assert records[0].logprob == pytest.approx(torch.log_softmax(logits[0], -1)[tokens[0]].item())
