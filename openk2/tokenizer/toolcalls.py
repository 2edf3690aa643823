"""Parse K2 assistant output into content and OpenAI tool calls, whole or streamed.

    CONTENT <|tool_calls_section_begin|>
      <|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>ARGS<|tool_call_end|> ...
    <|tool_calls_section_end|> <|im_end|>

One small state machine reads a sequence of events (a marker, or a run of text) and both
parsers drive it: `parse_tool_calls` splits the whole text at markers, the streaming parser
splits each chunk the same way but holds back a tail that could be the start of a marker, so
a marker cut across chunks is still seen whole. Every state accepts text in any number of
pieces, which is what makes streamed and whole parses agree.

Choices (the failures public servers shipped, and what we do):
  * calls are delimited by markers, never by a greedy regex: N calls stay N calls;
  * markers never reach content: stray ones are dropped and reported in `errors`;
  * the name is the id minus the literal `functions.` prefix and the `:IDX` suffix, so dots
    and dashes in names survive (`functions.ns.get-item:0` -> `ns.get-item`);
  * arguments are the text between <|tool_call_argument_begin|> and <|tool_call_end|> with
    surrounding whitespace stripped (as K2's guidance, vLLM and SGLang do), streamed too;
  * a call cut off inside its arguments (by EOS, <|im_end|>, the next <|tool_call_begin|> or the
    section end) is kept with complete=False and reported; a call cut off before its
    <|tool_call_argument_begin|> has no arguments to run and is dropped (reported), so output
    ending right after <|tool_call_begin|> never yields an empty call;
  * an id we cannot read a name from (no `:IDX` suffix, e.g. `weird@id`) drops the call; a bare
    counter id (`0`) is named after the only offered tool when exactly one is offered, else
    dropped (docs/conformance.md says why we do not guess from the argument keys);
  * invalid JSON is kept raw with valid_json=False; a call to a tool that was not offered gets
    offered=False; all are reported, none raise (not even on arguments nested 100k deep);
  * <|im_end|>, [EOS] or the start of another turn end the message; later text is ignored;
  * non-blank text after <|tool_calls_section_end|> is appended to content (reported), streamed
    as soon as it arrives; whitespace there is held until non-blank text follows it.
Known limits: the parser sees text, so an argument string containing an exact marker string
cannot be told apart from the marker (the token ids could; text-level servers share this).
In content, a lone trailing `<` is released at once rather than held as a possible marker
start, so a marker split right after its `<` reads as text; decoded ids never split a marker,
which is one token.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARG_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
STOP_MARKERS = ("<|im_end|>", "[EOS]", "<|im_user|>", "<|im_assistant|>", "<|im_system|>")
STRAY_MARKERS = ("<|im_middle|>", "[BOS]")
MARKERS = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARG_BEGIN, CALL_END, *STOP_MARKERS, *STRAY_MARKERS)
MARKER_RE = re.compile("|".join(re.escape(m) for m in sorted(MARKERS, key=len, reverse=True)))
_ID_RE = re.compile(r"functions\.(.+):(\d+)", re.DOTALL)
_SHORT_ID_RE = re.compile(r"(.+):(\d+)", re.DOTALL)
_BARE_COUNTER_RE = re.compile(r"\d+")

CONTENT, SECTION, CALL_ID, ARGS, AFTER, DONE = range(6)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # text between <|tool_call_argument_begin|> and <|tool_call_end|>, stripped
    index: int  # position among this message's calls (OpenAI's `index`)
    valid_json: bool  # arguments parse as a JSON object
    offered: bool | None  # name among the offered tools; None when no tools were given
    complete: bool  # <|tool_call_end|> was seen


@dataclass
class ParsedMessage:
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "stop"


@dataclass
class Delta:
    """One streamed piece: content text, or a tool call's header (id + name) or argument text."""

    content: str | None = None
    index: int | None = None
    id: str | None = None
    name: str | None = None
    arguments: str | None = None

    def to_openai(self) -> dict:
        """The `choices[0].delta` object of an OpenAI chat.completion.chunk."""
        if self.index is None:
            return {"content": self.content or ""}
        if self.id is not None:
            call = {"index": self.index, "id": self.id, "type": "function"}
            call["function"] = {"name": self.name, "arguments": self.arguments or ""}
            return {"tool_calls": [call]}
        return {"tool_calls": [{"index": self.index, "function": {"arguments": self.arguments or ""}}]}


def resolve_name(call_id: str, offered: set[str] | None) -> tuple[str | None, str | None]:
    """The tool name a call id stands for, or (None, why) when the call must be dropped.

    `functions.NAME:IDX` and `NAME:IDX` give NAME (dots and dashes kept); a bare counter (`3`)
    gives the only offered tool when exactly one is offered; anything else (`weird@id`,
    `functions.x.0`, an empty name) gives None. The second value is a note for `errors` (None
    when the id is K2's own form).
    """
    m = _ID_RE.fullmatch(call_id)
    if m:
        return m.group(1), None
    m = _SHORT_ID_RE.fullmatch(call_id)
    if m and m.group(1).removeprefix("functions.").strip():
        return m.group(1).removeprefix("functions."), f"id {call_id!r} is not of the form functions.NAME:IDX"
    if _BARE_COUNTER_RE.fullmatch(call_id) and offered is not None and len(offered) == 1:
        (only,) = offered
        return only, f"bare counter id {call_id!r} named after the only offered tool {only!r}"
    if not call_id:
        return None, "empty id"
    return None, f"no tool name can be read from id {call_id!r}"


def offered_names(tools: list | None) -> set[str] | None:
    """Tool names from OpenAI tool dicts (or plain name strings)."""
    if tools is None:
        return None
    names = set()
    for t in tools:
        if isinstance(t, str):
            names.add(t)
        elif isinstance(t, dict) and isinstance(t.get("function"), dict) and "name" in t["function"]:
            names.add(t["function"]["name"])
        elif isinstance(t, dict) and "name" in t:
            names.add(t["name"])
        else:
            raise ValueError(f"cannot read a tool name from {t!r:.80}")
    return names


def _is_json_object(text: str) -> bool:
    """Whether `text` is a JSON object. Arguments nested deeper than Python's recursion limit
    count as not checkable (False) instead of raising RecursionError."""
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


class _Machine:
    """The parser proper: consumes text and marker events, queues deltas, records the result."""

    def __init__(self, offered: set[str] | None):
        self.offered = offered
        self.state = CONTENT
        self.content: list[str] = []
        self.calls: list[ToolCall] = []
        self.errors: list[str] = []
        self.deltas: list[Delta] = []
        self._junk: list[str] = []
        self._trailing: list[str] = []  # whitespace after a section end, held until text follows
        self._after_text = False  # non-blank text has followed the latest section end
        self._sections = 0
        self._reset_call()

    def _reset_call(self) -> None:
        self._id: list[str] = []
        self._args: list[str] = []
        self._args_started = False  # a non-blank argument character has been seen
        self._args_ws = ""  # trailing whitespace of the arguments so far, not yet streamed
        self._header_sent = False
        self._name: str | None = None
        self._id_note: str | None = None

    # ---- events ---------------------------------------------------------------------------
    def text(self, s: str) -> None:
        if not s:
            return
        if self.state == CONTENT:
            self._emit_content(s)
        elif self.state == SECTION:
            self._junk.append(s)
        elif self.state == CALL_ID:
            self._id.append(s)
        elif self.state == ARGS:
            self._args.append(s)
            self._stream_args(s)
        elif self.state == AFTER:
            if self._after_text:
                self._emit_content(s)
            elif s.strip():
                self._after_text = True
                self.errors.append(f"text after {SECTION_END} appended to content")
                held = "".join(self._trailing)
                self._trailing.clear()
                self._emit_content(held + s)
            else:
                self._trailing.append(s)

    def marker(self, m: str) -> None:
        st = self.state
        if st == DONE:
            return
        if m in STOP_MARKERS:
            self._close_all(f"cut by {m}")
            self.state = DONE
        elif m == SECTION_BEGIN:
            if st in (CONTENT, AFTER):
                self._open_section()
                self.state = SECTION
            else:
                self.errors.append(f"nested {SECTION_BEGIN} ignored")
        elif m == CALL_BEGIN:
            if st in (CONTENT, AFTER):
                self.errors.append(f"{CALL_BEGIN} outside a tool-calls section; treated as one")
                self._open_section()
            elif st == SECTION:
                self._check_junk()
            else:
                self._end_call(complete=False, why=f"cut by the next {CALL_BEGIN}")
            self.state = CALL_ID
        elif m == ARG_BEGIN:
            if st == CALL_ID:
                self._send_header()
                self.state = ARGS
            else:
                self.errors.append(f"stray {ARG_BEGIN} dropped")
        elif m == CALL_END:
            if st in (CALL_ID, ARGS):
                if st == CALL_ID:
                    self.errors.append(f"tool call {len(self.calls)} has no {ARG_BEGIN}")
                self._end_call(complete=True)
                self.state = SECTION
            else:
                self.errors.append(f"stray {CALL_END} dropped")
        elif m == SECTION_END:
            if st in (SECTION, CALL_ID, ARGS):
                if st == SECTION:
                    self._check_junk()
                else:
                    self._end_call(complete=False, why=f"cut by {SECTION_END}")
                self.state = AFTER
                self._after_text = False
            else:
                self.errors.append(f"stray {SECTION_END} dropped")
        else:  # [BOS], <|im_middle|>
            self.errors.append(f"stray {m} dropped")

    def end(self) -> None:
        if self.state != DONE:
            self._close_all("cut by the end of the text")
            self.state = DONE

    # ---- helpers --------------------------------------------------------------------------
    def _emit_content(self, s: str) -> None:
        self.content.append(s)
        self.deltas.append(Delta(content=s))

    def _stream_args(self, s: str) -> None:
        """Stream argument text with its surrounding whitespace stripped: leading whitespace is
        dropped, trailing whitespace is held until non-blank text shows it was inner."""
        if not self._args_started:
            s = s.lstrip()
            if not s:
                return
            self._args_started = True
        pending = self._args_ws + s
        core = pending.rstrip()
        self._args_ws = pending[len(core) :]
        if core and self._name is not None:
            self.deltas.append(Delta(index=len(self.calls), arguments=core))

    def _open_section(self) -> None:
        self._trailing.clear()  # whitespace after the previous section: dropped
        self._sections += 1
        if self._sections > 1:
            self.errors.append("a second tool-calls section in one message")

    def _check_junk(self) -> None:
        text = "".join(self._junk)
        self._junk.clear()
        if text.strip():
            self.errors.append(f"text between tool calls dropped: {text[:80]!r}")

    def _close_all(self, why: str) -> None:
        if self.state in (SECTION, CALL_ID, ARGS):
            if self.state == SECTION:
                self._check_junk()
            else:
                self._end_call(complete=False, why=why)
            self.errors.append(f"tool-calls section not closed ({why})")
        elif self.state == AFTER:
            self._trailing.clear()

    def _send_header(self) -> None:
        """Resolve the call's name from its id; stream id + name unless the call is dropped."""
        call_id = "".join(self._id).strip()
        self._name, self._id_note = resolve_name(call_id, self.offered)
        if self._name is not None:
            self.deltas.append(Delta(index=len(self.calls), id=call_id, name=self._name))
        self._header_sent = True

    def _end_call(self, complete: bool, why: str = "") -> None:
        i = len(self.calls)
        if self.state == CALL_ID and not complete:
            self.errors.append(f"tool call {i} cut before its arguments ({why}); dropped")
            self._reset_call()
            return
        if not self._header_sent:
            self._send_header()
        call_id = "".join(self._id).strip()
        if self._name is None:
            self.errors.append(f"tool call dropped: {self._id_note}")
            self._reset_call()
            return
        name = self._name
        args = "".join(self._args).strip()
        offered = None if self.offered is None else name in self.offered
        call = ToolCall(call_id, name, args, i, _is_json_object(args), offered, complete)
        if self._id_note:
            self.errors.append(f"tool call {i}: {self._id_note}")
        if not complete:
            self.errors.append(f"tool call {i} ({name}) incomplete: {why}")
        if not call.valid_json:
            self.errors.append(f"tool call {i} ({name}): arguments are not a JSON object: {args[:200]!r}")
        if offered is False:
            self.errors.append(f"tool call {i}: {name!r} is not among the offered tools")
        self.calls.append(call)
        self._reset_call()

    def take_deltas(self) -> list[Delta]:
        out, self.deltas = self.deltas, []
        return out

    def result(self) -> ParsedMessage:
        return ParsedMessage("".join(self.content), list(self.calls), list(self.errors))


def _events(machine: _Machine, text: str) -> None:
    pos = 0
    for m in MARKER_RE.finditer(text):
        machine.text(text[pos : m.start()])
        machine.marker(m.group())
        pos = m.end()
    machine.text(text[pos:])


def parse_tool_calls(text: str, tools: list | None = None) -> ParsedMessage:
    """A finished assistant output -> content, tool calls and any problems found."""
    machine = _Machine(offered_names(tools))
    _events(machine, text)
    machine.end()
    return machine.result()


def _partial_marker_len(tail: str) -> int:
    """Length of the longest suffix of `tail` that is a proper prefix of some marker."""
    for k in range(min(len(tail), _MAX_MARKER - 1), 0, -1):
        suffix = tail[-k:]
        if any(m.startswith(suffix) for m in MARKERS):
            return k
    return 0


_MAX_MARKER = max(map(len, MARKERS))


class StreamingToolCallParser:
    """Feed decoded text as it arrives; get OpenAI-style deltas back.

    Content deltas stream as soon as they cannot be the start of a marker; for each call the
    first delta carries index, id and name (sent when <|tool_call_argument_begin|> arrives),
    later ones carry argument fragments. `finish()` flushes and closes what EOS cut off;
    `result()` then equals `parse_tool_calls` on the concatenated text.
    """

    def __init__(self, tools: list | None = None):
        self._machine = _Machine(offered_names(tools))
        self._held = ""
        self._finished = False

    def feed(self, chunk: str) -> list[Delta]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        buf = self._held + chunk
        last = 0
        for m in MARKER_RE.finditer(buf):
            last = m.end()
        hold = _partial_marker_len(buf[last:])
        self._held = buf[len(buf) - hold :]
        _events(self._machine, buf[: len(buf) - hold])
        if self._held == "<" and self._machine.state in (CONTENT, AFTER):
            # A lone `<` in text is released now: readers see "a < b <" without delay.
            self._held = ""
            self._machine.text("<")
        return self._machine.take_deltas()

    def finish(self) -> list[Delta]:
        if not self._finished:
            _events(self._machine, self._held)
            self._held = ""
            self._machine.end()
            self._finished = True
        return self._machine.take_deltas()

    @property
    def errors(self) -> list[str]:
        return list(self._machine.errors)

    def result(self) -> ParsedMessage:
        return self._machine.result()


def assistant_message(parsed: ParsedMessage, include_invalid: bool = True) -> dict:
    """The OpenAI assistant message (content None when empty, tool_calls when any)."""
    msg: dict = {"role": "assistant", "content": parsed.content or None}
    ok = [c for c in parsed.tool_calls if c.complete and c.valid_json and c.offered is not False]
    calls = parsed.tool_calls if include_invalid else ok
    if calls:
        fn = [{"name": c.name, "arguments": c.arguments} for c in calls]
        msg["tool_calls"] = [{"id": c.id, "type": "function", "function": f} for c, f in zip(calls, fn)]
    return msg
