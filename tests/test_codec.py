"""The codec: msgpack plus extension types; nothing that executes code."""

from __future__ import annotations

import datetime as dt
import pickle
from typing import Any
from zoneinfo import ZoneInfo

import msgpack
import pytest
from hypothesis import given
from strategies import keys, near_depth_limit, same, scalars

from redis_memory import UnsupportedValue, codec


@given(scalars)
def test_scalars_round_trip_with_their_types(value: Any) -> None:
    """Every supported scalar decodes to an equal value of the same type."""
    assert same(codec.decode(codec.encode(value)), value)


def test_zoned_datetimes_keep_their_zone_and_fold() -> None:
    """A datetime in a named zone comes back in that zone, ambiguous hours included."""
    value = dt.datetime(2021, 11, 7, 1, 30, tzinfo=ZoneInfo("America/New_York"), fold=1)
    back = codec.decode(codec.encode(value))
    assert back.tzinfo == value.tzinfo and back.fold == 1 and back.utcoffset() == value.utcoffset()


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 10**40, -(10**40)])
def test_ints_of_any_size(value: int) -> None:
    """Integers beyond 64 bits round-trip exactly."""
    assert codec.decode(codec.encode(value)) == value


@pytest.mark.parametrize("value", [object(), 1j, dt.timedelta(1), type("S", (str,), {})("x"), range(3)])
def test_other_types_raise_type_error(value: Any) -> None:
    """Anything outside the supported types raises UnsupportedValue, a TypeError."""
    with pytest.raises(TypeError):
        codec.encode(value)
    with pytest.raises(UnsupportedValue):
        codec.encode((1, value))


def test_decoding_never_unpickles() -> None:
    """A pickle stored in place of a value is not executed, only rejected or read as data."""
    payload = pickle.dumps(object())
    try:
        decoded = codec.decode(payload)
    except ValueError:
        return
    assert not isinstance(decoded, object.__class__)


def test_unknown_extension_is_a_value_error() -> None:
    """Undecodable bytes raise ValueError (the replica turns it into CorruptData)."""
    with pytest.raises(ValueError):
        codec.decode(b"\xc7\x01\x63\x00")
    with pytest.raises(ValueError):
        codec.decode(b"\xd9")


@pytest.mark.parametrize("value", [(1, [2]), (1, {"a": 1}), (1, {2}), (((1, [2]),),)])
def test_tuples_holding_mutable_containers_are_refused(value: Any) -> None:
    """A tuple holding a list, dict or set, at any depth, cannot be encoded."""
    with pytest.raises(UnsupportedValue):
        codec.encode(value)


def test_equal_frozensets_encode_alike_whatever_their_iteration_order() -> None:
    """Equal frozensets give the same bytes, as keys and as values, though they iterate differently."""
    first, second = frozenset([8, 16, "a", (1, "b")]), frozenset([16, 8, (1, "b"), "a"])
    assert list(first) != list(second) and first == second
    assert codec.encode_key(first) == codec.encode_key(second)
    assert codec.encode(first) == codec.encode(second)
    assert codec.encode((first, 1)) == codec.encode((second, 1))
    assert codec.decode(codec.encode_key(first)) == first


@pytest.mark.parametrize(
    "key", [(1.0,), (True,), frozenset({0.5}), (1, (2, False)), dt.datetime(2024, 1, 1, tzinfo=dt.UTC)]
)
def test_keys_with_floats_bools_or_aware_datetimes_are_refused(key: Any) -> None:
    """Keys that equal others with another encoding ((1.0,) == (1,) == (True,)) cannot be encoded."""
    with pytest.raises(UnsupportedValue):
        codec.encode_key(key)


@given(keys)
def test_keys_round_trip_to_an_equal_key_with_the_same_bytes(key: Any) -> None:
    """A decoded key equals the key, and encodes to the same bytes (fold and element order aside)."""
    data = codec.encode_key(key)
    back = codec.decode_key(data)
    assert back == key and type(back) is type(key) and codec.encode_key(back) == data


@pytest.mark.parametrize("kinds", [[tuple], [frozenset], [tuple, frozenset]])
def test_tuples_and_frozensets_nest_to_the_limit(kinds: list[Any]) -> None:
    """MAX_DEPTH levels of tuples and frozensets round-trip; deeper ones are refused, however deep."""

    def nested(depth: int) -> Any:
        value: Any = "x"
        for level in range(depth):
            kind = kinds[level % len(kinds)]
            value = kind([value])
        return value

    assert codec.decode(codec.encode(nested(codec.MAX_DEPTH))) == nested(codec.MAX_DEPTH)
    assert codec.decode_key(codec.encode_key(nested(codec.MAX_DEPTH))) == nested(codec.MAX_DEPTH)
    for depth in (codec.MAX_DEPTH + 1, 600):
        with pytest.raises(UnsupportedValue):
            codec.encode(nested(depth))
        with pytest.raises(UnsupportedValue):
            codec.encode_key(nested(depth))


@pytest.mark.parametrize("depth", [codec.MAX_DEPTH + 1, 5000])
def test_decoding_deeply_nested_data_is_a_value_error(depth: int) -> None:
    """Tuples or arrays nested past the limit decode to ValueError, never a RecursionError or a crash."""
    data = msgpack.packb("x")
    for _ in range(depth):
        data = msgpack.packb(msgpack.ExtType(codec.EXT_TUPLE, b"\x91" + data))
    with pytest.raises(ValueError):
        codec.decode(data)
    with pytest.raises(ValueError):
        codec.decode(b"\x91" * depth + b"\xc0")
    for code in (codec.EXT_TUPLE, codec.EXT_DATETIME):  # a datetime's payload is never decoded as nested values
        data = msgpack.packb("x")
        for _ in range(depth):
            data = msgpack.packb(msgpack.ExtType(code, b"\x93" + data + b"\xc0\x00"))
        with pytest.raises(ValueError):
            codec.decode(data)


def test_a_stored_scalar_is_never_a_bare_list_or_map() -> None:
    """A msgpack array or map where a scalar is stored is a ValueError: it would be an unobserved list or dict."""
    for data in (msgpack.packb([1]), msgpack.packb({"a": 1})):
        with pytest.raises(ValueError):
            codec.decode(data)


@given(near_depth_limit)
def test_nesting_counts_every_container(drawn: tuple[Any, int]) -> None:
    """codec.nesting counts lists, dicts, tuples and frozensets alike (and stops one past the limit)."""
    value, depth = drawn
    assert codec.nesting(value) == min(depth, codec.MAX_DEPTH + 1)
