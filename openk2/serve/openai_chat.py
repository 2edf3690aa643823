"""The OpenAI chat-completions request mapped onto the engine, and the engine's output mapped back.

`prepare_chat(body, engine)` takes an OpenAI `/v1/chat/completions` body (messages, tools,
tool_choice, response_format, parallel_tool_calls, logit_bias and the sampling fields), validates
it, and returns a `PreparedChat`: the prompt ids, the `SamplingParams` (with the grammar that
enforces a forced tool choice or a response format) and what is needed to read the reply back.
`PreparedChat.reply` turns a finished completion into the assistant message and its finish_reason;
`PreparedChat.stream` does the same piece by piece for server-sent events. The HTTP server and the
in-process client backend both go through here, so the two give the same answer to the same body.

Every bad input raises `RequestError` with the OpenAI `param` that is wrong (`messages[2].tool_call_id`,
`tools[0]`, `logit_bias`, ...). This module writes no K2 marker itself: the prompt comes from the chat
template (`openk2.tokenizer.chat`), tool calls are read by its parser (`openk2.tokenizer.toolcalls`),
and forced calls by a grammar derived from the template (constrained.py).

Semantics chosen where the OpenAI API leaves room:
  * role `developer` is a system message (OpenAI's newer name for it);
  * `top_p: 0` keeps only the most likely token, i.e. greedy decoding (see sampling.py);
  * `parallel_tool_calls: false` allows at most one call: a forced choice gets a one-call grammar,
    and with `auto` any call after the first is dropped from the reply (and from the stream);
  * historical tool-call ids in other formats (`search:0`, `call_abc`) are rewritten to K2's
    `functions.NAME:IDX` (IDX counts calls across the conversation) before rendering, together with
    the `tool_call_id` of the results that answer them, because K2 was trained on that form (the
    template's `normalize_tool_call_ids` does the rewriting);
  * a `tool` message must answer a call made earlier in the conversation (without a tool_call_id:
    the oldest call not yet answered, as the template reads it);
  * with `reasoning=True` (a K2-Thinking checkpoint, `openk2 serve --reasoning-parser kimi_k2`) the
    prompt is rendered with the Thinking template (earlier turns' `reasoning_content` kept as it
    specifies), and the model's `<think>...</think>` block comes back as the message's
    `reasoning_content` and as `reasoning_content` deltas, apart from `content` and tool calls.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import jsonschema

from openk2.serve.cache import ContextLengthError
from openk2.serve.constrained import MAX_FORCED_CALLS
from openk2.serve.engine import Engine
from openk2.serve.sampling import K2_DEFAULT_TEMPERATURE, InvalidSamplingParam, SamplingParams
from openk2.tokenizer.chat import encode_chat, normalize_tool_call_ids
from openk2.tokenizer.reasoning import StreamingReasoningParser, split_reasoning
from openk2.tokenizer.toolcalls import StreamingToolCallParser, assistant_message, parse_tool_calls

TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
ROLES = ("system", "developer", "user", "assistant", "tool")
_WHERE = re.compile(r"^(messages\[\d+\](?:\.tool_calls\[\d+\])?)")


class RequestError(ValueError):
    """A request the engine cannot take, as an OpenAI error: HTTP status, message, param, code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


# ---------------------------------------------------------------------------------------------- fields
def field_of(body: dict, key: str, types: type | tuple, default: Any = None) -> Any:
    """body[key] checked against `types` (bool is never taken for a number); None -> default."""
    value = body.get(key)
    if value is None:
        return default
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise RequestError(f"'{key}' has the wrong type: {type(value).__name__}", key)
    return value


def check_tools(tools: Any) -> list[dict] | None:
    """OpenAI function tools: unique valid names, parameters a valid JSON schema."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list", "tools")
    names = set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if (
            not isinstance(t, dict)
            or t.get("type", "function") != "function"
            or not isinstance(t.get("function"), dict)
        ):
            raise RequestError(f"{where} must be {{'type': 'function', 'function': {{...}}}}", where)
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise RequestError(
                f"{where}.function.name must match {TOOL_NAME.pattern}, got {name!r:.80}", where
            )
        if name in names:
            raise RequestError(f"{where}: duplicate tool name {name!r}", where)
        names.add(name)
        schema = fn.get("parameters")
        if schema is not None:
            if not isinstance(schema, dict):
                raise RequestError(f"{where}.function.parameters must be a JSON schema object", where)
            try:
                jsonschema.validators.validator_for(schema).check_schema(schema)
            except jsonschema.SchemaError as e:
                message = f"{where}.function.parameters is not a valid JSON schema: {e.message}"
                raise RequestError(message, where) from None
            except RecursionError:
                raise RequestError(f"{where}.function.parameters is nested too deeply", where) from None
    return tools or None


def check_tool_choice(value: Any, tools: list[dict] | None) -> str:
    """-> "auto" | "none" | "required" | the name of the one function to call."""
    if value is None:
        return "auto" if tools else "none"
    if value in ("auto", "none", "required"):
        if value == "required" and not tools:
            raise RequestError("tool_choice 'required' needs tools", "tool_choice")
        return value
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        if not isinstance(name, str) or not tools or name not in {t["function"]["name"] for t in tools}:
            raise RequestError(f"tool_choice names {name!r:.80}, which is not among the tools", "tool_choice")
        return name
    raise RequestError("tool_choice must be 'auto', 'none', 'required' or a named function", "tool_choice")


def logit_bias(value: Any) -> dict[int, float]:
    """OpenAI's {"token id as a string": bias} -> {id: bias}; the range is checked by SamplingParams."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError("'logit_bias' must be an object mapping token ids to numbers", "logit_bias")
    out: dict[int, float] = {}
    for key, bias in value.items():
        try:
            tok = int(key)
        except (TypeError, ValueError):
            raise RequestError(f"logit_bias keys must be token ids, got {key!r:.40}", "logit_bias") from None
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise RequestError(f"logit_bias values must be numbers, got {bias!r:.40}", "logit_bias")
        out[tok] = float(bias)
    return out


def sampling_params(body: dict, default_max_tokens: int, vocab_size: int) -> SamplingParams:
    """The sampling fields shared by chat and legacy completions, validated."""
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key):
            raise RequestError(f"'{key}' is not supported (only 0)", key)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise RequestError("'stop' must be a string or a list of strings", "stop")
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(max_key)
    params = SamplingParams(
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        temperature=field_of(body, "temperature", (int, float), K2_DEFAULT_TEMPERATURE),
        top_p=field_of(body, "top_p", (int, float), 1.0),
        top_k=field_of(body, "top_k", int, 0),
        seed=field_of(body, "seed", int),
        stop=[s for s in stop or [] if s],
        n=field_of(body, "n", int, 1),
        ignore_eos=field_of(body, "ignore_eos", bool, False),
        logit_bias=logit_bias(body.get("logit_bias")),
    )
    try:
        return params.validate(vocab_size)
    except InvalidSamplingParam as e:
        raise RequestError(str(e), max_key if e.param == "max_tokens" else e.param) from None


def response_format_grammar(fmt: Any, grammars) -> str | None:
    """`response_format` -> an llguidance grammar (None for plain text)."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        message = "response_format.type must be 'text', 'json_object' or 'json_schema'"
        raise RequestError(message, "response_format")
    if fmt["type"] == "text":
        return None
    try:
        if fmt["type"] == "json_object":
            return grammars.json_object()
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            message = "response_format.json_schema must be {'name': ..., 'schema': {...}}"
            raise RequestError(message, "response_format")
        schema = spec.get("schema") or {"type": "object"}
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            raise RequestError(f"response_format schema is invalid: {e.message}", "response_format") from None
        except RecursionError:
            raise RequestError("response_format schema is nested too deeply", "response_format") from None
        return grammars.json_schema(schema)
    except ValueError as e:
        if isinstance(e, RequestError):
            raise
        raise RequestError(str(e), "response_format") from None


def include_usage(body: dict) -> bool:
    """stream_options.include_usage (only allowed on streamed requests)."""
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    if not body.get("stream"):
        raise RequestError("'stream_options' is only allowed when 'stream' is true", "stream_options")
    return bool(opts.get("include_usage"))


# ---------------------------------------------------------------------------------------------- messages
def normalize_messages(messages: Any) -> tuple[list[dict], int]:
    """Validated copies of the messages, ready for the chat template, and the number of earlier calls.

    `developer` becomes `system`; historical tool-call ids are rewritten by the template's
    `normalize_tool_call_ids` (to K2's `functions.NAME:IDX`), and a tool result must answer a call
    made before it: by its (rewritten) id, or, without an id, the oldest call not yet answered."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    checked: list[dict] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object", where)
        role = m.get("role")
        if role not in ROLES:
            message = f"{where}.role must be one of {', '.join(ROLES)}, got {role!r:.40}"
            raise RequestError(message, f"{where}.role")
        if role == "assistant" and m.get("tool_calls") is not None:
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise RequestError(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                name = fn.get("name") if isinstance(fn, dict) else None
                if not isinstance(name, str) or not name:
                    message = (
                        f"{where}.tool_calls[{j}] must be {{'function': {{'name': ..., 'arguments': ...}}}}"
                    )
                    raise RequestError(message, f"{where}.tool_calls[{j}]")
                if call.get("id") is not None and not isinstance(call["id"], str):
                    param = f"{where}.tool_calls[{j}].id"
                    raise RequestError(f"{param} must be a string", param)
        if role == "tool" and m.get("tool_call_id") is not None and not isinstance(m["tool_call_id"], str):
            raise RequestError(f"{where}.tool_call_id must be a string", f"{where}.tool_call_id")
        checked.append(dict(m, role="system") if role == "developer" else m)
    out = normalize_tool_call_ids(checked)
    made: set[str] = set()
    open_calls: list[str] = []  # made and not yet answered, oldest first
    for i, m in enumerate(out):
        if m["role"] == "assistant":
            ids = [c["id"] for c in m.get("tool_calls") or []]
            made.update(ids)
            open_calls += ids
        elif m["role"] == "tool":
            call_id = m.get("tool_call_id")
            answered = call_id if call_id else (open_calls[0] if open_calls else None)
            if answered is None or answered not in made:
                shown = messages[i].get("tool_call_id")
                message = f"messages[{i}] (tool_call_id {shown!r:.80}) answers no tool call made before it"
                raise RequestError(message, f"messages[{i}].tool_call_id")
            if answered in open_calls:
                open_calls.remove(answered)
    return out, sum(len(m.get("tool_calls") or []) for m in out if m["role"] == "assistant")


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class PreparedChat:
    """One validated chat request: what to give the engine and how to read its output back."""

    prompt: list[int]
    params: SamplingParams
    tools: list[dict] | None
    tool_choice: str  # "auto" | "none" | "required" | a function name
    parallel_tool_calls: bool
    include_usage: bool = False
    reasoning: bool = False  # split <think>...</think> into reasoning_content

    def reply(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """A finished completion's text -> (assistant message, finish_reason). The reason is
        "tool_calls" when the model stopped by itself after writing calls."""
        thought = None
        if self.reasoning:
            split = split_reasoning(text)
            thought, text = split.reasoning, split.content
        if self.tools is None:
            message, finish = {"role": "assistant", "content": text}, finish_reason
        else:
            parsed = parse_tool_calls(text, self.tools)
            if not self.parallel_tool_calls and len(parsed.tool_calls) > 1:
                parsed = dataclasses.replace(parsed, tool_calls=parsed.tool_calls[:1])
            finish = "tool_calls" if parsed.tool_calls and finish_reason == "stop" else finish_reason
            message = assistant_message(parsed)
        if thought is not None:
            message["reasoning_content"] = thought
        return message, finish

    def stream(self) -> ReplyStream:
        return ReplyStream(self)


class ReplyStream:
    """One completion's text as it arrives -> OpenAI `delta` objects, then its finish_reason."""

    def __init__(self, plan: PreparedChat):
        self.plan = plan
        self.parser = StreamingToolCallParser(plan.tools) if plan.tools is not None else None
        self.thinking = StreamingReasoningParser() if plan.reasoning else None

    def feed(self, text: str, finished: bool = False) -> list[dict]:
        if self.thinking is None:
            return self._content(text, finished)
        pieces = self.thinking.feed(text) + (self.thinking.finish() if finished else [])
        out: list[dict] = []
        content = ""
        for piece in pieces:
            if piece.reasoning:
                out += self._content(content, False) + [{"reasoning_content": piece.reasoning}]
                content = ""
            elif piece.content:
                content += piece.content
        return out + self._content(content, finished)

    def _content(self, text: str, finished: bool) -> list[dict]:
        """Content text (after any reasoning is taken out) -> content / tool-call deltas."""
        if self.parser is None:
            return [{"content": text}] if text else []
        deltas = self.parser.feed(text)
        if finished:
            deltas += self.parser.finish()
        if not self.plan.parallel_tool_calls:
            deltas = [d for d in deltas if d.index is None or d.index == 0]
        return [d.to_openai() for d in deltas]

    def finish_reason(self, engine_reason: str | None) -> str | None:
        has_calls = self.parser is not None and bool(self.parser.result().tool_calls)
        return "tool_calls" if has_calls and engine_reason == "stop" else engine_reason


def check_fits(engine: Engine, prompt: list[int], params: SamplingParams, prompt_param: str) -> None:
    """Everything the engine checks at submission (context length, slots, the grammar), as a
    RequestError; `prompt_param` names the field that made the prompt ("messages" or "prompt")."""
    try:
        engine.check(prompt, params)
    except ContextLengthError as e:
        raise RequestError(str(e), prompt_param, "context_length_exceeded") from None
    except InvalidSamplingParam as e:
        raise RequestError(str(e), e.param) from None
    except ValueError as e:
        param = "n" if str(e).startswith("n=") else prompt_param if "prompt" in str(e) else None
        raise RequestError(str(e), param) from None


def prepare_chat(
    body: dict, engine: Engine, constrained_tools: bool = True, reasoning: bool = False
) -> PreparedChat:
    """Validate an OpenAI chat body against this engine; RequestError names what is wrong.

    constrained_tools=False leaves tool_choice "required" / a named function to the model alone (no
    grammar), which is how an evaluation measures a model's unaided tool-call conformance.
    reasoning=True serves a K2-Thinking checkpoint (its template; reasoning_content out)."""
    try:
        return _prepare_chat(body, engine, constrained_tools, reasoning)
    except RecursionError:  # JSON nested deeper than the renderer or a schema compiler can walk
        raise RequestError("the request is nested too deeply") from None


def _prepare_chat(body: dict, engine: Engine, constrained_tools: bool, reasoning: bool) -> PreparedChat:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    tokenizer = engine.tokenizer
    messages, n_calls = normalize_messages(body.get("messages"))
    tools = check_tools(body.get("tools"))
    choice = check_tool_choice(body.get("tool_choice"), tools)
    parallel = field_of(body, "parallel_tool_calls", bool, True)
    try:
        variant = "thinking" if reasoning else "instruct"
        prompt = encode_chat(
            tokenizer, messages, tools=tools, add_generation_prompt=True, variant=variant
        ).ids
    except (ValueError, KeyError, TypeError) as e:
        where = _WHERE.match(str(e))
        raise RequestError(f"invalid messages: {e}", where.group(1) if where else "messages") from None
    params = sampling_params(body, max(1, engine.max_seq_len - len(prompt) + 1), engine.vocab_size)
    params.logprobs = bool(field_of(body, "logprobs", bool, False))
    params.top_logprobs = field_of(body, "top_logprobs", int, 0)
    if params.top_logprobs and not params.logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if tools is not None:  # the parser needs the markers; any other special token stays out
        params.keep_special_token_ids = tokenizer.tool_call_marker_ids
    grammars = engine.grammars
    try:
        if choice == "none" and tools:
            params.banned_token_ids = [tokenizer.tool_calls_section_begin_id, tokenizer.tool_call_begin_id]
        elif choice == "required" and constrained_tools:
            params.grammar = grammars.tool_calls(
                tools, max_calls=MAX_FORCED_CALLS if parallel else 1, first_index=n_calls
            )
        elif choice not in ("auto", "none", "required") and constrained_tools:
            params.grammar = grammars.tool_calls(tools, name=choice, first_index=n_calls)
        if choice in ("auto", "none"):
            params.grammar = response_format_grammar(body.get("response_format"), grammars)
    except RequestError:
        raise
    except ValueError as e:
        raise RequestError(str(e), "tools") from None
    check_fits(engine, prompt, params, "messages")
    return PreparedChat(prompt, params, tools, choice, parallel, include_usage(body), reasoning)
