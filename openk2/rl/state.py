"""The RL trainer's in-flight objects (paused partial rollouts: groups, samples, tasks, episodes) in a
plain form that a checkpoint's `trainer_state.pt` can hold and `torch.load(weights_only=True)` reads.

`to_plain` turns dataclasses into tagged dicts (`{"__dataclass__": "openk2.rl.rollout.Sample", ...
fields}`), environments (a multi-turn episode owns one, which holds its world) into their tagged
attributes, `random.Random` into its state and tuples into tagged lists, and keeps dicts,
lists, str/int/float/bool/None and tensors; anything else is refused at save time with the path to
it, so a run never writes a checkpoint it could not resume. `from_plain` rebuilds them, importing
only dataclasses and `Environment` subclasses defined under `openk2.` (environments are made without
running their `__init__`), so a crafted checkpoint can construct nothing else.
"""

from __future__ import annotations

import dataclasses
import importlib
import random
from typing import Any

import torch

from openk2.rl.env import Environment

_DATACLASS = "__dataclass__"
_OBJECT = "__object__"
_RANDOM = "__random__"
_TUPLE = "__tuple__"
_ALLOWED_PREFIX = "openk2."


def to_plain(value: Any, where: str = "state") -> Any:
    """`value` with dataclasses and tuples tagged; TypeError naming the first unstorable part."""
    if value is None or isinstance(value, (str, bool, int, float, torch.Tensor)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        name = f"{cls.__module__}.{cls.__qualname__}"
        if not name.startswith(_ALLOWED_PREFIX) or "." in cls.__qualname__:
            raise TypeError(
                f"{where}: cannot store a {name} in the RL trainer state (not a top-level openk2 dataclass)"
            )
        fields = {
            f.name: to_plain(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value)
        }
        return {_DATACLASS: name, **fields}
    if isinstance(value, random.Random):
        return {_RANDOM: to_plain(value.getstate(), where)}
    if isinstance(value, tuple):
        return {_TUPLE: [to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise TypeError(f"{where}: dict keys must be str or int to be stored in the RL trainer state")
        return {k: to_plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    cls = type(value)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(value, Environment) and name.startswith(_ALLOWED_PREFIX) and "." not in cls.__qualname__:
        attributes = {k: to_plain(v, f"{where}.{k}") for k, v in vars(value).items()}
        return {_OBJECT: name, "attributes": attributes}
    raise TypeError(f"{where}: cannot store a {type(value).__name__} in the RL trainer state")


def from_plain(value: Any) -> Any:
    """The objects `to_plain` flattened; ValueError for a tag naming anything but an openk2 dataclass."""
    if isinstance(value, list):
        return [from_plain(v) for v in value]
    if not isinstance(value, dict):
        return value
    if _TUPLE in value and len(value) == 1:
        return tuple(from_plain(v) for v in value[_TUPLE])
    if _RANDOM in value and len(value) == 1:
        rng = random.Random()
        rng.setstate(from_plain(value[_RANDOM]))
        return rng
    if _OBJECT in value:
        cls = _class_named(value[_OBJECT])
        if not issubclass(cls, Environment):
            raise ValueError(f"RL trainer state names {value[_OBJECT]!r:.80}, not an openk2 environment")
        obj = cls.__new__(cls)
        for k, v in from_plain(value.get("attributes", {})).items():
            object.__setattr__(obj, k, v)
        return obj
    if _DATACLASS in value:
        cls = _class_named(value[_DATACLASS])
        if not dataclasses.is_dataclass(cls):
            raise ValueError(f"RL trainer state names {value[_DATACLASS]!r:.80}, not an openk2 dataclass")
        kwargs = {k: from_plain(v) for k, v in value.items() if k != _DATACLASS}
        init = {f.name for f in dataclasses.fields(cls) if f.init}
        obj = cls(**{k: v for k, v in kwargs.items() if k in init})
        for k, v in kwargs.items():  # fields outside __init__
            if k not in init:
                setattr(obj, k, v)
        return obj
    return {k: from_plain(v) for k, v in value.items()}


def _class_named(name: Any) -> type:
    if not isinstance(name, str) or not name.startswith(_ALLOWED_PREFIX):
        raise ValueError(f"RL trainer state names {name!r:.80}, not an openk2 class")
    module_name, _, qualname = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), qualname)
    except (ImportError, AttributeError):
        raise ValueError(f"RL trainer state names {name!r:.80}, which this openk2 does not have") from None
    if not isinstance(cls, type) or not cls.__module__.startswith(_ALLOWED_PREFIX):
        raise ValueError(f"RL trainer state names {name!r:.80}, not an openk2 class")
    return cls
