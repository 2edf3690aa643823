"""`POST /tokenize` and `POST /detokenize`, with vLLM's request and response bodies.

  /tokenize    {"prompt": str, "add_special_tokens"?: bool, "return_token_strs"?: bool}
               or {"messages": [...], "tools"?: [...], "add_generation_prompt"?: bool (default true),
                   "return_token_strs"?: bool}
               -> {"count", "max_model_len", "tokens", "token_strs"?}
  /detokenize  {"tokens": [int, ...]} -> {"prompt": str}

"model" may be left out; when given it must be the served one. A prompt is encoded as
/v1/completions encodes it and messages as /v1/chat/completions renders them (K2's chat template),
so `count` is the `usage.prompt_tokens` those endpoints report. K2 adds no special token to a plain
prompt, so add_special_tokens changes nothing there. Encoding runs on a worker thread: a body of
megabytes takes a good fraction of a second to tokenise, which would otherwise stall every stream.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from openk2.serve.body import read_json_object
from openk2.serve.errors import APIError
from openk2.tokenizer.chat import encode_chat
from openk2.tokenizer.tokenizer import K2Tokenizer


def _flag(body: dict, key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"'{key}' must be a boolean, got {type(value).__name__}", key)
    return value


def tokenization_router(tokenizer: K2Tokenizer, model_name: str, max_model_len: int) -> APIRouter:
    router = APIRouter()

    async def read(request: Request) -> dict:
        body = await read_json_object(request)
        model = body.get("model")
        if model is not None and model != model_name:
            message = f"the model {model!r:.80} does not exist; this server serves '{model_name}'"
            raise APIError(404, message, "model", "model_not_found")
        return body

    def encode(body: dict) -> list[int]:
        if "messages" in body and "prompt" in body:
            raise APIError(400, "give either 'prompt' or 'messages', not both", "messages")
        if "messages" in body:
            messages, tools = body["messages"], body.get("tools")
            if not isinstance(messages, list) or not messages:
                raise APIError(400, "'messages' must be a non-empty list", "messages")
            if tools is not None and not (
                isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
            ):
                raise APIError(400, "'tools' must be a list of tool objects", "tools")
            generation_prompt = _flag(body, "add_generation_prompt", True)
            try:
                return encode_chat(
                    tokenizer, messages, tools=tools, add_generation_prompt=generation_prompt
                ).ids
            except (ValueError, KeyError, TypeError) as e:
                raise APIError(400, f"invalid messages: {e}", "messages") from None
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string (or send 'messages')", "prompt")
        _flag(body, "add_special_tokens", True)
        return tokenizer.encode(prompt)

    @router.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await read(request)
        strs = _flag(body, "return_token_strs", False)
        ids = await run_in_threadpool(encode, body)
        reply: dict[str, Any] = {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}
        if strs:
            reply["token_strs"] = [tokenizer.token_bytes(i).decode("utf-8", errors="replace") for i in ids]
        return reply

    @router.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, str]:
        body = await read(request)
        ids = body.get("tokens")
        ok = isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        if not ok or not all(0 <= i < tokenizer.vocab_size for i in ids):
            message = f"'tokens' must be a list of token ids in [0, {tokenizer.vocab_size})"
            raise APIError(400, message, "tokens")
        return {"prompt": await run_in_threadpool(tokenizer.decode, ids)}

    return router
