"""A lossless JSON form of stored values, and the export documents of the ``redis-memory`` command.

JSON has no tuple, set, bytes or datetime, and its object keys are strings,
so values that JSON cannot say as they are become tagged objects, each with
a ``"$type"`` key:

=================  =====================================================
Python             JSON
=================  =====================================================
None, bool, str    themselves
int                itself (any size)
float              itself; NaN and the infinities: ``{"$type": "float", "value": "nan"}``
list               an array
dict               an object, if every key is a str and none is ``"$type"``;
                   else ``{"$type": "dict", "items": [[key, value], ...]}``
tuple              ``{"$type": "tuple", "items": [...]}``
set, frozenset     ``{"$type": "set", "items": [...]}`` (``"frozenset"``), sorted
bytes              ``{"$type": "bytes", "base64": "..."}``
datetime           ``{"$type": "datetime", "iso": "...", "zone": "Europe/Paris", "fold": 0}``
                   (``zone`` a zoneinfo key or null; ``tzname`` for a named fixed offset)
date               ``{"$type": "date", "iso": "2026-12-01"}``
=================  =====================================================

An export document is one JSON object: ``{"redis_memory_export": 1, "kind":
..., "id": ..., "attributes": {...}}`` for a memory or conversation, and for
a session ``"shared"`` and ``"agents"`` (agent name to attributes) in place
of ``"attributes"``. Attribute names are object keys; values are in the
form above. :func:`read_document` checks all of it, and that every value
can be stored, before anything is written.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import math
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from . import ops
from .errors import InvalidExport, UnsupportedValue

#: The format version written in every export document.
FORMAT = 1
_TAG = "$type"


def to_json(value: Any) -> Any:
    """``value`` (plain, or read from a memory) as JSON-ready data, tagged where JSON has no such type: O(size)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else {_TAG: "float", "value": repr(value)}
    if isinstance(value, list):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        if all(type(key) is str and key != _TAG for key in value):
            return {key: to_json(item) for key, item in value.items()}
        return {_TAG: "dict", "items": [[to_json(key), to_json(item)] for key, item in value.items()]}
    if isinstance(value, tuple):
        return {_TAG: "tuple", "items": [to_json(item) for item in value]}
    if isinstance(value, (set, frozenset)):
        items = sorted((to_json(item) for item in value), key=lambda item: json.dumps(item, sort_keys=True))
        return {_TAG: "frozenset" if isinstance(value, frozenset) else "set", "items": items}
    if isinstance(value, bytes):
        return {_TAG: "bytes", "base64": base64.b64encode(value).decode()}
    if isinstance(value, dt.datetime):
        return _datetime_to_json(value)
    if isinstance(value, dt.date):
        return {_TAG: "date", "iso": value.isoformat()}
    raise UnsupportedValue(f"cannot export a value of type {type(value).__qualname__}")


def _datetime_to_json(value: dt.datetime) -> dict[str, Any]:
    tz = value.tzinfo
    found: dict[str, Any] = {_TAG: "datetime", "iso": value.isoformat(), "zone": None, "fold": value.fold}
    if isinstance(tz, ZoneInfo):
        found["zone"] = tz.key
    elif type(tz) is dt.timezone and tz.tzname(None) != dt.timezone(tz.utcoffset(None)).tzname(None):
        found["tzname"] = tz.tzname(None)  # a fixed offset with a name of its own ("CET")
    return found


def from_json(data: Any, where: str = "value") -> Any:
    """The value :func:`to_json` made ``data`` from; InvalidExport (naming ``where``) for anything else."""
    if data is None or isinstance(data, (bool, str, int)):
        return data
    if isinstance(data, float):
        return data
    if isinstance(data, list):
        return [from_json(item, f"{where}[{n}]") for n, item in enumerate(data)]
    if not isinstance(data, dict):
        raise InvalidExport(f"{where}: {type(data).__name__} is not a JSON value")
    if _TAG not in data:
        return {key: from_json(item, f"{where}.{key}") for key, item in data.items()}
    try:
        return _tagged(data, where)
    except InvalidExport:
        raise
    except (KeyError, TypeError, ValueError, binascii.Error, ZoneInfoNotFoundError) as exc:
        raise InvalidExport(f"{where}: a malformed {data.get(_TAG)!r} value: {exc}") from None


def _tagged(data: dict[str, Any], where: str) -> Any:
    tag = data[_TAG]
    if tag == "float":
        number = float(data["value"])
        if math.isfinite(number):
            raise ValueError("a tagged float must be nan or infinite")
        return number
    if tag in ("tuple", "set", "frozenset"):
        items = data["items"]
        if not isinstance(items, list):
            raise TypeError("items must be an array")
        decoded = [from_json(item, f"{where}[{n}]") for n, item in enumerate(items)]
        return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](decoded)
    if tag == "dict":
        pairs = data["items"]
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise TypeError("items must be an array of [key, value] pairs")
        return {from_json(k, f"{where} key"): from_json(v, f"{where}[{k!r}]") for k, v in pairs}
    if tag == "bytes":
        return base64.b64decode(data["base64"], validate=True)
    if tag == "datetime":
        value = dt.datetime.fromisoformat(data["iso"])
        if data.get("zone") is not None:
            value = value.replace(tzinfo=ZoneInfo(data["zone"]))
        elif data.get("tzname") is not None and (offset := value.utcoffset()) is not None:
            value = value.replace(tzinfo=dt.timezone(offset, data["tzname"]))
        return value.replace(fold=int(data.get("fold", 0)))
    if tag == "date":
        return dt.date.fromisoformat(data["iso"])
    raise InvalidExport(f"{where}: unknown $type {tag!r}")


def document(
    kind: str,
    identifier: str,
    attributes: dict[str, Any] | None = None,
    shared: dict[str, Any] | None = None,
    agents: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """An export document: ``attributes`` for a memory, or ``shared`` and ``agents`` for a session."""
    found: dict[str, Any] = {"redis_memory_export": FORMAT, "kind": kind, "id": identifier}
    if attributes is not None:
        found["attributes"] = to_json(attributes)
    else:
        found["shared"] = to_json(shared or {})
        found["agents"] = {name: to_json(values) for name, values in (agents or {}).items()}
    return found


def read_document(text: str, session: bool) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The attributes of an export (its shared ones, for a session) and its agents' ones, each value checked.

    InvalidExport if the text is not an export document of that shape, or a
    value cannot be stored (the same checks as an assignment makes).
    """
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidExport(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("redis_memory_export") != FORMAT:
        raise InvalidExport(f"not a redis-memory export (format {FORMAT})")
    if session != ("shared" in data):
        wanted, found = ("a session", "a memory") if session else ("a memory", "a session")
        raise InvalidExport(f"the file holds {found}'s export, not {wanted}'s")
    if session:
        shared = _attributes(data.get("shared"), "shared")
        agents = data.get("agents")
        if not isinstance(agents, dict):
            raise InvalidExport("agents: must be an object of agent name to attributes")
        return shared, {name: _attributes(values, f"agents.{name}") for name, values in agents.items()}
    return _attributes(data.get("attributes"), "attributes"), {}


def _attributes(data: Any, where: str) -> dict[str, Any]:
    try:
        found = from_json(data, where)
    except RecursionError:
        raise InvalidExport(f"{where}: nested too deep") from None
    if not isinstance(found, dict) or not all(type(name) is str for name in found):
        raise InvalidExport(f"{where}: must be an object of attribute name to value")
    for name, value in found.items():
        try:
            ops.check_depth(ops.encode_value(value).depth)
        except UnsupportedValue as exc:
            raise InvalidExport(f"{where}.{name}: cannot be stored: {exc}") from None
    return found
