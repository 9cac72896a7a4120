"""Small dataclass configs and the one validator that maps TOML tables onto them.

A config field declares what it accepts in its ``metadata``::

    steps: int = field(default=20, metadata=check("int", 1, 10_000))

Kinds: ``int``, ``float``, ``bool``, ``str`` (with ``choices``), ``interval`` (a pair
``[lo, hi]`` with ``lo <= hi`` inside the bounds), ``int_list`` (a list of ints inside the
bounds), ``str_list`` (a non-empty list of distinct strings, each one of ``choices`` when
given).
:func:`from_table` rejects unknown keys and out-of-range values with a
:class:`~metascale.errors.SpecError` that names the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, TypeVar

from .errors import SpecError

T = TypeVar("T")


def check(kind: str, lo: float | None = None, hi: float | None = None, choices: tuple = ()) -> dict:
    """Field metadata declaring the accepted values of a config field."""
    return {"kind": kind, "lo": lo, "hi": hi, "choices": tuple(choices)}


def _allowed(meta: dict) -> str:
    kind, lo, hi, choices = meta["kind"], meta["lo"], meta["hi"], meta["choices"]
    if kind == "str":
        return "one of " + ", ".join(repr(c) for c in choices)
    if kind == "str_list":
        return "a non-empty list of distinct " + ("values from " + ", ".join(repr(c) for c in choices)
                                                   if choices else "names")
    if kind == "bool":
        return "true or false"
    rng = f"[{lo}, {hi}]"
    if kind == "interval":
        return f"a pair [lo, hi] with {lo} <= lo <= hi <= {hi}"
    if kind == "int_list":
        return f"a non-empty list of integers in {rng}"
    if kind == "float_list":
        return f"a non-empty list of numbers in {rng}"
    return f"{'an integer' if kind == 'int' else 'a number'} in {rng}"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _in(v: float, lo: float | None, hi: float | None) -> bool:
    return (lo is None or v >= lo) and (hi is None or v <= hi)


def _convert(value: Any, meta: dict) -> Any:
    """Return ``value`` converted to the field's type, or raise ``ValueError``."""
    kind, lo, hi = meta["kind"], meta["lo"], meta["hi"]
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or not _in(value, lo, hi):
            raise ValueError
        return value
    if kind == "float":
        if not _is_num(value) or not _in(float(value), lo, hi):
            raise ValueError
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError
        return value
    if kind == "str":
        if value not in meta["choices"]:
            raise ValueError
        return value
    if kind == "str_list":
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(x, str) and (x in meta["choices"] or not meta["choices"]) for x in value)
                or len(set(value)) != len(value)):
            raise ValueError
        return tuple(value)
    if kind == "interval":
        if (not isinstance(value, (list, tuple)) or len(value) != 2 or not all(map(_is_num, value))
                or not (_in(value[0], lo, hi) and _in(value[1], lo, hi) and value[0] <= value[1])):
            raise ValueError
        return (float(value[0]), float(value[1]))
    if kind in ("int_list", "float_list"):
        ok = (lambda x: isinstance(x, int) and not isinstance(x, bool)) if kind == "int_list" else _is_num
        if not isinstance(value, (list, tuple)) or not value or not all(ok(x) and _in(x, lo, hi) for x in value):
            raise ValueError
        return tuple(value) if kind == "int_list" else tuple(float(x) for x in value)
    raise TypeError(f"unknown field kind {kind!r}")  # a programming error, not bad input


def from_table(cls: type[T], table: Mapping[str, Any] | None, where: str) -> T:
    """Build dataclass ``cls`` from a TOML table, validating every key.

    Raises:
        SpecError: naming ``where`` (e.g. ``"tasks/sine.toml [family]"``), the key, and the
            allowed keys or values.
    """
    table = dict(table or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in table if k not in fields]
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(fields)}")
    kwargs = {}
    for key, value in table.items():
        meta = fields[key].metadata
        if "kind" not in meta:
            kwargs[key] = value
            continue
        try:
            kwargs[key] = _convert(value, meta)
        except ValueError:
            raise SpecError(f"{where}: {key} = {value!r} is not allowed; expected {_allowed(meta)}") from None
    obj = cls(**kwargs)
    post = getattr(obj, "validate", None)
    if post is not None:
        try:
            post()
        except ValueError as e:
            raise SpecError(f"{where}: {e}") from None
    return obj


def to_dict(obj: Any) -> dict:
    """A JSON-able dict of a dataclass config (tuples become lists; unset fields, ``None``,
    are left out, so :func:`from_table` gives them their default back)."""
    def conv(v):
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v
    return {k: conv(v) for k, v in dataclasses.asdict(obj).items() if v is not None}
