"""Encoding of stored values: the only module that uses msgpack.

Scalars and immutable containers are msgpack; the types msgpack lacks travel
as extension types. Decoding never executes code: it builds only the types
listed here. Lists, dicts and sets are not encoded here as whole values; the store
keeps each of them as a node of its own (see :mod:`redis_memory.ops`).
"""

from __future__ import annotations

import datetime as dt
import functools
import threading
from typing import Any
from zoneinfo import ZoneInfo

import msgpack

from .errors import UnsupportedValue

EXT_TUPLE = 1
EXT_SET = 2
EXT_FROZENSET = 3
EXT_DATETIME = 4
EXT_DATE = 5
EXT_BIGINT = 6

#: How many containers (lists, dicts, tuples, sets, frozensets) a stored value
#: may nest, counted from the attribute: deeper ones are refused when stored,
#: and stored data nested deeper (only corruption makes it) is CorruptData.
MAX_DEPTH = 100

#: Exact types a dict key, and each element of a tuple or frozenset key, may
#: have: keys equal in Python must encode to the same bytes in every process.
#: Floats and bools are refused because they compare equal to ints
#: (``(1,) == (1.0,) == (True,)``) yet encode differently; so are aware
#: datetimes (equal instants in other zones); naive ones are stored with
#: ``fold=0``, which equality ignores.
KEY_TYPES = (str, bytes, int, type(None), tuple, frozenset, dt.date, dt.datetime)
#: Types stored as one encoded value. Lists, dicts and sets are nodes instead (see ops.py).
SCALAR_TYPES = (type(None), bool, int, float, str, bytes, tuple, frozenset, dt.date, dt.datetime)


def _default(obj: Any) -> Any:
    kind = type(obj)
    if kind is tuple:
        for element in obj:
            # Changes to a list, dict or set inside a tuple could not be
            # observed: this process's copy would drift from the server's.
            if isinstance(element, (list, dict, set)):
                raise UnsupportedValue(
                    f"cannot store a tuple holding a {type(element).__name__}; use a list, or a tuple of scalars"
                )
        return msgpack.ExtType(EXT_TUPLE, _pack(list(obj)))
    if kind is set:
        return msgpack.ExtType(EXT_SET, _pack(list(obj)))
    if kind is frozenset:
        # Elements in the order of their bytes, not of their hashes (which
        # depend on the process's hash seed): equal frozensets, equal bytes.
        return msgpack.ExtType(EXT_FROZENSET, _array(sorted(_pack(element) for element in obj)))
    if kind is dt.datetime:
        zone = obj.tzinfo.key if isinstance(obj.tzinfo, ZoneInfo) else None
        parts = [obj.isoformat(), zone, obj.fold]
        tz = obj.tzinfo
        if type(tz) is dt.timezone and tz.tzname(None) != dt.timezone(tz.utcoffset(None)).tzname(None):
            parts.append(tz.tzname(None))  # a fixed offset with a name of its own ("CET")
        return msgpack.ExtType(EXT_DATETIME, _pack(parts))
    if kind is dt.date:
        return msgpack.ExtType(EXT_DATE, obj.isoformat().encode())
    if kind is int:
        return msgpack.ExtType(EXT_BIGINT, obj.to_bytes(obj.bit_length() // 8 + 1, "big", signed=True))
    raise UnsupportedValue(
        f"cannot store a value of type {kind.__module__}.{kind.__qualname__}; "
        "supported: None, bool, int, float, str, bytes, list, dict, tuple, set, "
        "frozenset, datetime, date"
    )


def _pack(value: Any) -> bytes:
    try:
        packed: bytes = msgpack.packb(value, default=_default, use_bin_type=True, strict_types=True)
        return packed
    except UnsupportedValue:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise UnsupportedValue(f"cannot store this {type(value).__name__}: {exc}") from exc


def _array(packed: list[bytes]) -> bytes:
    """A msgpack array of already packed elements."""
    n = len(packed)
    if n < 16:
        head = bytes((0x90 | n,))
    else:
        head = b"\xdc" + n.to_bytes(2, "big") if n < 2**16 else b"\xdd" + n.to_bytes(4, "big")
    return head + b"".join(packed)


def _ext_hook(code: int, data: bytes, depth: int) -> Any:
    if code in _COLLECTIONS:
        # Each level is a nested unpackb call: counted, so that corrupt data
        # cannot exhaust the stack (which crashes the interpreter).
        if depth >= MAX_DEPTH:
            raise ValueError(f"containers nested more than {MAX_DEPTH} deep")
        elements = _unpack(data, depth + 1)
        if type(elements) is not list or any(type(e) is list or type(e) is dict for e in elements):
            raise ValueError("a tuple, set or frozenset must be an array of scalars")
        return _COLLECTIONS[code](elements)
    if code == EXT_DATETIME:
        iso, zone, fold, *named = msgpack.unpackb(data, raw=False)  # no hook: nothing nested to decode
        value = dt.datetime.fromisoformat(iso)
        if zone is not None:
            value = value.replace(tzinfo=ZoneInfo(zone))
        elif named and (offset := value.utcoffset()) is not None:
            value = value.replace(tzinfo=dt.timezone(offset, named[0]))
        return value.replace(fold=fold)
    if code == EXT_DATE:
        return dt.date.fromisoformat(data.decode())
    if code == EXT_BIGINT:
        return int.from_bytes(data, "big", signed=True)
    raise ValueError(f"unknown extension type {code}")


_COLLECTIONS: dict[int, type] = {EXT_TUPLE: tuple, EXT_SET: set, EXT_FROZENSET: frozenset}
#: The extension hook for each depth of nested tuples, sets and frozensets.
_HOOKS = [functools.partial(_ext_hook, depth=depth) for depth in range(MAX_DEPTH + 1)]


def _unpack(data: bytes, depth: int = 0) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_HOOKS[depth], use_list=True)


_NESTED = (list, dict, tuple, set, frozenset)


def nesting(value: Any) -> int:
    """How many containers deep ``value`` nests (a scalar: 0), counted up to MAX_DEPTH + 1: O(size)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, _NESTED):
            if level > deepest:
                deepest = level
                if level > MAX_DEPTH:
                    break  # deep enough to refuse (or a container that holds itself)
            stack.extend((element, level + 1) for element in (value.values() if isinstance(value, dict) else value))
    return deepest


#: Immutable types whose decoded form is an equal object of the same type,
#: so the replica may keep the object it was given.
SIMPLE_TYPES = frozenset({type(None), bool, int, float, str, bytes})
_local = threading.local()


def encode(value: Any) -> bytes:
    """Encode a scalar or immutable container; raise UnsupportedValue otherwise."""
    kind = type(value)
    if kind in SIMPLE_TYPES and (kind is not int or -(2**63) <= value < 2**64):
        packer = getattr(_local, "packer", None)
        if packer is None:
            packer = _local.packer = msgpack.Packer(use_bin_type=True, strict_types=True)
        try:
            packed: bytes = packer.pack(value)
        except UnicodeEncodeError as exc:  # a lone surrogate in a str
            _local.packer = None  # its buffer may hold part of the value
            raise UnsupportedValue(f"cannot store this str: {exc}") from exc
        return packed
    if kind not in SCALAR_TYPES:
        _default(value)  # raises with the type's name
    if nesting(value) > MAX_DEPTH:
        raise UnsupportedValue(f"cannot store a value nested more than {MAX_DEPTH} containers deep")
    return _pack(value)


def detached(value: Any) -> Any:
    """What a reader decodes for ``value``: the value itself if simple, else a copy."""
    return value if type(value) in SIMPLE_TYPES else decode(encode(value))


def decode(data: bytes) -> Any:
    """Decode what :func:`encode` produced; any failure is a ValueError."""
    try:
        value = _unpack(data)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ValueError(f"undecodable value: {exc}") from exc
    if type(value) is list or type(value) is dict:
        # encode() makes none: it would be a list or dict whose changes nobody sees.
        raise ValueError("a stored scalar is a msgpack array or map")
    return value


def _canonical_key(key: Any, depth: int = 0) -> Any:
    """``key`` as it is stored (see :data:`KEY_TYPES`): O(size of the key); UnsupportedValue if it cannot be one."""
    kind = type(key)
    if kind not in KEY_TYPES:
        raise UnsupportedValue(
            f"cannot use a key holding a {kind.__qualname__}; dict keys (and the elements of tuple and "
            "frozenset keys) must be str, bytes, int, None, tuple, frozenset, date or naive datetime"
        )
    if kind is dt.datetime:
        if key.tzinfo is not None:
            raise UnsupportedValue("cannot use an aware datetime as a dict key: equal instants in other zones differ")
        return key.replace(fold=0) if key.fold else key
    if kind is tuple or kind is frozenset:
        if depth >= MAX_DEPTH:
            raise UnsupportedValue(f"cannot use a key nested more than {MAX_DEPTH} containers deep")
        elements = [_canonical_key(element, depth + 1) for element in key]
        if any(new is not old for new, old in zip(elements, key, strict=True)):
            return kind(elements)
    return key


def encode_key(key: Any) -> bytes:
    """Encode a dict key, the same bytes for keys equal in Python; UnsupportedValue for what cannot be a key."""
    return encode(_canonical_key(key))


def encode_whole(value: dict[Any, Any]) -> bytes:
    """Encode a dict whose values are all scalars (the caller checks) as one msgpack map.

    Its keys and values obey the same rules as those of a dict node, and
    decoding gives back an equal dict in the same order.
    """
    for key in value:
        if type(key) is not str and _canonical_key(key) is not key:
            value = {_canonical_key(k): v for k, v in value.items()}
            break
    packer = getattr(_local, "whole_packer", None)
    if packer is None:
        packer = _local.whole_packer = msgpack.Packer(default=_default, use_bin_type=True, strict_types=True)
    try:
        packed: bytes = packer.pack(value if type(value) is dict else dict(value))
    except UnsupportedValue:
        _local.whole_packer = None  # its buffer may hold part of the value
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        _local.whole_packer = None
        raise UnsupportedValue(f"cannot store this dict: {exc}") from exc
    return packed


def decode_whole(data: bytes) -> dict[Any, Any]:
    """Decode what :func:`encode_whole` produced; any failure is a ValueError."""
    try:
        value = _unpack(data)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ValueError(f"undecodable value: {exc}") from exc
    if type(value) is not dict:
        raise ValueError("a dict stored whole must be a map")
    for element in value.values():  # a loop: twice as fast as any() here
        if type(element) is list or type(element) is dict:
            raise ValueError("a dict stored whole must hold scalars only")
    return value


def decode_key(data: bytes) -> Any:
    """Decode a dict key produced by :func:`encode_key`."""
    return decode(data)


def encode_record(record: list[Any]) -> bytes:
    """A spool record (lists, ints and bytes only), as plain msgpack."""
    packed: bytes = msgpack.packb(record, use_bin_type=True)
    return packed


def decode_record(data: bytes) -> list[Any]:
    """Decode a spool record; any failure is a ValueError."""
    try:
        record = msgpack.unpackb(data, raw=True, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ValueError(f"undecodable spool record: {exc}") from exc
    if not isinstance(record, list):
        raise ValueError("a spool record must be a list")
    return record
