"""The index of the memories of one kind: listing and clean-up without KEYS or SCAN.

One sorted set per prefix and kind, ``<prefix>:<kind>:index`` (no braces,
so it never collides with a memory's key), scores each id by the time of
its last write, in seconds. A memory adds itself on its first write in a
process and on every write that creates it (again, perhaps after another
process deleted it), and refreshes its score at most every
:data:`INDEX_REFRESH` seconds, so a score may lag by that much. Listing idle
memories is therefore O(log n + result): a range of the sorted set, then
one HGET per candidate to check its real last activity. Entries whose
memory is gone (expired, or deleted elsewhere) are removed as they are met.

The index lives in one Redis Cluster slot of its own; it is written by
separate commands, not by the memories' scripts, so that those stay within
their own slot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, cast

import redis

from .connection import channel
from .store import command, escape_id

#: A memory refreshes its index entry at most this often (seconds).
INDEX_REFRESH = 30.0


class Listing(Protocol):
    """Where a memory keeps an entry while it exists: its kind's index, or its session's participant set."""

    def touch(self, identifier: str) -> None: ...

    def forget(self, identifier: str) -> None: ...


def index_key(prefix: str, kind: str) -> str:
    return f"{escape_id(prefix)}:{escape_id(kind)}:index"


class Catalog:
    """The index of one prefix and kind, on one client."""

    def __init__(self, client: redis.Redis, prefix: str, kind: str, key_of: Callable[[str], str]) -> None:
        self.channel = channel(client)
        self.key = index_key(prefix, kind)
        self.key_of = key_of  # memory id -> the key of its hash

    def _call(self, *args: bytes | str | int) -> object:
        return command(self.channel, self.key, *args)

    def last_activity(self, identifier: str) -> float | None:
        """HGET of a memory's last write (seconds since the epoch), None if it does not exist: O(1)."""
        return self.activity_of(self.key_of(identifier))

    def activity_of(self, key: str) -> float | None:
        """HGET of the last write of the memory at ``key``: O(1)."""
        active = cast(bytes | None, command(self.channel, key, "HGET", key, "ta"))
        return int(active) / 1000 if active is not None else None

    def touch(self, identifier: str) -> None:
        """ZADD with the current time: O(log n)."""
        self._call("ZADD", self.key, repr(time.time()), identifier)

    def forget(self, identifier: str) -> None:
        """ZREM, then HGET of the memory: O(log n).

        A memory written again by another process between its deletion and
        this ZREM would be left out of the index for good (its writer adds
        it again only when its write created it, which came first): such
        an entry is put back.
        """
        self._call("ZREM", self.key, identifier)
        active = self.last_activity(identifier)
        if active is not None:
            self._call("ZADD", self.key, repr(active), identifier)

    def count(self) -> int:
        """ZCARD: O(1)."""
        return int(cast(int, self._call("ZCARD", self.key)))

    def ids(self, idle_for: float | None = None, limit: int | None = None) -> list[str]:
        """Ids of existing memories, oldest activity first; with ``idle_for``, only those idle that long.

        O(log n + result): a ZRANGEBYSCORE, then one HGET per candidate.
        """
        if idle_for is not None and idle_for < 0:
            raise ValueError(f"idle_for must be >= 0, not {idle_for!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit!r}")
        cutoff = time.time() - idle_for if idle_for is not None else float("inf")
        found: list[str] = []
        start = 0
        page = limit or 100
        while limit is None or len(found) < limit:
            candidates = cast(
                list[bytes], self._call("ZRANGEBYSCORE", self.key, "-inf", repr(cutoff), "LIMIT", start, page)
            )
            if not candidates:
                break
            start += len(candidates)
            for raw in candidates:
                identifier = raw.decode()
                active = self.last_activity(identifier)
                if active is None:
                    self.forget(identifier)  # expired or deleted
                    start -= 1
                elif active > cutoff:
                    self._call("ZADD", self.key, repr(active), raw)  # the score lagged
                    start -= 1
                else:
                    found.append(identifier)
                    if limit is not None and len(found) == limit:
                        break
        return found
