"""K2-Thinking serving (`openk2 serve --reasoning-parser kimi_k2`): the prompt is rendered with the
Thinking template, and the model's `<think>` block comes back as `reasoning_content` (message and
stream deltas), apart from content and tool calls; streamed and whole replies agree."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from eval_util import save_tiny_checkpoint
from serve_util import serve_process

from openk2.serve.openai_chat import PreparedChat
from openk2.serve.sampling import SamplingParams
from openk2.tokenizer import K2Tokenizer
from openk2.tokenizer.chat import encode_chat

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CALL = (
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
    '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>'
)


def plan(tools=None) -> PreparedChat:
    return PreparedChat([1], SamplingParams(), tools, "auto", True, reasoning=True)


@pytest.mark.parametrize(
    "text, reasoning, content",
    [
        ("<think>The user greets me.</think>Hello!", "The user greets me.", "Hello!"),
        ("Hello!", None, "Hello!"),
        ("<think>cut off before it clos", "cut off before it clos", ""),
    ],
)
def test_reply_splits_reasoning_from_content(text, reasoning, content):
    message, finish = plan().reply(text, "stop")
    assert message.get("reasoning_content") == reasoning and message["content"] == content
    assert finish == "stop"


def test_reasoning_then_a_tool_call():
    text = "<think>I need the weather tool.</think>" + CALL
    message, finish = plan(TOOLS).reply(text, "stop")
    assert message["reasoning_content"] == "I need the weather tool."
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    assert finish == "tool_calls"


def chunks(text: str, size: int) -> list[str]:
    """Text as the engine streams it: K2's markers are single special tokens, so they arrive whole;
    everything else (including `<think>`, plain text here) in pieces of `size` characters."""
    out = []
    for part in re.split(r"(<\|[a-z_]+\|>)", text):
        if part.startswith("<|"):
            out.append(part)
        else:
            out += [part[i : i + size] for i in range(0, len(part), size)]
    return [c for c in out if c]


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_stream_deltas_equal_the_whole_reply(size):
    text = "<think>Let me think: 2 + 2 = 4.</think>The answer is 4." + CALL
    stream = plan(TOOLS).stream()
    deltas = []
    pieces = chunks(text, size)
    for i, piece in enumerate(pieces):
        deltas += stream.feed(piece, finished=i == len(pieces) - 1)
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    whole, _ = plan(TOOLS).reply(text, "stop")
    assert reasoning == whole["reasoning_content"] and content == whole["content"]
    names = [d["tool_calls"][0]["function"].get("name") for d in deltas if d.get("tool_calls")]
    assert "get_weather" in names
    assert stream.finish_reason("stop") == "tool_calls"
    # no reasoning text ever leaks into content deltas, and markers never reach content
    assert "<think>" not in content and "<|tool_call" not in content


@pytest.mark.slow
def test_openk2_serve_reasoning_parser_renders_the_thinking_template(tmp_path):
    """The real server with --reasoning-parser kimi_k2: a conversation whose earlier assistant turn
    carries reasoning_content is rendered with the Thinking template (prompt_tokens equal the
    Thinking rendering, not the Instruct one), and replies carry no raw <think> in content."""
    ckpt = tmp_path / "ckpt"
    save_tiny_checkpoint(ckpt)
    tok = K2Tokenizer.byte_level()
    messages = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    thinking = len(encode_chat(tok, messages, add_generation_prompt=True, variant="thinking").ids)
    instruct = len(encode_chat(tok, messages, add_generation_prompt=True).ids)
    assert thinking != instruct
    with serve_process(ckpt, "--reasoning-parser", "kimi_k2") as url:
        body = {"model": "ckpt", "messages": messages, "max_tokens": 8, "temperature": 0}
        reply = httpx.post(f"{url}/chat/completions", json=body, timeout=120).json()
        assert reply["usage"]["prompt_tokens"] == thinking
        message = reply["choices"][0]["message"]
        assert "<think>" not in (message["content"] or "")
        with httpx.stream("POST", f"{url}/chat/completions", json={**body, "stream": True}, timeout=120) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        assert streamed == (message["content"] or "")
