"""Typed dataclasses from untrusted dicts (a --config file, a run's config.json), checked against their fields.

A config read from disk may have been edited by hand or damaged: :func:`from_dict` refuses unknown
keys and values of the wrong JSON type with one line naming the file, the key and what is allowed,
before the dataclass (and its own range checks in ``__post_init__``) ever sees them.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")

__all__ = ["from_dict", "describe", "fits"]


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """``cls(**data)`` after checking that ``data`` is an object whose keys are fields of ``cls``
    and whose values fit the fields' annotations; any failure is a ValueError of one line."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be an object of {cls.__name__} settings, got {_json_type(data)}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ValueError(f"{where}: unknown settings {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    for key, value in data.items():
        if not fits(value, hints[key]):
            raise ValueError(f"{where}: {key} must be {describe(hints[key])}, got {_show(value)}")
    try:
        return cls(**data)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"{where}: {e}") from None


def fits(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits a (simple) annotation: int, float, bool, str, Path, Literal, unions,
    tuples / lists of such, dicts, Any."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is Literal:  # the type here; membership in the dataclass, whose message names its choices
        return any(type(value) is type(a) for a in args)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp in (str, Path):
        return isinstance(value, str)
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        item = args[0] if args else Any
        return all(fits(v, item) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return True  # an annotation this checker does not know: the dataclass decides


def describe(tp: Any) -> str:
    """An annotation in words, for messages: 'an integer', 'null or a number', "one of 'a', 'b'"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return describe(type(args[0]))
    if origin in (tuple, list):
        return f"a list of {_plural(describe(args[0]))}" if args else "a list"
    words = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", Path: "a path"}
    words |= {type(None): "null", dict: "an object", list: "a list", tuple: "a list"}
    return words.get(origin if origin is dict else tp, getattr(tp, "__name__", str(tp)))


def _plural(phrase: str) -> str:
    return {"an integer": "integers", "a finite number": "finite numbers", "a string": "strings"}.get(phrase, phrase)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
