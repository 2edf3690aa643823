"""Reading a request's JSON body without letting its size or shape hurt the server.

The size limit itself is the BodyLimitMiddleware's (it answers 413 before the body is read); here a
body is parsed, on a worker thread when it is large (parsing megabytes on the event loop would stall
every stream), and refused with a 400 when it is not a JSON object or is nested deeper than
MAX_JSON_DEPTH: deep nesting is never a real request, and recursive code further on (schema checks,
grammar compilation, templating) would otherwise hit Python's recursion limit and fail with a 500.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from openk2.serve.errors import APIError

MAX_JSON_DEPTH = 64
OFF_LOOP_BYTES = 64 * 1024  # bodies at least this large are parsed on a worker thread


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays/objects nest more than `limit` levels deep (iterative: no recursion limit)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON value")


def parse_json_object(raw: bytes) -> dict:
    """bytes -> the request's JSON object, or APIError(400) saying what is wrong with it. NaN and
    Infinity, which Python's json would accept, are refused: they are not JSON."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except ValueError as e:  # bad syntax or encoding, NaN, an integer of over 4300 digits
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if json_depth_exceeds(body, MAX_JSON_DEPTH):
        raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    return body


async def read_json_object(request: Request) -> dict:
    """The request's body as a JSON object (see parse_json_object), parsed off the event loop when
    it is large."""
    raw = await request.body()
    if len(raw) >= OFF_LOOP_BYTES:
        return await run_in_threadpool(parse_json_object, raw)
    return parse_json_object(raw)
