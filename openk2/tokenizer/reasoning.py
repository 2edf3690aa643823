"""Split K2-Thinking output into reasoning and content, whole or streamed.

K2-Thinking writes `<think>REASONING</think>CONTENT`, where CONTENT may end in a tool-call
section; the chat template (`openk2.tokenizer.chat`, variant "thinking") renders the same shape
back from a message's `reasoning_content` and `content`. Rules, shared by `split_reasoning` and
`StreamingReasoningParser` (streamed and whole results are equal for any chunking):

  * reasoning is the text after a `<think>` that opens the output (leading whitespace allowed)
    and before `</think>`; without that opening tag the whole output is content, unless
    `starts_in_reasoning` says the prompt itself ended with `<think>`;
  * `<|tool_calls_section_begin|>` inside reasoning also ends it (the model went straight to
    its tool calls) and stays in the content, so the tool-call parser still sees it;
  * output that stops inside reasoning (no `</think>`) is all reasoning;
  * tags are matched as text; a streamed chunk's tail that could start a tag is held until the
    next chunk decides it (tags are single tokens in K2's vocabulary, so this rarely waits).

The content that comes out is what `openk2.tokenizer.toolcalls` parses next.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
SECTION_BEGIN = "<|tool_calls_section_begin|>"
_ENDS = (THINK_CLOSE, SECTION_BEGIN)  # what ends reasoning

START, REASONING, CONTENT = range(3)


@dataclass
class ReasoningDelta:
    """One streamed piece: reasoning text or content text (exactly one is set)."""

    reasoning: str | None = None
    content: str | None = None


@dataclass
class SplitOutput:
    reasoning: str | None  # None when the output has no reasoning block
    content: str


def _held_prefix(tail: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `tail` that is a proper prefix of one of `tags`."""
    for k in range(min(len(tail), max(map(len, tags)) - 1), 0, -1):
        if any(t.startswith(tail[-k:]) for t in tags):
            return k
    return 0


class StreamingReasoningParser:
    """Feed decoded text as it arrives; get reasoning and content deltas back.

    `finish()` flushes what was held; `result()` then equals `split_reasoning` on the whole text.
    """

    def __init__(self, starts_in_reasoning: bool = False):
        self._state = REASONING if starts_in_reasoning else START
        self._held = ""
        self._reasoning: list[str] | None = [] if starts_in_reasoning else None
        self._content: list[str] = []
        self._finished = False

    def feed(self, chunk: str) -> list[ReasoningDelta]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        buf, out = self._held + chunk, []
        self._held = ""
        while buf:
            if self._state == START:
                rest = buf.lstrip()
                if rest.startswith(THINK_OPEN):
                    self._state, self._reasoning, buf = REASONING, [], rest[len(THINK_OPEN) :]
                elif THINK_OPEN.startswith(rest):  # only whitespace and part of the tag so far
                    self._held, buf = buf, ""
                else:
                    self._state = CONTENT
            elif self._state == REASONING:
                hits = [(buf.find(t), t) for t in _ENDS if t in buf]
                if hits:
                    i, tag = min(hits)
                    self._add(out, reasoning=buf[:i])
                    self._state = CONTENT
                    buf = buf[i + len(THINK_CLOSE) :] if tag == THINK_CLOSE else buf[i:]
                else:
                    k = _held_prefix(buf, _ENDS)
                    self._add(out, reasoning=buf[: len(buf) - k])
                    self._held, buf = buf[len(buf) - k :], ""
            else:
                self._add(out, content=buf)
                buf = ""
        return out

    def finish(self) -> list[ReasoningDelta]:
        out: list[ReasoningDelta] = []
        if not self._finished:
            held, self._held = self._held, ""
            if self._state == REASONING:
                self._add(out, reasoning=held)
            else:
                self._add(out, content=held)
            self._finished = True
        return out

    def _add(self, out: list[ReasoningDelta], reasoning: str = "", content: str = "") -> None:
        if reasoning:
            self._reasoning.append(reasoning)
            out.append(ReasoningDelta(reasoning=reasoning))
        if content:
            self._content.append(content)
            out.append(ReasoningDelta(content=content))

    def result(self) -> SplitOutput:
        reasoning = None if self._reasoning is None else "".join(self._reasoning)
        return SplitOutput(reasoning, "".join(self._content))


def split_reasoning(text: str, starts_in_reasoning: bool = False) -> SplitOutput:
    """A finished K2-Thinking output -> (reasoning or None, content)."""
    parser = StreamingReasoningParser(starts_in_reasoning)
    parser.feed(text)
    parser.finish()
    return parser.result()
