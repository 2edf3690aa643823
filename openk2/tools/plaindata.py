"""Plain values as JSON, exactly: how values cross between a candidate's process and its checker.

`encode` accepts only exact builtin types (None, bool, int, float, complex, str, bytes, list, tuple,
dict, set, frozenset), so an object with a rigged `__eq__` cannot be sent; `decode` builds fresh
builtin values from the JSON, whatever the other side wrote, so the checker only ever compares its
own plain values. Stdlib only: this file's source is also run inside sandboxes.
"""

import json

MAX_DEPTH = 100


class NotPlainData(TypeError):
    """A value that is not made of builtin plain types."""


def _enc(v, depth):
    if depth > MAX_DEPTH:
        raise NotPlainData("value nested too deeply")
    t = type(v)
    if v is None:
        return ["n"]
    if t is bool:
        return ["b", v]
    if t is int:
        return ["i", str(v)]
    if t is float:
        return ["f", repr(v)]
    if t is complex:
        return ["c", repr(v.real), repr(v.imag)]
    if t is str:
        return ["s", v]
    if t is bytes:
        return ["y", v.hex()]
    if t is list or t is tuple:
        return ["l" if t is list else "t", [_enc(x, depth + 1) for x in v]]
    if t is set or t is frozenset:
        return ["S" if t is set else "F", [_enc(x, depth + 1) for x in v]]
    if t is dict:
        return ["d", [[_enc(k, depth + 1), _enc(x, depth + 1)] for k, x in v.items()]]
    raise NotPlainData(f"{t.__module__}.{t.__qualname__} is not a plain value")


def encode(value) -> str:
    return json.dumps(_enc(value, 0))


def _dec(x, depth):
    if depth > MAX_DEPTH or not isinstance(x, list) or not x or not isinstance(x[0], str):
        raise NotPlainData("malformed plain-data value")
    tag, rest = x[0], x[1:]
    if tag == "n" and not rest:
        return None
    if tag == "b" and len(rest) == 1 and type(rest[0]) is bool:
        return bool(rest[0])
    if tag == "i" and len(rest) == 1 and type(rest[0]) is str:
        return int(rest[0])
    if tag == "f" and len(rest) == 1 and type(rest[0]) is str:
        return float(rest[0])
    if tag == "c" and len(rest) == 2 and all(type(r) is str for r in rest):
        return complex(float(rest[0]), float(rest[1]))
    if tag == "s" and len(rest) == 1 and type(rest[0]) is str:
        return str(rest[0])
    if tag == "y" and len(rest) == 1 and type(rest[0]) is str:
        return bytes.fromhex(rest[0])
    if tag in "ltSF" and len(tag) == 1 and len(rest) == 1 and type(rest[0]) is list:
        items = [_dec(i, depth + 1) for i in rest[0]]
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
    if tag == "d" and len(rest) == 1 and type(rest[0]) is list:
        out = {}
        for pair in rest[0]:
            if type(pair) is not list or len(pair) != 2:
                raise NotPlainData("malformed dict entry")
            out[_dec(pair[0], depth + 1)] = _dec(pair[1], depth + 1)
        return out
    raise NotPlainData(f"malformed plain-data value with tag {tag!r}")


def decode(text: str):
    try:
        return _dec(json.loads(text), 0)
    except (ValueError, TypeError, RecursionError) as e:
        raise NotPlainData(f"not plain data: {e}") from None
