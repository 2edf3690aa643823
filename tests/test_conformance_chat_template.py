"""Our built-in chat templates against the official Kimi K2 template texts.

tests/data/templates/ holds Kimi-K2-Instruct-0905's and Kimi-K2-Thinking's own Jinja (see
SOURCES.md there). Each conversation is rendered by the official text (with transformers'
renderer, as transformers and vLLM do, and with plain jinja2 through `render_jinja`), by our
Python `render` and by our own Jinja; all four must give the same string.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from openk2.tokenizer import K2Tokenizer, encode_chat, normalize_tool_call_ids, render, render_jinja
from openk2.tokenizer.chat import JINJA_TEMPLATES

TEMPLATES = Path(__file__).parent / "data" / "templates"
OFFICIAL = {
    "instruct": (TEMPLATES / "kimi-k2-instruct-0905.jinja").read_text(),
    "thinking": (TEMPLATES / "kimi-k2-thinking.jinja").read_text(),
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo / 天气 for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SEARCH = {"type": "function", "function": {"name": "web.search-v2", "parameters": {"type": "object"}}}


def call(i: int, name: str, args) -> dict:
    return {"id": f"functions.{name}:{i}", "type": "function", "function": {"name": name, "arguments": args}}


SEVERAL_TOOL_TURNS = [
    {"role": "user", "content": "北京和東京の天気は? 🌦️"},
    {
        "role": "assistant",
        "content": "Checking both.",
        "reasoning_content": "Two cities, two calls.",
        "tool_calls": [call(0, "get_weather", '{"city": "北京"}'), call(1, "get_weather", {"city": "東京"})],
    },
    {
        "role": "tool",
        "tool_call_id": "functions.get_weather:0",
        "name": "get_weather",
        "content": "晴れ, 25°C",
    },
    {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": '{"sky": "rain", "t": 18}'},
    {"role": "assistant", "content": "北京: sunny. 東京: rain.", "reasoning_content": "Answer directly."},
    {"role": "user", "content": "Search for umbrellas", "name": "bob"},
    {
        "role": "assistant",
        "content": None,
        "reasoning_content": "Use search.",
        "tool_calls": [call(2, "web.search-v2", {"q": "umbrella «best»", "n": [1, None]})],
    },
    {"role": "tool", "tool_call_id": "functions.web.search-v2:2", "content": "3 results"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "One more.",
        "tool_calls": [call(3, "get_weather", "{}")],
    },
    {"role": "tool", "tool_call_id": "functions.get_weather:3", "content": "ok"},
]
CONVERSATIONS = {
    "empty": [],
    "user_only": [{"role": "user", "content": "hi"}],
    "own_system": [{"role": "system", "content": "Be brief. Réponds en français."}, *SEVERAL_TOOL_TURNS[:5]],
    "one_tool_turn": SEVERAL_TOOL_TURNS[:5],
    "several_tool_turns": SEVERAL_TOOL_TURNS,
    "text_parts": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "ü"}]}
    ],
}


def official(variant: str, messages, tools, gen) -> str:
    out, _ = render_jinja_template(
        conversations=[messages], chat_template=OFFICIAL[variant], tools=tools, add_generation_prompt=gen
    )
    return out[0]


@pytest.mark.parametrize("variant", sorted(OFFICIAL))
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_default_renders_exactly_as_the_official_template(variant, name):
    messages = CONVERSATIONS[name]
    for tools in (None, [WEATHER, SEARCH]):
        for gen in (False, True):
            want = official(variant, messages, tools, gen)
            assert render(messages, tools, gen, variant=variant) == want
            assert render_jinja(OFFICIAL[variant], messages, tools, gen) == want
            assert render_jinja(JINJA_TEMPLATES[variant], messages, tools, gen) == want


def test_reasoning_kept_only_after_the_last_plain_assistant_turn():
    text = render(SEVERAL_TOOL_TURNS, variant="thinking")
    assert "<think></think>Checking both." in text  # before the last plain assistant turn: dropped
    assert "<think>Use search.</think>" in text and "<think>One more.</think>" in text
    assert "Two cities" not in text and "Answer directly." not in text
    assert "<think>" not in render(SEVERAL_TOOL_TURNS)  # the instruct template has no reasoning


def test_ids_missing_use_one_counter_across_the_conversation():
    """Calls without ids render as functions.NAME:IDX, IDX counting all calls so far, which is
    what the official template shows once the ids are normalised the same way."""
    messages = copy.deepcopy(SEVERAL_TOOL_TURNS)
    for m in messages:
        for c in m.get("tool_calls", []):
            del c["id"]
    assert render(messages, [WEATHER]) == render(SEVERAL_TOOL_TURNS, [WEATHER])
    assert render(messages, [WEATHER]) == official(
        "instruct", normalize_tool_call_ids(messages), [WEATHER], False
    )
    text = render(messages)
    assert text.count("functions.get_weather:3") == 2  # the call and its result


def test_tool_result_without_id_answers_the_oldest_open_call():
    messages = copy.deepcopy(SEVERAL_TOOL_TURNS[:4])
    for m in messages[2:4]:
        del m["tool_call_id"]
    assert render(messages) == render(SEVERAL_TOOL_TURNS[:4])
    with pytest.raises(ValueError, match="tool_call_id"):
        render([{"role": "tool", "content": "x"}])


def test_normalize_tool_call_ids():
    history = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "search:0", "type": "function", "function": {"name": "search", "arguments": "{}"}},
                {"id": "call_abc", "type": "function", "function": {"name": "fetch", "arguments": "{}"}},
                {
                    "id": "functions.search:7",
                    "type": "function",
                    "function": {"name": "search", "arguments": "{}"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "search:0", "content": "r0"},
        {"role": "tool", "tool_call_id": "call_abc", "content": "r1"},
        {"role": "tool", "tool_call_id": "functions.search:7", "content": "r2"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "s"}}]},
    ]
    before = copy.deepcopy(history)
    out = normalize_tool_call_ids(history)
    assert history == before  # the caller's messages are not modified
    assert [c["id"] for c in out[1]["tool_calls"]] == [
        "functions.search:0",
        "functions.fetch:1",
        "functions.search:7",
    ]
    assert [m["tool_call_id"] for m in out[2:5]] == [
        "functions.search:0",
        "functions.fetch:1",
        "functions.search:7",
    ]
    assert out[5]["tool_calls"][0]["id"] == "functions.s:3"
    assert normalize_tool_call_ids(out) == out  # idempotent
    assert "## Return of functions.fetch:1" in render(out)


def test_normalize_tool_call_ids_never_makes_two_calls_share_an_id():
    """A kept K2 id at a later position that equals the positional id of an earlier foreign id."""

    def call(i, name):
        return {"id": i, "type": "function", "function": {"name": name, "arguments": "{}"}}

    history = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [call("call_x", "get"), call("functions.get:0", "get")],
        },
        {"role": "tool", "tool_call_id": "call_x", "content": "first"},
        {"role": "tool", "tool_call_id": "functions.get:0", "content": "second"},
    ]
    out = normalize_tool_call_ids(history)
    ids = [c["id"] for c in out[1]["tool_calls"]]
    assert len(set(ids)) == 2 and ids[1] == "functions.get:0" and ids[0].startswith("functions.get:")
    assert [m["tool_call_id"] for m in out[2:]] == ids  # each answer still points at its own call
    assert normalize_tool_call_ids(out) == out


def test_encode_chat_thinking_masks_reasoning_as_assistant_output():
    tok = K2Tokenizer.default()
    turn = {
        "role": "assistant",
        "content": "",
        "reasoning_content": "look up",
        "tool_calls": [call(0, "f", "{}")],
    }
    messages = [{"role": "user", "content": "2+2?"}, turn]
    enc = encode_chat(tok, messages, variant="thinking")
    assert enc.ids == tok.encode(render(messages, variant="thinking"), allow_special=True)
    produced = tok.decode([i for i, m in zip(enc.ids, enc.assistant_mask) if m])
    assert produced.startswith("<think>look up</think><|tool_calls_section_begin|>")
    # a final plain answer is "history" to the official template: its reasoning is not rendered
    plain = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "add"},
    ]
    assert render(plain, variant="thinking").endswith("<think></think>4<|im_end|>")


def test_apply_chat_template_built_in(tmp_path):
    tok = K2Tokenizer.default()
    messages, tools = SEVERAL_TOOL_TURNS, [WEATHER, SEARCH]
    text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    assert text == official("instruct", messages, tools, True)
    ids = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    assert ids == encode_chat(tok, messages, tools, True).ids
    out = tok.apply_chat_template(messages, tools, True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == ids and len(out["attention_mask"]) == len(out["assistant_masks"]) == len(ids)
    assert tok.apply_chat_template([], tokenize=False) == ""


def test_apply_chat_template_uses_the_directorys_own_template(tmp_path):
    K2Tokenizer.default().save_pretrained(tmp_path)
    config = tmp_path / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data["chat_template"] = "{% for m in messages %}[{{ m.role }}|{{ m.content }}]{% endfor %}{{ extra }}"
    config.write_text(json.dumps(data))
    tok = K2Tokenizer.from_pretrained(tmp_path)
    assert (
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, extra="!")
        == "[user|hi]!"
    )
    (tmp_path / "chat_template.jinja").write_text(OFFICIAL["thinking"])  # the .jinja file wins
    tok = K2Tokenizer.from_pretrained(tmp_path)
    messages = SEVERAL_TOOL_TURNS[:4]
    text = tok.apply_chat_template(messages, tools=[WEATHER], add_generation_prompt=True, tokenize=False)
    assert (
        text
        == official("thinking", messages, [WEATHER], True)
        == render(messages, [WEATHER], True, variant="thinking")
    )
    assert tok.apply_chat_template(messages, tools=[WEATHER]) == tok.encode(
        official("thinking", messages, [WEATHER], False), allow_special=True
    )
    with pytest.raises(ValueError, match="built-in"):
        tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
