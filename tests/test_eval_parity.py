"""One checkpoint, two ways in: the in-process backend and a real `openk2 serve` subprocess give the
same greedy answers, tool calls included, because both go through the one chat layer
(openk2/serve/openai_chat.py). Then the request semantics of that layer through the official `openai`
client against the same server: role developer, top_p 0, logit_bias, parallel_tool_calls false, an
orphan tool result (400 naming its param) and historical call ids in other formats.

A random model never opens a tool-call section by itself, so the tool calls here are forced by
tool_choice "required" or a named function (a grammar); the arguments are still the model's choice."""

from __future__ import annotations

import openai
import pytest
from eval_util import save_tiny_checkpoint
from serve_util import serve_process

from openk2.client import ChatRequest, EndpointBackend, LocalBackend, RetryPolicy
from openk2.serve.openai_chat import PreparedChat
from openk2.tokenizer.tokenizer import K2Tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}
TOOLS = [WEATHER, CLOCK]
ASK = [{"role": "user", "content": "Weather in Oslo and the time, please."}]
HISTORY = [
    *ASK,
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "search:0", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
        ],
    },
    {"role": "tool", "tool_call_id": "search:0", "content": '{"time": "12:00"}'},
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-parity")
    save_tiny_checkpoint(path, max_positions=2048)
    return path


@pytest.fixture(scope="module")
def url(ckpt):
    with serve_process(ckpt, "--max-seq-len", "2048", "--max-batch", "4") as url:
        yield url


def _requests() -> list[ChatRequest]:
    def req(messages, **kw) -> ChatRequest:
        return ChatRequest(messages, max_tokens=kw.pop("max_tokens", 160), temperature=0.0, seed=None, **kw)

    named = {"type": "function", "function": {"name": "get_weather"}}
    out = [
        req([{"role": "user", "content": "Say hello."}], max_tokens=12),
        req(ASK, tools=TOOLS, tool_choice="required"),
        req(ASK, tools=TOOLS, tool_choice=named),
        req(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False),
        req(ASK, tools=TOOLS, tool_choice="none", max_tokens=12),
        req(HISTORY, tools=TOOLS, tool_choice="required"),
        req(
            [{"role": "user", "content": "JSON please."}],
            response_format={"type": "json_object"},
            max_tokens=40,
        ),
    ]
    return out + [ChatRequest(**{**r.__dict__, "stream": True}) for r in out]


def _answer(result) -> tuple:
    assert result.error is None, result.error
    calls = [(c.id, c.name, c.arguments) for c in result.tool_calls]
    return result.content, calls, result.finish_reason


@pytest.mark.slow
def test_in_process_and_served_checkpoint_answer_alike(ckpt, url):
    local = LocalBackend(ckpt, max_seq_len=2048, max_batch=4)
    remote = EndpointBackend(url, timeout=300, retry=RetryPolicy(max_retries=0), concurrency=1)
    try:
        requests = _requests()
        # one at a time on both sides, so that neither answer depends on what it was batched with
        here = [_answer(local.chat(r)) for r in requests]
        there = [_answer(remote.chat(r)) for r in requests]
    finally:
        local.close()
        remote.close()
    assert here == there
    n = len(requests) // 2
    assert here[:n] == here[n:]  # streamed and whole replies agree as well
    forced = here[1:4] + [here[5]]
    assert all(calls and finish == "tool_calls" for _, calls, finish in forced)
    assert [c[1] for c in here[2][1]] == ["get_weather"] and len(here[3][1]) == 1
    assert not here[4][1]  # tool_choice none: no call
    assert here[5][1][0][0].startswith("functions.") and here[5][1][0][0].endswith(":1")  # counts on


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)


def _model(client) -> str:
    return client.models.list().data[0].id


@pytest.mark.slow
def test_openai_client_request_semantics(client):
    model = _model(client)
    greedy = {"model": model, "max_tokens": 8, "temperature": 0}

    def chat(messages, **kw):
        return client.chat.completions.create(messages=messages, **{**greedy, **kw})

    # role developer is a system message
    dev = chat([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    sys_ = chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert dev.choices[0].message.content == sys_.choices[0].message.content
    assert dev.usage.prompt_tokens == sys_.usage.prompt_tokens

    # top_p 0 is greedy, whatever the temperature
    hot = chat([{"role": "user", "content": "Hi"}], temperature=1.5, top_p=0, seed=7)
    cold = chat([{"role": "user", "content": "Hi"}])
    assert hot.choices[0].message.content == cold.choices[0].message.content

    # logit_bias: +100 on one byte makes greedy decoding write only it; the larger bias wins
    z, y = (K2Tokenizer.byte_level().encode(c)[0] for c in "ZY")
    forced = chat([{"role": "user", "content": "Hi"}], logit_bias={str(z): 100})
    assert forced.choices[0].message.content == "Z" * 8
    both = chat([{"role": "user", "content": "Hi"}], logit_bias={str(z): 90, str(y): 100})
    assert both.choices[0].message.content == "Y" * 8

    # parallel_tool_calls false: one call at most, also when the grammar would allow eight
    one = chat(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=160)
    assert len(one.choices[0].message.tool_calls) == 1 and one.choices[0].finish_reason == "tool_calls"

    # a tool result that answers no call is refused, naming the message
    with pytest.raises(openai.BadRequestError) as e:
        chat([*ASK, {"role": "tool", "tool_call_id": "functions.get_time:0", "content": "12:00"}])
    assert e.value.status_code == 400 and e.value.param == "messages[1].tool_call_id"

    # historical ids in other formats are rendered as K2's functions.NAME:IDX
    odd = chat(HISTORY, tools=TOOLS)
    k2 = [dict(m) for m in HISTORY]
    k2[1] = {**k2[1], "tool_calls": [{**k2[1]["tool_calls"][0], "id": "functions.get_time:0"}]}
    k2[2] = {**k2[2], "tool_call_id": "functions.get_time:0"}
    same = chat(k2, tools=TOOLS)
    assert odd.usage.prompt_tokens == same.usage.prompt_tokens
    assert odd.choices[0].message.content == same.choices[0].message.content


def test_parallel_tool_calls_false_keeps_the_first_call_whole_and_streamed():
    """The reply side of parallel_tool_calls false, on a text with two calls (a model that ignores the
    one-call grammar cannot exist here, but `auto` has no grammar)."""
    text = (
        "<|tool_calls_section_begin|>"
        "<|tool_call_begin|>functions.get_time:0<|tool_call_argument_begin|>{}<|tool_call_end|>"
        "<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>"
        '{"city": "Oslo"}<|tool_call_end|>'
        "<|tool_calls_section_end|>"
    )
    for parallel, n in ((True, 2), (False, 1)):
        plan = PreparedChat([], None, TOOLS, "auto", parallel)
        message, finish = plan.reply(text, "stop")
        assert len(message["tool_calls"]) == n and finish == "tool_calls"
        stream = plan.stream()
        deltas = [d for k in range(0, len(text), 7) for d in stream.feed(text[k : k + 7])]
        deltas += stream.feed("", finished=True)
        indices = {tc["index"] for d in deltas for tc in d.get("tool_calls", [])}
        assert indices == set(range(n)) and stream.finish_reason("stop") == "tool_calls"
