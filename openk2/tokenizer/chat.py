"""K2's chat template, as code (for training and serving) and as Jinja (for other tools).

    [<|im_system|>tool_declare<|im_middle|>TOOLS_JSON<|im_end|>]          if tools
    [<|im_system|>system<|im_middle|>DEFAULT_SYSTEM_PROMPT<|im_end|>]     if messages[0] is not system
    <|im_user|>NAME<|im_middle|>TEXT<|im_end|>                            NAME = message.name or role
    <|im_assistant|>assistant<|im_middle|>TEXT[TOOL_CALLS]<|im_end|>
    <|im_system|>NAME<|im_middle|>## Return of CALL_ID\nRESULT<|im_end|>  role "tool"
    [<|im_assistant|>assistant<|im_middle|>]                             add_generation_prompt

TOOL_CALLS = <|tool_calls_section_begin|>(<|tool_call_begin|>functions.NAME:IDX
<|tool_call_argument_begin|>ARGS_JSON<|tool_call_end|>)*<|tool_calls_section_end|>.
TOOLS_JSON is compact (separators "," ":") with keys sorted at every level, as K2's own
tokenizer deep-sorts tools before rendering. The template is built as a list of segments so
that `encode_chat` can turn the markers it wrote into special ids while every piece of
user-provided text is encoded with specials disabled, and can tell which tokens the assistant
produced (the SFT loss mask).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from openk2.tokenizer.tokenizer import K2Tokenizer

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
ROLES = ("system", "user", "assistant", "tool")

JINJA_TEMPLATE = (
    "{%- macro text(c) -%}"
    "{%- if c is string -%}{{ c }}"
    "{%- elif c is not none -%}{%- for part in c -%}"
    "{%- if part.type == 'text' -%}{{ part.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools -%}"
    "{{ '<|im_system|>tool_declare<|im_middle|>' }}"
    "{{ tools | tojson(separators=(',', ':'), sort_keys=true) }}{{ '<|im_end|>' }}"
    "{%- endif -%}"
    "{%- if messages | length == 0 or messages[0].role != 'system' -%}"
    "{{ '<|im_system|>system<|im_middle|>" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>' }}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{{ '<|im_user|>' }}"
    "{%- elif m.role == 'assistant' -%}{{ '<|im_assistant|>' }}"
    "{%- else -%}{{ '<|im_system|>' }}{%- endif -%}"
    "{{ m.name or m.role }}{{ '<|im_middle|>' }}"
    "{%- if m.role == 'tool' -%}"
    "{{ '## Return of ' ~ m.tool_call_id ~ '\\n' }}{{ text(m.content) }}"
    "{%- else -%}{{ text(m.content) }}{%- endif -%}"
    "{%- if m.role == 'assistant' and m.tool_calls -%}"
    "{{ '<|tool_calls_section_begin|>' }}"
    "{%- for tc in m.tool_calls -%}"
    "{{ '<|tool_call_begin|>' }}{{ tc.id or ('functions.' ~ tc.function.name ~ ':' ~ loop.index0) }}"
    "{{ '<|tool_call_argument_begin|>' }}"
    "{%- if tc.function.arguments is string -%}{{ tc.function.arguments }}"
    "{%- else -%}{{ tc.function.arguments | tojson }}{%- endif -%}"
    "{{ '<|tool_call_end|>' }}"
    "{%- endfor -%}"
    "{{ '<|tool_calls_section_end|>' }}"
    "{%- endif -%}"
    "{{ '<|im_end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_assistant|>assistant<|im_middle|>' }}{%- endif -%}"
)


@dataclass
class Segment:
    text: str
    special: bool  # a template marker: exactly one special id
    assistant: bool  # produced by the assistant (what SFT trains on)


@dataclass
class ChatEncoding:
    ids: list[int]
    assistant_mask: list[bool]


def content_text(content: Any, where: str) -> str:
    """OpenAI content (str | None | list of {"type": "text", "text": ...}) -> str."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            is_text = isinstance(part, dict) and part.get("type") == "text"
            if not (is_text and isinstance(part.get("text"), str)):
                raise ValueError(f"{where}: only text content parts are supported, got {part!r:.80}")
            parts.append(part["text"])
        return "".join(parts)
    kind = type(content).__name__
    raise ValueError(f"{where}: content must be a string, null or a list of text parts, got {kind}")


def tool_call_id(call: dict, index: int) -> str:
    """The call's id, or K2's `functions.NAME:IDX` (IDX = position in the message) when absent."""
    return call.get("id") or f"functions.{call['function']['name']}:{index}"


def tool_call_arguments(call: dict) -> str:
    args = call["function"].get("arguments", "{}")
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _check_tool_call(call: Any, where: str) -> None:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise ValueError(f"{where}: a tool call must be {{'function': {{'name': ..., 'arguments': ...}}}}")
    if not isinstance(call["function"].get("name"), str) or not call["function"]["name"]:
        raise ValueError(f"{where}: a tool call needs a non-empty function name")


def segments(
    messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False
) -> list[Segment]:
    """The conversation as marker / text pieces, in order."""
    if not isinstance(messages, list):
        raise ValueError("messages must be a list of dicts")
    out: list[Segment] = []

    def mark(s: str, assistant: bool = False) -> None:
        out.append(Segment(s, True, assistant))

    def text(s: str, assistant: bool = False) -> None:
        if s:
            out.append(Segment(s, False, assistant))

    if tools:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise ValueError("tools must be a list of OpenAI tool dicts")
        mark("<|im_system|>")
        text("tool_declare")
        mark("<|im_middle|>")
        text(json.dumps(tools, separators=(",", ":"), sort_keys=True, ensure_ascii=False))
        mark("<|im_end|>")
    if not messages or not isinstance(messages[0], dict) or messages[0].get("role") != "system":
        mark("<|im_system|>")
        text("system")
        mark("<|im_middle|>")
        text(DEFAULT_SYSTEM_PROMPT)
        mark("<|im_end|>")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"{where}: expected a dict with role in {ROLES}, got {m!r:.80}")
        role = m["role"]
        is_asst = role == "assistant"
        mark({"user": "<|im_user|>", "assistant": "<|im_assistant|>"}.get(role, "<|im_system|>"))
        text(m.get("name") or role)
        mark("<|im_middle|>")
        body = content_text(m.get("content"), where)
        if role == "tool":
            if not m.get("tool_call_id"):
                raise ValueError(f"{where}: a tool message needs tool_call_id")
            body = f"## Return of {m['tool_call_id']}\n{body}"
        text(body, is_asst)
        calls = m.get("tool_calls") if is_asst else None
        if calls:
            mark("<|tool_calls_section_begin|>", True)
            for j, call in enumerate(calls):
                _check_tool_call(call, f"{where}.tool_calls[{j}]")
                mark("<|tool_call_begin|>", True)
                text(tool_call_id(call, j), True)
                mark("<|tool_call_argument_begin|>", True)
                text(tool_call_arguments(call), True)
                mark("<|tool_call_end|>", True)
            mark("<|tool_calls_section_end|>", True)
        mark("<|im_end|>", is_asst)
    if add_generation_prompt:
        mark("<|im_assistant|>")
        text("assistant")
        mark("<|im_middle|>")
    return out


def render(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False) -> str:
    """The prompt as text (markers as their strings); identical to JINJA_TEMPLATE's output."""
    return "".join(s.text for s in segments(messages, tools, add_generation_prompt))


def encode_chat(
    tokenizer: K2Tokenizer,
    messages: list[dict],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = False,
) -> ChatEncoding:
    """Token ids plus the assistant mask (its content, tool-call section and closing <|im_end|>)."""
    ids: list[int] = []
    mask: list[bool] = []
    pending: list[str] = []  # adjacent text pieces are encoded together, as in the rendered string
    pending_asst = False

    def flush() -> None:
        if pending:
            piece = tokenizer.encode("".join(pending), allow_special=False)
            ids.extend(piece)
            mask.extend([pending_asst] * len(piece))
            pending.clear()

    for seg in segments(messages, tools, add_generation_prompt):
        if seg.special:
            flush()
            ids.append(tokenizer.special_ids[seg.text])
            mask.append(seg.assistant)
        else:
            if pending and seg.assistant != pending_asst:
                flush()
            pending.append(seg.text)
            pending_asst = seg.assistant
    flush()
    return ChatEncoding(ids, mask)
