"""Constrained decoding: JSON output and forced tool calls, enforced by token masks from llguidance.

Why llguidance: it is the only one of the candidates that is CPU-native, works from a tiktoken
encoding with K2's special tokens addressed by name inside the grammar, and embeds JSON schemas in a
context-free grammar (`%json {...}`), which is exactly what a forced tool-call section needs (fixed
markers around per-tool JSON arguments). A mask costs ~0.03-0.05 ms per token here with no per-schema
precompilation (lazy Earley parser + token trie). xgrammar is as fast but its tokenizer info is built
from HF tokenizers and its structural tags are newer and CUDA-oriented; outlines-core compiles a
regex automaton per schema up front (slow for big schemas, no CFG for the markers); lm-format-enforcer
walks a character trie in Python (slow on 160k-token vocabularies).

The tool-call grammar is derived from the chat template, not written here: we render an assistant
turn with placeholder calls through `openk2.tokenizer.chat.segments` and read off which markers and
text surround an id and an argument blob. The template module stays the only place that knows the
wire format.
"""

from __future__ import annotations

import copy
import json
from functools import cached_property

import llguidance
import llguidance.torch as llgt
import torch
from llguidance.tiktoken import lltokenizer_from_encoding

from openk2.tokenizer import chat
from openk2.tokenizer.tokenizer import K2Tokenizer

# Compact-but-spaced JSON (what json.dumps writes); no free whitespace, so a weak model cannot wander.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}
MAX_FORCED_CALLS = 8  # a `required` tool choice allows 1..MAX_FORCED_CALLS calls in one turn

_ID = "@@openk2-id-{}@@"
_ARGS = "@@openk2-args@@"


class GrammarCompiler:
    """Turns response formats and tool choices into llguidance grammars for one tokenizer."""

    def __init__(self, tokenizer: K2Tokenizer):
        self.tokenizer = tokenizer
        # Building the token trie takes ~0.1 s for the small vocabulary, ~1 s for K2's: do it once.
        self.ll = lltokenizer_from_encoding(
            tokenizer.enc, n_vocab=tokenizer.vocab_size, eos_token=[tokenizer.im_end_id, tokenizer.eos_id]
        )

    # ---- grammars ---------------------------------------------------------------------------
    def json_schema(self, schema: dict) -> str:
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema must be an object")
        return self._checked(llguidance.LLMatcher.grammar_from_json_schema(_styled(schema)))

    def json_object(self) -> str:
        return self.json_schema({"type": "object"})

    def tool_calls(
        self,
        tools: list[dict],
        name: str | None = None,
        max_calls: int = MAX_FORCED_CALLS,
        first_index: int = 0,
    ) -> str:
        """A tool-call section with 1..max_calls calls of the offered tools (exactly one call when
        `name` is given, and then of that tool), each call's arguments valid against its tool's
        parameters schema. Call ids count on from `first_index` (the calls earlier in the
        conversation), as K2 numbers them."""
        by_name = {
            t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools
        }
        if name is not None:
            if name not in by_name:
                raise ValueError(f"tool_choice names function {name!r}, which is not among the tools")
            by_name = {name: by_name[name]}
        if not 1 <= max_calls <= MAX_FORCED_CALLS:
            raise ValueError(f"max_calls must be in [1, {MAX_FORCED_CALLS}], got {max_calls}")
        before_first, between_id_args, between_calls, after_last = self._wire
        schemas = [_styled(schema) for schema in by_name.values()]
        rules = [f"args_{k}: %json {json.dumps(schema)}" for k, schema in enumerate(schemas)]

        def call(i: int) -> str:
            alternatives = []
            for k, fn in enumerate(by_name):
                call_id = chat.tool_call_id({"function": {"name": fn}}, first_index + i)
                alternatives.append(f"{json.dumps(call_id)} {between_id_args} args_{k}")
            return "(" + " | ".join(alternatives) + ")"

        n_calls = 1 if name is not None else max_calls
        # Unrolled so that each call carries its own id suffix.
        body = ""
        for i in reversed(range(1, n_calls)):
            body = f"({between_calls} {call(i)} {body})?"
        rules.insert(0, f"start: {before_first} {call(0)} {body} {after_last}")
        return self._checked(llguidance.LLMatcher.grammar_from_lark("\n".join(rules)))

    @cached_property
    def _wire(self) -> tuple[str, str, str, str]:
        """Lark fragments of the tool-call section, read off the chat template: (before the first id,
        between an id and its arguments, between two calls, after the last arguments)."""
        calls = [{"id": _ID.format(i), "function": {"name": "f", "arguments": _ARGS}} for i in range(2)]
        turn = {"role": "assistant", "content": "", "tool_calls": calls}
        segs = chat.segments([{"role": "system", "content": "s"}, turn])
        texts = [s.text for s in segs]
        id0, id1 = texts.index(_ID.format(0)), texts.index(_ID.format(1))
        args0 = texts.index(_ARGS, id0)
        args1 = texts.index(_ARGS, id1)
        middle = max(i for i in range(id0) if texts[i] == "<|im_middle|>")
        end = len(segs) - 1  # the turn's closing marker: a stop token, sampled after the grammar ends

        def lark(lo: int, hi: int) -> str:
            parts = [s.text if s.special else json.dumps(s.text) for s in segs[lo:hi]]
            return " ".join(parts) if parts else '""'

        return lark(middle + 1, id0), lark(id0 + 1, args0), lark(args0 + 1, id1), lark(args1 + 1, end)

    def _checked(self, grammar: str) -> str:
        error = llguidance.LLMatcher.validate_grammar(grammar, self.ll)
        if error:
            raise ValueError(f"cannot build a grammar: {error}")
        return grammar

    def matcher(self, grammar: str) -> Constraint:
        return Constraint(llguidance.LLMatcher(self.ll, grammar, log_level=0), self.tokenizer.vocab_size)


def _styled(schema: dict) -> dict:
    schema = copy.deepcopy(schema)
    schema["x-guidance"] = {**JSON_STYLE, **schema.get("x-guidance", {})}
    return schema


class Constraint:
    """One sequence's grammar state: which tokens may come next, and advancing by the sampled one."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._bitmask = llgt.allocate_token_bitmask(1, vocab_size)
        self._shifts = torch.arange(32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """Bool (V,) mask of tokens the grammar accepts next (EOS / <|im_end|> once it is complete)."""
        llgt.fill_next_token_bitmask(self.matcher, self._bitmask)
        bits = (self._bitmask[0].unsqueeze(-1) >> self._shifts) & 1
        return bits.flatten()[: self.vocab_size].bool()

    def advance(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id):
            raise RuntimeError(f"grammar rejected token {token_id}: {self.matcher.get_error()}")

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None
