"""K2's chat templates, as code (for training and serving) and as Jinja (for other tools).

The built-in `instruct` template renders exactly as Kimi-K2-Instruct-0905's official
`chat_template.jinja` does (tested against its text in tests/data/templates/):

    [<|im_system|>tool_declare<|im_middle|>\\n  # Tools\\n  TOOLS_JSON<|im_end|>]   if tools
    [<|im_system|>system<|im_middle|>DEFAULT_SYSTEM_PROMPT<|im_end|>]    if messages[0] exists, not system
    <|im_user|>NAME<|im_middle|>TEXT<|im_end|>                           NAME = message.name or role
    <|im_assistant|>assistant<|im_middle|>TEXT[TOOL_CALLS]<|im_end|>
    <|im_system|>NAME<|im_middle|>## Return of CALL_ID\\n    RESULT<|im_end|>   role "tool"
    [<|im_assistant|>assistant<|im_middle|>]                            add_generation_prompt

TOOL_CALLS = <|tool_calls_section_begin|>(<|tool_call_begin|>CALL_ID<|tool_call_argument_begin|>
ARGS<|tool_call_end|>)*<|tool_calls_section_end|>. TOOLS_JSON and dict ARGS are `json.dumps` with
its default separators and non-ASCII kept (the template's `tojson` under transformers). A call
without an id gets `functions.NAME:IDX`, IDX counting every tool call of the conversation (one
counter, as K2 numbers its calls); a tool message without `tool_call_id` answers the oldest call
not yet answered.

The `thinking` variant renders as Kimi-K2-Thinking's official template: the tool_declare turn
holds the bare JSON, an empty conversation still gets the default system prompt, tool results
are not indented, and every assistant turn starts with `<think>REASONING</think>`, where
REASONING is the message's `reasoning_content` for the turns after the last assistant turn
without tool calls (the reasoning the model is still acting on) and empty before it.

The template is built as a list of segments so that `encode_chat` can turn the markers it wrote
into special ids while every piece of user-provided text is encoded with specials disabled, and
can tell which tokens the assistant produced (the SFT loss mask). Where the official text
misbehaves (a tool result or tool-call content given as a list of parts prints as a Python
list, a None tool result prints "None") we render the text parts / nothing instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from openk2.tokenizer.tokenizer import K2Tokenizer

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
ROLES = ("system", "user", "assistant", "tool")
VARIANTS = ("instruct", "thinking")
TOOLS_HEADER = {"instruct": "\n  # Tools\n  ", "thinking": ""}  # text between <|im_middle|> and the JSON
RESULT_SEPARATOR = {"instruct": "\n    ", "thinking": "\n"}  # between "## Return of ID" and the result
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_K2_CALL_ID = re.compile(r"functions\.(.+):(\d+)", re.DOTALL)

# Macros shared by both Jinja templates: OpenAI content as text, and call-id bookkeeping.
_JINJA_COMMON = (
    "{%- macro text(c) -%}"
    "{%- if c is string -%}{{ c }}"
    "{%- elif c is not none -%}{%- for part in c -%}"
    "{%- if part.type == 'text' -%}{{ part.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set state = namespace(calls=0, pending=[], last=-1) -%}"
)


def _jinja_turns(variant: str) -> str:
    """The per-message loop of our Jinja template for `variant` (see the module docstring)."""
    think = variant == "thinking"
    assistant_head = (
        "{%- if m.role == 'assistant' -%}{{ '<think>' }}"
        "{%- if loop.index0 > state.last -%}{{ m.reasoning_content or '' }}{%- endif -%}"
        "{{ '</think>' }}{%- endif -%}"
        if think
        else ""
    )
    return (
        "{%- for m in messages -%}"
        "{%- if m.role == 'user' -%}{{ '<|im_user|>' }}"
        "{%- elif m.role == 'assistant' -%}{{ '<|im_assistant|>' }}"
        "{%- else -%}{{ '<|im_system|>' }}{%- endif -%}"
        "{{ m.name or m.role }}{{ '<|im_middle|>' }}" + assistant_head + "{%- if m.role == 'tool' -%}"
        "{%- if m.tool_call_id -%}{%- set cid = m.tool_call_id -%}"
        "{%- set state.pending = state.pending | reject('equalto', cid) | list -%}"
        "{%- elif state.pending -%}{%- set cid = state.pending[0] -%}"
        "{%- set state.pending = state.pending[1:] -%}"
        "{%- else -%}{{ raise_exception('a tool message has no tool_call_id and no call awaits a result') }}"
        "{%- endif -%}"
        "{{ '## Return of ' ~ cid ~ " + json.dumps(RESULT_SEPARATOR[variant]).replace('"', "'") + " }}"
        "{{ text(m.content) }}"
        "{%- else -%}{{ text(m.content) }}{%- endif -%}"
        "{%- if m.role == 'assistant' and m.tool_calls -%}"
        "{{ '<|tool_calls_section_begin|>' }}"
        "{%- for tc in m.tool_calls -%}"
        "{%- set cid = tc.id or ('functions.' ~ tc.function.name ~ ':' ~ state.calls) -%}"
        "{%- set state.calls = state.calls + 1 -%}"
        "{%- set state.pending = state.pending + [cid] -%}"
        "{{ '<|tool_call_begin|>' }}{{ cid }}{{ '<|tool_call_argument_begin|>' }}"
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


JINJA_TEMPLATE = (
    _JINJA_COMMON + "{%- if tools -%}"
    "{{ '<|im_system|>tool_declare<|im_middle|>\\n  # Tools\\n  ' }}{{ tools | tojson }}{{ '<|im_end|>' }}"
    "{%- endif -%}"
    "{%- if messages and messages[0].role != 'system' -%}"
    "{{ '<|im_system|>system<|im_middle|>" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>' }}"
    "{%- endif -%}" + _jinja_turns("instruct")
)
"""Our Jinja for the `instruct` variant: renders exactly as `render(..., variant="instruct")`."""

THINKING_JINJA_TEMPLATE = (
    _JINJA_COMMON + "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' and not m.tool_calls -%}{%- set state.last = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if tools -%}"
    "{{ '<|im_system|>tool_declare<|im_middle|>' }}{{ tools | tojson }}{{ '<|im_end|>' }}"
    "{%- endif -%}"
    "{%- if messages | length == 0 or messages[0].role != 'system' -%}"
    "{{ '<|im_system|>system<|im_middle|>" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>' }}"
    "{%- endif -%}" + _jinja_turns("thinking")
)
"""Our Jinja for the `thinking` variant: renders exactly as `render(..., variant="thinking")`."""

JINJA_TEMPLATES = {"instruct": JINJA_TEMPLATE, "thinking": THINKING_JINJA_TEMPLATE}


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
    """The call's id, or K2's `functions.NAME:IDX` when absent (`segments` passes IDX = the call's
    position among all tool calls of the conversation)."""
    return call.get("id") or f"functions.{call['function']['name']}:{index}"


def tool_call_arguments(call: dict) -> str:
    args = call["function"].get("arguments", "{}")
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _check_tool_call(call: Any, where: str) -> None:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise ValueError(f"{where}: a tool call must be {{'function': {{'name': ..., 'arguments': ...}}}}")
    if not isinstance(call["function"].get("name"), str) or not call["function"]["name"]:
        raise ValueError(f"{where}: a tool call needs a non-empty function name")


def normalize_tool_call_ids(messages: list[dict]) -> list[dict]:
    """Historical tool-call ids rewritten to K2's `functions.NAME:IDX` (K2's guidance to serving
    stacks: the model was trained on its own ids, and `search:0` or `call_abc` in the history
    degrades its later calls). Ids already of that form are kept; any other id becomes
    `functions.NAME:IDX` with IDX the call's position among all tool calls of the conversation
    (or the next free index where a kept id already holds that one, so ids stay unique), and the
    tool messages answering it get the same new id. Returns new message dicts (the
    input is not modified); messages that are not dicts pass through for `segments` to reject."""
    out: list[dict] = []
    renamed: dict[str, str] = {}
    # ids already in K2's form are kept, so a new id must not take one of them (a client that mixes
    # `functions.get:1` with `call_x` at position 1 would otherwise get two calls with one id)
    taken = {
        call.get("id")
        for m in messages
        if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list)
        for call in m["tool_calls"]
        if isinstance(call, dict) and isinstance(call.get("id"), str) and _K2_CALL_ID.fullmatch(call["id"])
    }
    count = 0
    for m in messages:
        if not isinstance(m, dict):
            out.append(m)
            continue
        m = dict(m)
        calls = m.get("tool_calls") if m.get("role") == "assistant" else None
        if isinstance(calls, list):
            new_calls = []
            for call in calls:
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    old = call.get("id")
                    name = call["function"].get("name")
                    if (
                        isinstance(name, str)
                        and name
                        and not (isinstance(old, str) and _K2_CALL_ID.fullmatch(old))
                    ):
                        index = count
                        while f"functions.{name}:{index}" in taken:
                            index += 1  # the next free index: unique beats positional
                        new = f"functions.{name}:{index}"
                        taken.add(new)
                        if isinstance(old, str) and old:
                            renamed[old] = new
                        call = {**call, "id": new}
                count += 1
                new_calls.append(call)
            m["tool_calls"] = new_calls
        elif m.get("role") == "tool" and m.get("tool_call_id") in renamed:
            m["tool_call_id"] = renamed[m["tool_call_id"]]
        out.append(m)
    return out


def _last_plain_assistant(messages: list[dict]) -> int:
    """Index of the last assistant message without tool calls (-1 if none): the thinking
    template keeps `reasoning_content` only for the turns after it."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if isinstance(m, dict) and m.get("role") == "assistant" and not m.get("tool_calls"):
            return i
    return -1


def segments(
    messages: list[dict],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = False,
    variant: str = "instruct",
) -> list[Segment]:
    """The conversation as marker / text pieces, in order (`variant`: "instruct" or "thinking")."""
    if not isinstance(messages, list):
        raise ValueError("messages must be a list of dicts")
    if variant not in VARIANTS:
        raise ValueError(f"unknown chat template variant {variant!r}; expected one of {VARIANTS}")
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
        text(TOOLS_HEADER[variant] + json.dumps(tools, ensure_ascii=False))
        mark("<|im_end|>")
    first_is_system = bool(messages) and isinstance(messages[0], dict) and messages[0].get("role") == "system"
    if not first_is_system and (messages or variant == "thinking"):
        mark("<|im_system|>")
        text("system")
        mark("<|im_middle|>")
        text(DEFAULT_SYSTEM_PROMPT)
        mark("<|im_end|>")
    last_plain = _last_plain_assistant(messages) if variant == "thinking" else -1
    n_calls = 0
    pending: list[str] = []  # ids of calls not yet answered by a tool message, oldest first
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
        if is_asst and variant == "thinking":
            reasoning = m.get("reasoning_content") if i > last_plain else None
            if reasoning is not None and not isinstance(reasoning, str):
                raise ValueError(f"{where}: reasoning_content must be a string")
            body = THINK_OPEN + (reasoning or "") + THINK_CLOSE + body
        if role == "tool":
            call_id = m.get("tool_call_id")
            if call_id:
                if not isinstance(call_id, str):
                    raise ValueError(f"{where}: tool_call_id must be a string")
                pending = [p for p in pending if p != call_id]
            elif pending:
                call_id = pending.pop(0)
            else:
                raise ValueError(f"{where}: a tool message needs tool_call_id (no call awaits a result)")
            body = f"## Return of {call_id}{RESULT_SEPARATOR[variant]}{body}"
        text(body, is_asst)
        calls = m.get("tool_calls") if is_asst else None
        if calls:
            if not isinstance(calls, list):
                raise ValueError(f"{where}: tool_calls must be a list")
            mark("<|tool_calls_section_begin|>", True)
            for j, call in enumerate(calls):
                _check_tool_call(call, f"{where}.tool_calls[{j}]")
                call_id = tool_call_id(call, n_calls)
                n_calls += 1
                pending.append(call_id)
                mark("<|tool_call_begin|>", True)
                text(call_id, True)
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


def render(
    messages: list[dict],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = False,
    variant: str = "instruct",
) -> str:
    """The prompt as text (markers as their strings); identical to JINJA_TEMPLATES[variant]'s output."""
    return "".join(s.text for s in segments(messages, tools, add_generation_prompt, variant))


def encode_chat(
    tokenizer: K2Tokenizer,
    messages: list[dict],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = False,
    variant: str = "instruct",
) -> ChatEncoding:
    """Token ids plus the assistant mask (its content, tool-call section and closing <|im_end|>)."""
    return _encode_segments(tokenizer, segments(messages, tools, add_generation_prompt, variant))


def encode_continuation(
    tokenizer: K2Tokenizer,
    history: list[dict],
    appended: list[dict],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = True,
    variant: str = "instruct",
) -> ChatEncoding:
    """The tokens that `appended` messages add after the conversation `history` (then the generation
    prompt): `encode_chat(history) + encode_continuation(history, appended)` equals
    `encode_chat(history + appended)`. A multi-turn rollout extends its context with this after an
    assistant turn (tool results, user turns), so the wire format stays in this module. Raises
    ValueError when appending would change how `history` renders (the thinking variant drops earlier
    reasoning once a later plain assistant turn exists), since then no continuation exists."""
    before = segments(history, tools, False, variant)
    after = segments(list(history) + list(appended), tools, add_generation_prompt, variant)
    if after[: len(before)] != before:
        raise ValueError("appending these messages changes how the earlier turns render; re-encode instead")
    return _encode_segments(tokenizer, after[len(before) :])


def _encode_segments(tokenizer: K2Tokenizer, segs: list[Segment]) -> ChatEncoding:
    """Segments -> ids and assistant mask: markers as their special ids, adjacent text pieces encoded
    together with specials disabled."""
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

    for seg in segs:
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


# ---------------------------------------------------------------------------------------------- Jinja
def _tojson(x: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    """`tojson` as transformers defines it for chat templates (plain json.dumps, no HTML escaping)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def render_jinja(
    template: str,
    messages: list[dict],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = False,
    **kwargs: Any,
) -> str:
    """Render a chat template (a checkpoint's own Jinja) in the environment transformers and vLLM
    use: sandboxed, trim_blocks + lstrip_blocks, loop controls, their `tojson`, `raise_exception`
    and `strftime_now`. Extra keyword arguments become template variables."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    context = {"bos_token": "[BOS]", "eos_token": "[EOS]", **kwargs}
    return env.from_string(template).render(
        messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **context
    )
