"""The tool-call parser: known server failures, streaming == whole parsing, token-level streaming."""

from __future__ import annotations

import json

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from openk2.tokenizer import (
    IncrementalDecoder,
    K2Tokenizer,
    StreamingToolCallParser,
    assistant_message,
    encode_chat,
    parse_tool_calls,
    render,
)
from openk2.tokenizer.toolcalls import MARKER_RE, MARKERS

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def call(cid: str, args: str) -> str:
    return f"{CB}{cid}{AB}{args}{CE}"


def stream(text: str, sizes: list[int], tools=None):
    """Feed `text` in chunks of the given sizes (cycled); return (deltas, parser).

    A chunk never ends on the `<` that starts a marker: a lone trailing `<` is released as
    text by design (decoded ids never split a marker, which is one token)."""
    parser, deltas, pos, i = StreamingToolCallParser(tools), [], 0, 0
    while pos < len(text):
        n = sizes[i % len(sizes)] if sizes else len(text)
        if text[pos : pos + n].endswith("<") and any(text.startswith(m, pos + n - 1) for m in MARKERS):
            n += 1
        deltas += parser.feed(text[pos : pos + n])
        pos, i = pos + n, i + 1
    deltas += parser.finish()
    return deltas, parser


def assemble(deltas) -> tuple[str, list[dict]]:
    """What an OpenAI client builds from the chunk deltas."""
    content, calls = "", {}
    for d in deltas:
        o = d.to_openai()
        if "content" in o:
            content += o["content"]
            continue
        (tc,) = o["tool_calls"]
        if "id" in tc:
            assert tc["index"] not in calls, "id and name are sent once, first"
            calls[tc["index"]] = {"id": tc["id"], "name": tc["function"]["name"], "arguments": ""}
        calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)]


def test_several_calls_and_content_before():
    text = (
        "I'll look.\n"
        + SB
        + call("functions.a:0", '{"x": 1}')
        + call("functions.b:1", "{}")
        + SE
        + "<|im_end|>"
    )
    p = parse_tool_calls(text, tools=["a", "b"])
    assert p.content == "I'll look.\n" and p.errors == [] and p.finish_reason == "tool_calls"
    assert [(c.id, c.name, c.arguments, c.index) for c in p.tool_calls] == [
        ("functions.a:0", "a", '{"x": 1}', 0),
        ("functions.b:1", "b", "{}", 1),
    ]
    assert all(c.complete and c.valid_json and c.offered for c in p.tool_calls)


def test_dotted_and_dashed_names():
    p = parse_tool_calls(
        SB + call("functions.fs.read-file:0", "{}") + call(" functions.a-b.c_d:12 ", "{}") + SE
    )
    assert [c.name for c in p.tool_calls] == ["fs.read-file", "a-b.c_d"]
    assert p.tool_calls[1].id == "functions.a-b.c_d:12" and p.errors == []


def test_cut_by_eos_is_reported_not_raised():
    text = (
        "ok" + SB + call("functions.a:0", "{}") + CB + 'functions.b:1<|tool_call_argument_begin|>{"q": "hal'
    )
    for tail in ("", "[EOS]", "<|im_end|>"):
        p = parse_tool_calls(text + tail)
        assert p.content == "ok" and [c.complete for c in p.tool_calls] == [True, False]
        assert p.tool_calls[1].arguments == '{"q": "hal' and not p.tool_calls[1].valid_json
        assert any("incomplete" in e for e in p.errors) and any("not closed" in e for e in p.errors)
    for cut in (SB + CB + "functions.a", SB + CB, "ok" + SB + CB + "<|im_end|>"):  # cut before arguments
        p = parse_tool_calls(cut)
        assert p.tool_calls == [] and any("cut before its arguments" in e for e in p.errors)
        deltas, parser = stream(cut, [1])
        assert parser.result() == p and all(d.index is None for d in deltas)


def test_invalid_json_and_unoffered_tools_are_flagged():
    p = parse_tool_calls(
        SB + call("functions.a:0", "{'x': 1}") + call("functions.rm:1", "[1]") + SE, tools=["a"]
    )
    a, rm = p.tool_calls
    assert not a.valid_json and a.offered and a.arguments == "{'x': 1}"
    assert not rm.valid_json and rm.offered is False  # an array is not an arguments object
    assert any("{'x': 1}" in e for e in p.errors) and any(
        "'rm' is not among the offered tools" in e for e in p.errors
    )
    assert parse_tool_calls(SB + call("functions.a:0", "{}") + SE).tool_calls[0].offered is None
    assert len(assistant_message(p, include_invalid=False).get("tool_calls", [])) == 0


def test_markers_never_leak_into_content():
    text = (
        f"a{CE}b{AB}c<|im_middle|>d"
        + SB
        + " junk "
        + call("get_x:0", "{}")
        + SE
        + " after"
        + "<|im_end|>ignored"
    )
    p = parse_tool_calls(text)
    assert p.content == "abcd after"
    assert not any(m in p.content for m in MARKERS)
    assert p.tool_calls[0].name == "get_x" and any("functions.NAME:IDX" in e for e in p.errors)
    assert any("junk" in e for e in p.errors) and any("after" in e for e in p.errors)
    # a call without the section marker still parses, and is reported
    p = parse_tool_calls("hi" + call("functions.a:0", "{}"))
    assert p.content == "hi" and p.tool_calls[0].complete and p.errors


def test_split_markers_and_delta_order():
    text = "Hello" + SB + call("functions.w.x:0", '{"city": "Paris"}') + SE
    for size in (1, 2, 3, 7):
        deltas, parser = stream(text, [size])
        assert parser.result() == parse_tool_calls(text)
        content, calls = assemble(deltas)
        assert content == "Hello" and calls == [
            {"id": "functions.w.x:0", "name": "w.x", "arguments": '{"city": "Paris"}'}
        ]
        assert all("<|" not in (d.content or "") for d in deltas)
    deltas, _ = stream(text, [1])
    kinds = ["content" if d.index is None else ("header" if d.id is not None else "args") for d in deltas]
    first_header = kinds.index("header")
    assert set(kinds[:first_header]) == {"content"} and set(kinds[first_header + 1 :]) == {"args"}
    assert deltas[first_header].to_openai() == {
        "tool_calls": [
            {
                "index": 0,
                "id": "functions.w.x:0",
                "type": "function",
                "function": {"name": "w.x", "arguments": ""},
            }
        ]
    }


# ---- properties ----------------------------------------------------------------------------------
name_st = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,20}", fullmatch=True)
tricky = st.sampled_from(
    ["<|", "|>", "<|tool_call", "tool_call_end|>", "<|im_end", "functions.x:1", "[EOS", "<"]
)
text_st = st.lists(st.one_of(st.text(max_size=8), tricky), max_size=6).map("".join)
json_st = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text_st,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(text_st, kids, max_size=3),
    max_leaves=8,
)
args_st = st.dictionaries(text_st, json_st, max_size=4)


def has_marker(s: str) -> bool:
    return any(m in s for m in MARKERS)


@st.composite
def assistant_turns(draw):
    content = draw(text_st)
    calls = []
    for i, name in enumerate(draw(st.lists(name_st, max_size=4))):
        args = json.dumps(draw(args_st), ensure_ascii=draw(st.booleans()))
        calls.append(
            {"id": f"functions.{name}:{i}", "type": "function", "function": {"name": name, "arguments": args}}
        )
    message = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = calls
    return message


@settings(max_examples=300, deadline=None)
@given(assistant_turns(), st.lists(st.integers(1, 40), min_size=1, max_size=8))
def test_round_trip_and_streaming_agree(message, sizes):
    assume(not has_marker(json.dumps(message, ensure_ascii=False)))
    rendered = render([{"role": "user", "content": "q"}, message])
    body = rendered.split("<|im_assistant|>assistant<|im_middle|>", 1)[1]
    tools = [c["function"]["name"] for c in message.get("tool_calls", [])]
    whole = parse_tool_calls(body, tools=tools)
    assert whole.errors == [] and assistant_message(whole) == message
    deltas, parser = stream(body, sizes, tools)
    assert parser.result() == whole
    content, calls = assemble(deltas)
    assert content == whole.content
    assert calls == [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in whole.tool_calls]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(st.sampled_from(MARKERS), text_st, tricky), max_size=12).map("".join),
    st.lists(st.integers(1, 30), min_size=1, max_size=8),
)
def test_streaming_equals_whole_on_arbitrary_garbage(text, sizes):
    whole = parse_tool_calls(text, tools=["a"])
    deltas, parser = stream(text, sizes, tools=["a"])
    assert parser.result() == whole
    content, calls = assemble(deltas)
    assert content == whole.content
    if not has_marker(MARKER_RE.sub("", text)):  # else dropping a stray marker can join text into one
        assert not has_marker(content)
    assert [c["arguments"] for c in calls] == [c.arguments for c in whole.tool_calls]


@pytest.fixture(scope="module")
def tok() -> K2Tokenizer:
    return K2Tokenizer.default()


def test_token_by_token_through_the_incremental_decoder(tok):
    """What the server does: sample ids, detokenize incrementally, parse the text stream."""
    message = {
        "role": "assistant",
        "content": "Sure 😀 — 查一下",
        "tool_calls": [
            {
                "id": "functions.ns.get-w:0",
                "type": "function",
                "function": {"name": "ns.get-w", "arguments": '{"c": "北京🎉"}'},
            },
            {
                "id": "functions.ns.get-w:1",
                "type": "function",
                "function": {"name": "ns.get-w", "arguments": "{}"},
            },
        ],
    }
    enc = encode_chat(tok, [{"role": "user", "content": "q"}, message])
    generated = [i for i, m in zip(enc.ids, enc.assistant_mask) if m]
    assert generated[-1] == tok.im_end_id
    dec, parser, deltas = IncrementalDecoder(tok), StreamingToolCallParser(["ns.get-w"]), []
    for i in generated:
        deltas += parser.feed(dec.push(i))
    deltas += parser.feed(dec.flush()) + parser.finish()
    result = parser.result()
    assert result.errors == [] and assistant_message(result) == message
    assert assemble(deltas)[0] == message["content"]


def test_deep_nesting_is_reported_not_raised():
    """Arguments nested past Python's recursion limit: flagged as unchecked JSON, never raised. (At
    1,000 levels whether the JSON checks out depends on the interpreter's recursion limit, which
    torch.compile raises when it is imported; at 100,000 it never does.)"""
    for depth in (1_000, 100_000):
        args = '{"a": ' * depth + "1" + "}" * depth
        text = SB + call("functions.a:0", args) + SE
        p = parse_tool_calls(text, tools=["a"])
        assert p.tool_calls[0].arguments == args
        assert depth < 10_000 or not p.tool_calls[0].valid_json
        deltas, parser = stream(text, [4096], tools=["a"])
        assert parser.result() == p


def test_argument_whitespace_is_stripped_as_it_streams():
    text = "x" + SB + CB + "functions.a:0" + AB + '  {"k": "a b"}  \n' + CE + SE
    deltas, parser = stream(text, [1])
    args = [d.arguments for d in deltas if d.index is not None and d.id is None]
    assert "".join(args) == '{"k": "a b"}' == parser.result().tool_calls[0].arguments
