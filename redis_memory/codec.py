"""Encoding of stored values: the only module that uses msgpack.

Scalars and immutable containers are msgpack; the types msgpack lacks travel
as extension types. Decoding never executes code: it builds only the types
listed here. Lists, dicts and sets are not encoded here as whole values; the store
keeps each of them as a node of its own (see :mod:`redis_memory.ops`).
"""

from __future__ import annotations

import datetime as dt
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

#: Exact types a dict key may have. Floats and bools are refused because they
#: compare equal to ints (``1 == 1.0 == True``) yet encode differently, so one
#: Python key could become several stored ones.
KEY_TYPES = (str, bytes, int, type(None), tuple, frozenset, dt.date, dt.datetime)
#: Types stored as one encoded value. Lists, dicts and sets are nodes instead (see ops.py).
SCALAR_TYPES = (type(None), bool, int, float, str, bytes, tuple, frozenset, dt.date, dt.datetime)


def _default(obj: Any) -> Any:
    kind = type(obj)
    if kind is tuple:
        return msgpack.ExtType(EXT_TUPLE, _pack(list(obj)))
    if kind is set:
        return msgpack.ExtType(EXT_SET, _pack(list(obj)))
    if kind is frozenset:
        return msgpack.ExtType(EXT_FROZENSET, _pack(list(obj)))
    if kind is dt.datetime:
        zone = obj.tzinfo.key if isinstance(obj.tzinfo, ZoneInfo) else None
        return msgpack.ExtType(EXT_DATETIME, _pack([obj.isoformat(), zone, obj.fold]))
    if kind is dt.date:
        return msgpack.ExtType(EXT_DATE, obj.isoformat().encode())
    if kind is int:
        return msgpack.ExtType(EXT_BIGINT, obj.to_bytes(obj.bit_length() // 8 + 1, "big", signed=True))
    # Proxies and other list/dict subclasses inside a tuple or set are stored
    # as the plain containers they are.
    if isinstance(obj, list):
        return list(obj)
    if isinstance(obj, dict):
        return dict(obj)
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


def _ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_TUPLE:
        return tuple(_unpack(data))
    if code == EXT_SET:
        return set(_unpack(data))
    if code == EXT_FROZENSET:
        return frozenset(_unpack(data))
    if code == EXT_DATETIME:
        iso, zone, fold = _unpack(data)
        value = dt.datetime.fromisoformat(iso)
        if zone is not None:
            value = value.replace(tzinfo=ZoneInfo(zone))
        return value.replace(fold=fold)
    if code == EXT_DATE:
        return dt.date.fromisoformat(data.decode())
    if code == EXT_BIGINT:
        return int.from_bytes(data, "big", signed=True)
    raise ValueError(f"unknown extension type {code}")


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_ext_hook, use_list=True)


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
    return _pack(value)


def detached(value: Any) -> Any:
    """What a reader decodes for ``value``: the value itself if simple, else a copy."""
    return value if type(value) in SIMPLE_TYPES else decode(encode(value))


def decode(data: bytes) -> Any:
    """Decode what :func:`encode` produced; any failure is a ValueError."""
    value = _decode_any(data)
    # encode() never writes a list or a dict (they are nodes): one found here
    # is corrupt data, and a plain copy of it would silently drop changes.
    if type(value) in (list, dict):
        raise ValueError(f"a msgpack {'array' if type(value) is list else 'map'} where a scalar is stored")
    return value


def decode_whole(data: bytes) -> dict[Any, Any]:
    """Decode what :func:`encode_whole` produced; ValueError if it is not a map."""
    value = _decode_any(data)
    if type(value) is not dict:
        raise ValueError("a dict stored whole must be a msgpack map")
    return value


def _decode_any(data: bytes) -> Any:
    try:
        return _unpack(data)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ValueError(f"undecodable value: {exc}") from exc


def _check_key(key: Any) -> None:
    if type(key) not in KEY_TYPES:
        raise UnsupportedValue(
            f"cannot use a key of type {type(key).__qualname__}; dict keys must be "
            "str, bytes, int, None, tuple, frozenset, date or datetime"
        )


def encode_key(key: Any) -> bytes:
    """Encode a dict key; raise UnsupportedValue for types that cannot be keys."""
    _check_key(key)
    return encode(key)


def encode_whole(value: dict[Any, Any]) -> bytes:
    """Encode a dict whose values are all scalars (the caller checks) as one msgpack map.

    Its keys and values obey the same rules as those of a dict node, and
    decoding gives back an equal dict in the same order.
    """
    for key in value:
        if type(key) not in KEY_TYPES:
            _check_key(key)
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
