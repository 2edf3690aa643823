"""The K2-Thinking reasoning parser: whole and streamed splits agree, and it round-trips the
thinking chat template; its content feeds the tool-call parser."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from openk2.tokenizer import (
    IncrementalDecoder,
    K2Tokenizer,
    StreamingToolCallParser,
    parse_tool_calls,
    render,
)
from openk2.tokenizer.reasoning import SplitOutput, StreamingReasoningParser, split_reasoning

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL = "<|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}<|tool_call_end|>"


def stream(text: str, sizes: list[int], starts_in_reasoning: bool = False):
    parser, deltas, pos, i = StreamingReasoningParser(starts_in_reasoning), [], 0, 0
    while pos < len(text):
        n = sizes[i % len(sizes)]
        deltas += parser.feed(text[pos : pos + n])
        pos, i = pos + n, i + 1
    return deltas + parser.finish(), parser.result()


def test_whole_splits():
    assert split_reasoning("<think>2+2=4</think>It is 4.") == SplitOutput("2+2=4", "It is 4.")
    assert split_reasoning("\n <think>a</think>b") == SplitOutput("a", "b")
    assert split_reasoning("<think></think>b") == SplitOutput("", "b")
    assert split_reasoning("no tags, a <think> later") == SplitOutput(None, "no tags, a <think> later")
    assert split_reasoning("<think>cut off by max_tokens") == SplitOutput("cut off by max_tokens", "")
    assert split_reasoning("a</think>b", starts_in_reasoning=True) == SplitOutput("a", "b")
    assert split_reasoning("") == SplitOutput(None, "")
    # a tool-call section ends reasoning and stays in the content for the tool-call parser
    out = split_reasoning("<think>need f" + SB + CALL + SE)
    assert out == SplitOutput("need f", SB + CALL + SE)
    assert parse_tool_calls(out.content).tool_calls[0].name == "f"


pieces = st.one_of(
    st.sampled_from(["<think>", "</think>", SB, CALL, SE, "<", "</", "<th", " ", "\n"]),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=8),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(pieces, max_size=10).map("".join),
    st.lists(st.integers(1, 12), min_size=1, max_size=6),
    st.booleans(),
)
def test_streaming_equals_whole(text, sizes, starts_in_reasoning):
    whole = split_reasoning(text, starts_in_reasoning)
    deltas, result = stream(text, sizes, starts_in_reasoning)
    assert result == whole
    assert "".join(d.reasoning or "" for d in deltas) == (whole.reasoning or "")
    assert "".join(d.content or "" for d in deltas) == whole.content
    assert all((d.reasoning is None) != (d.content is None) for d in deltas)


def test_reasoning_streams_before_it_ends():
    parser = StreamingReasoningParser()
    got = parser.feed("<think>first thought") + parser.feed(" and more</th")
    assert "".join(d.reasoning for d in got) == "first thought and more"
    got = parser.feed("ink>answer")
    assert [d.content for d in got] == ["answer"]


def test_round_trip_through_the_thinking_template_token_by_token():
    """A K2-Thinking turn rendered by the template, decoded id by id as the server does, splits
    back into its reasoning_content, content and tool calls."""
    tok = K2Tokenizer.default()
    turn = {
        "role": "assistant",
        "content": "Let me look — 看看 😀",
        "reasoning_content": "The user wants f. <b>bold</b> stays text.",
        "tool_calls": [
            {"id": "functions.f:0", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    text = render([{"role": "user", "content": "q"}, turn], variant="thinking")
    body = text.split("<|im_assistant|>assistant<|im_middle|>", 1)[1]
    decoder, reasoning, tools = (
        IncrementalDecoder(tok),
        StreamingReasoningParser(),
        StreamingToolCallParser(["f"]),
    )
    content = ""
    for i in tok.encode(body, allow_special=True):
        for d in reasoning.feed(decoder.push(i)):
            if d.content:
                content += "".join(x.content or "" for x in tools.feed(d.content) if x.index is None)
    for d in reasoning.feed(decoder.flush()) + reasoning.finish():
        if d.content:
            tools.feed(d.content)
    tools.finish()
    assert reasoning.result().reasoning == turn["reasoning_content"]
    parsed = tools.result()
    assert parsed.content == turn["content"] and [c.name for c in parsed.tool_calls] == ["f"]
