"""Hypothesis strategies for stored values, and a type-exact deep comparison."""

from __future__ import annotations

import datetime as dt
from typing import Any

from hypothesis import strategies as st

from redis_memory import codec

_DAY = dt.datetime(2024, 11, 3)
#: Dict keys of every supported type, drawn from small pools so that keys repeat.
keys = st.one_of(
    st.text(max_size=3),
    st.integers(-3, 3),
    st.sampled_from([2**64, -(2**70), None, b"k"]),
    st.tuples(st.integers(0, 2)),
    st.tuples(st.sampled_from(["a", "b"]), st.frozensets(st.integers(0, 2), max_size=2)),
    st.frozensets(st.sampled_from(["read", "write", "admin", 8, 16]), max_size=4),
    st.dates(min_value=_DAY.date(), max_value=_DAY.date() + dt.timedelta(days=2)),
    st.builds(lambda hour, fold: _DAY.replace(hour=hour, fold=fold), st.integers(0, 2), st.integers(0, 1)),
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**64, max_value=2**80),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.tuples(st.integers(), st.text(max_size=3)),
    st.frozensets(st.integers(0, 9), max_size=3),
    st.sets(st.text(max_size=2), max_size=3),
    st.datetimes(timezones=st.none() | st.just(dt.UTC)),
    st.dates(),
)

values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=8,
)


_WRAP = {
    "tuple": lambda v: (v, 0),
    "frozenset": lambda v: frozenset({v, "s"}),
    "list": lambda v: [1, v],
    "dict": lambda v: {"k": v, "n": None},
}


def _nest(kinds: list[str], leaf: Any) -> tuple[Any, int]:
    # Tuples and frozensets go inside: they may not hold lists or dicts.
    value = leaf
    for kind in sorted(kinds, key=lambda k: k in ("list", "dict")):
        value = _WRAP[kind](value)
    return value, len(kinds)


#: A value and how many containers deep it nests, from two below to two past codec.MAX_DEPTH.
near_depth_limit = st.builds(
    _nest,
    st.lists(st.sampled_from(sorted(_WRAP)), min_size=codec.MAX_DEPTH - 2, max_size=codec.MAX_DEPTH + 2),
    st.integers() | st.text(max_size=3),
)


def same(a: Any, b: Any) -> bool:
    """Equal, with the same types (lists, dicts and sets by kind) and dict order."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a.keys()) == list(b.keys()) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, set) and isinstance(b, set):
        return a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (a != a and b != b)
    return bool(a == b)
