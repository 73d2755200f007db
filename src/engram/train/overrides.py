"""Typed `section.field=value` overrides: each value is parsed by its config field's annotation.

The field's type decides what a text means, so a typo cannot slip through as a value of another
type: ``train.steps=2.5`` is refused (an int field), ``train.compile_engram=no`` is False (a bool
field takes true/false, 1/0, yes/no, on/off), a `Literal` field takes exactly its choices, a float
field takes ints and rejects nan and infinities, ``None``/``null`` is accepted only where the field
is Optional, and lists are ``[a, b]`` (a Python literal) or ``a,b`` with each element checked.
Every refusal is one `ConfigError` naming the field, the type it expects and the valid values.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
import operator
import types
import typing
from typing import Any, Literal, Union

from engram.config import ConfigError

__all__ = ["describe_type", "field_types", "parse_value"]

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_NONE = ("none", "null")


class _Mismatch(Exception):
    """``raw`` does not fit the type; the caller words the message (it knows the field)."""


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each field of dataclass ``cls`` (strings under postponed
    evaluation become the real types)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _optional_inner(tp) -> tuple[bool, Any]:
    """``(True, X)`` for ``X | None`` / ``Optional[X]``, else ``(False, tp)``."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != len(typing.get_args(tp)):
            return True, (args[0] if len(args) == 1 else functools.reduce(operator.or_, args))
    return False, tp


def describe_type(tp) -> str:
    """How a type reads in an error message: ``int``, ``bool (true/false, ...)``,
    ``one of 'a', 'b'``, ``list of int``, ``int or None``."""
    optional, inner = _optional_inner(tp)
    if optional:
        return f"{describe_type(inner)} or None"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {describe_type(typing.get_args(tp)[0])}"
    if tp is bool:
        return "bool (true/false, 1/0, yes/no, on/off)"
    if dataclasses.is_dataclass(tp):
        return f"the {tp.__name__} section (set its fields one by one)"
    return getattr(tp, "__name__", str(tp))


def _unquote(raw: str) -> str:
    """A quoted Python string literal (``'float32'``) becomes its text; anything else is taken as is."""
    s = raw.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        try:
            val = ast.literal_eval(s)
        except (ValueError, SyntaxError):
            return raw
        if isinstance(val, str):
            return val
    return raw


def _from_text(raw: str, tp):
    """``raw`` (command-line text) as a value of ``tp``; _Mismatch if it is none."""
    optional, inner = _optional_inner(tp)
    if optional:
        return None if raw.strip().lower() in _NONE else _from_text(raw, inner)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        s = raw.strip()
        if s[:1] in "[(":
            try:
                val = ast.literal_eval(s)
            except (ValueError, SyntaxError):
                raise _Mismatch from None
            return _from_value(val, tp)
        if not s:
            raise _Mismatch
        return [_from_text(part, typing.get_args(tp)[0]) for part in s.split(",")]
    if origin is Literal:
        text = _unquote(raw).strip()
        for choice in typing.get_args(tp):
            if text == str(choice):
                return choice
        raise _Mismatch
    if tp is bool:
        word = _unquote(raw).strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise _Mismatch
    if tp is int:
        try:
            return int(raw.strip())  # "2.5", "1e3", "True" raise
        except ValueError:
            raise _Mismatch from None
    if tp is float:
        try:
            val = float(raw.strip())
        except ValueError:
            raise _Mismatch from None
        if not math.isfinite(val):
            raise _Mismatch
        return val
    if tp is str:
        return _unquote(raw)
    raise _Mismatch  # a whole section or a type without a text form


def _from_value(val, tp):
    """A Python literal (an element of a ``[...]`` list) checked against ``tp``."""
    optional, inner = _optional_inner(tp)
    if optional:
        return None if val is None else _from_value(val, inner)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(val, list | tuple):
            raise _Mismatch
        return [_from_value(v, typing.get_args(tp)[0]) for v in val]
    if origin is Literal:
        if val in typing.get_args(tp) and not isinstance(val, bool):
            return val
        raise _Mismatch
    if tp is bool:
        if isinstance(val, bool):
            return val
        raise _Mismatch
    if tp is int:
        if isinstance(val, int) and not isinstance(val, bool):
            return val
        raise _Mismatch
    if tp is float:
        if isinstance(val, int | float) and not isinstance(val, bool) and math.isfinite(val):
            return float(val)
        raise _Mismatch
    if tp is str:
        if isinstance(val, str):
            return val
        raise _Mismatch
    raise _Mismatch


def parse_value(raw: str, tp, name: str):
    """``raw``, the text after ``=`` of an override of field ``name``, as a value of type ``tp``.

    Raises ConfigError ``expected <type> for <name>, got <raw>`` when it does not fit."""
    try:
        return _from_text(raw, tp)
    except _Mismatch:
        raise ConfigError(f"expected {describe_type(tp)} for {name}, got {raw!r}") from None
