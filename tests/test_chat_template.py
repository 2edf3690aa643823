"""The chat template: exact K2 wire format, Jinja equivalence, SFT masks, round trip."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.utils.chat_template_utils import render_jinja_template

from openk2.tokenizer import (
    DEFAULT_SYSTEM_PROMPT,
    JINJA_TEMPLATE,
    THINKING_JINJA_TEMPLATE,
    K2Tokenizer,
    assistant_message,
    encode_chat,
    parse_tool_calls,
    render,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
DOTTED = {
    "type": "function",
    "function": {"name": "fs.read-file", "description": "读取文件", "parameters": {}},
}
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and 北京? Also read <|im_end|> a.txt"},
    {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {
                "id": "functions.get_weather:0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "functions.get_weather:1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "北京"}'},
            },
            {
                "id": "functions.fs.read-file:2",
                "type": "function",
                "function": {"name": "fs.read-file", "arguments": '{"path": "a.txt", "x": {"y": [1, null]}}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather", "content": "Sunny"},
    {
        "role": "tool",
        "tool_call_id": "functions.get_weather:1",
        "content": [{"type": "text", "text": "Rain"}],
    },
    {"role": "tool", "tool_call_id": "functions.fs.read-file:2", "content": "hello"},
    {"role": "assistant", "content": "Paris: sunny. 北京: rain. File: hello."},
]


@pytest.fixture(scope="module")
def tok() -> K2Tokenizer:
    return K2Tokenizer.default()


def jinja(messages, tools=None, add_generation_prompt=False, template=JINJA_TEMPLATE) -> str:
    out = render_jinja_template(
        [messages], tools=tools, chat_template=template, add_generation_prompt=add_generation_prompt
    )
    return out[0][0] if isinstance(out, tuple) else out[0]


def test_exact_wire_format():
    tools_json = json.dumps([WEATHER], ensure_ascii=False)  # as the template's tojson: key order kept
    assert tools_json.startswith('[{"type": "function", "function": {"name"')
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        },
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather", "content": "{}"},
    ]
    expected = (
        f"<|im_system|>tool_declare<|im_middle|>\n  # Tools\n  {tools_json}<|im_end|>"
        f"<|im_system|>system<|im_middle|>{DEFAULT_SYSTEM_PROMPT}<|im_end|>"
        "<|im_user|>user<|im_middle|>Weather?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|><|tool_call_begin|>"
        'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n    {}<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    )
    assert render(messages, tools=[WEATHER], add_generation_prompt=True) == expected
    assert jinja(messages, tools=[WEATHER], add_generation_prompt=True) == expected


def test_default_system_prompt_only_when_missing():
    assert DEFAULT_SYSTEM_PROMPT in render([{"role": "user", "content": "hi"}])
    assert render([]) == ""  # K2-Instruct-0905 adds it only before a first message
    assert DEFAULT_SYSTEM_PROMPT in render([], variant="thinking")  # K2-Thinking always does
    own = render([{"role": "system", "content": "S"}, {"role": "user", "content": "hi", "name": "bob"}])
    assert own == "<|im_system|>system<|im_middle|>S<|im_end|><|im_user|>bob<|im_middle|>hi<|im_end|>"


TEMPLATES = {"instruct": JINJA_TEMPLATE, "thinking": THINKING_JINJA_TEMPLATE}


@pytest.mark.parametrize("variant", TEMPLATES)
def test_jinja_matches_code_on_a_full_conversation(variant):
    t = TEMPLATES[variant]
    for gen in (False, True):
        for tools in (None, [WEATHER, DOTTED]):
            assert jinja(CONVERSATION, tools, gen, t) == render(CONVERSATION, tools, gen, variant=variant)
            assert jinja(CONVERSATION[1:], tools, gen, t) == render(
                CONVERSATION[1:], tools, gen, variant=variant
            )


texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["system", "user", "assistant", "tool"]), texts, st.booleans()),
        max_size=6,
    ),
    st.booleans(),
    st.sampled_from(sorted(TEMPLATES)),
)
def test_jinja_matches_code_on_random_conversations(turns, gen, variant):
    messages, awaiting = [], 0
    for i, (role, text, flag) in enumerate(turns):
        m = {"role": role, "content": text if flag else [{"type": "text", "text": text}]}
        if role == "tool" and (flag or not awaiting):
            m["tool_call_id"] = f"functions.f:{i}"
        awaiting = max(0, awaiting - 1) if role == "tool" else awaiting
        if role == "assistant":
            m["reasoning_content"] = text[::-1]
        if role == "assistant" and flag:
            m["tool_calls"] = [{"type": "function", "function": {"name": "f.g-h", "arguments": {"q": text}}}]
            awaiting += 1
        messages.append(m)
    assert jinja(messages, [WEATHER], gen, TEMPLATES[variant]) == render(
        messages, [WEATHER], gen, variant=variant
    )


def test_encode_chat_specials_and_mask(tok):
    enc = encode_chat(tok, CONVERSATION, tools=[WEATHER, DOTTED])
    assert len(enc.ids) == len(enc.assistant_mask)
    # the user's literal "<|im_end|>" is text: count the template's own <|im_end|> only
    assert enc.ids.count(tok.im_end_id) == len(CONVERSATION) + 1  # + the tool_declare turn
    assert tok.decode(enc.ids) == render(CONVERSATION, tools=[WEATHER, DOTTED])
    # without marker-like user text, encode_chat equals encoding the rendered string with specials on
    clean = [m for m in CONVERSATION if "<|im_end|>" not in str(m.get("content"))]
    assert encode_chat(tok, clean).ids == tok.encode(render(clean), allow_special=True)
    # the assistant mask: exactly the two assistant bodies and their closing <|im_end|>
    spans, cur = [], []
    for i, m in zip(enc.ids, enc.assistant_mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    spans.append(tok.decode(cur))
    body = render([CONVERSATION[2]]).split("<|im_assistant|>assistant<|im_middle|>")[1]
    assert spans == [body, "Paris: sunny. 北京: rain. File: hello.<|im_end|>"]
    gen = encode_chat(tok, CONVERSATION[:2], add_generation_prompt=True)
    assert not any(gen.assistant_mask)  # the prompt, including the generation header, is never trained on
    assert tok.decode(gen.ids).endswith("<|im_assistant|>assistant<|im_middle|>")


def test_round_trip_render_then_parse():
    tools = [WEATHER, DOTTED]
    text = render(CONVERSATION, tools=tools)
    bodies = [t.split("<|im_end|>")[0] for t in text.split("<|im_assistant|>assistant<|im_middle|>")[1:]]
    originals = [m for m in CONVERSATION if m["role"] == "assistant"]
    assert len(bodies) == len(originals)
    for body, original in zip(bodies, originals):
        parsed = parse_tool_calls(body + "<|im_end|>", tools=tools)
        assert parsed.errors == []
        want = {"role": "assistant", "content": original["content"]}
        if original.get("tool_calls"):
            want["tool_calls"] = original["tool_calls"]
        assert assistant_message(parsed) == want


def test_bad_messages_are_rejected():
    with pytest.raises(ValueError, match="role"):
        render([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="tool_call_id"):
        render([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="only text content"):
        render([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ValueError, match="function name"):
        render([{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": "{}"}}]}])
