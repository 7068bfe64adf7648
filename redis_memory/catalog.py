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

The index is written by separate commands, not by the memories' scripts,
so that those stay within their own slot. On a Redis Cluster it is split
into :data:`INDEX_PARTS` sorted sets, ``<prefix>:<kind>:index:{<n>}``, each
in a slot of its own (so spread over the masters), and a memory's entry
lives in the part its id hashes to: no node holds every entry or takes
every index write. Listing merges the parts by score; counting adds up
their sizes.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from typing import Protocol, cast

from .connection import Client, channel
from .errors import ConnectionFailed
from .store import command, escape_id

#: A memory refreshes its index entry at most this often (seconds).
INDEX_REFRESH = 30.0
#: How many sorted sets an index is split into on a Redis Cluster.
INDEX_PARTS = 16


class Listing(Protocol):
    """Where a memory keeps an entry while it exists: its kind's index, or its session's participant set."""

    def touch(self, identifier: str) -> None: ...

    def forget(self, identifier: str) -> None: ...


def index_key(prefix: str, kind: str) -> str:
    return f"{escape_id(prefix)}:{escape_id(kind)}:index"


class Catalog:
    """The index of one prefix and kind, on one client."""

    def __init__(self, client: Client, prefix: str, kind: str, key_of: Callable[[str], str]) -> None:
        self.channel = channel(client)
        self.key = index_key(prefix, kind)
        self.key_of = key_of  # memory id -> the key of its hash

    def parts(self) -> list[str]:
        """The sorted sets of this index: one, or :data:`INDEX_PARTS` on a cluster."""
        if self.channel.is_cluster():
            return [f"{self.key}:{{{n}}}" for n in range(INDEX_PARTS)]
        return [self.key]

    def part_of(self, identifier: str) -> str:
        """The sorted set holding the entry of ``identifier``."""
        parts = self.parts()
        return parts[zlib.crc32(identifier.encode()) % len(parts)] if len(parts) > 1 else parts[0]

    def last_activity(self, identifier: str) -> float | None:
        """HGET of a memory's last write (seconds since the epoch), None if it does not exist: O(1)."""
        return self.activity_of(self.key_of(identifier))

    def activity_of(self, key: str) -> float | None:
        """HGET of the last write of the memory at ``key``: O(1)."""
        active = cast(bytes | None, command(self.channel, key, "HGET", key, "ta"))
        return int(active) / 1000 if active is not None else None

    def touch(self, identifier: str) -> None:
        """ZADD with the current time: O(log n)."""
        part = self.part_of(identifier)
        command(self.channel, part, "ZADD", part, repr(time.time()), identifier)

    def forget(self, identifier: str) -> None:
        """ZREM, then HGET of the memory: O(log n).

        A memory written again by another process between its deletion and
        this ZREM would be left out of the index for good (its writer adds
        it again only when its write created it, which came first): such
        an entry is put back.
        """
        part = self.part_of(identifier)
        command(self.channel, part, "ZREM", part, identifier)
        active = self.last_activity(identifier)
        if active is not None:
            command(self.channel, part, "ZADD", part, repr(active), identifier)

    def count(self) -> int:
        """ZCARD of each part: O(1) per part."""
        return sum(int(cast(int, command(self.channel, part, "ZCARD", part))) for part in self.parts())

    def ids(self, idle_for: float | None = None, limit: int | None = None) -> list[str]:
        """Ids of existing memories, oldest activity first; with ``idle_for``, only those idle that long.

        O(log n + result) per part: a ZRANGEBYSCORE per page of each part,
        merged by score, then one HGET per candidate.
        """
        if idle_for is not None and idle_for < 0:
            raise ValueError(f"idle_for must be >= 0, not {idle_for!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit!r}")
        cutoff = time.time() - idle_for if idle_for is not None else float("inf")
        cursors = [_Cursor(self, part, cutoff, limit or 100) for part in self.parts()]
        found: list[str] = []
        while limit is None or len(found) < limit:
            heads = [(head, n) for n, cursor in enumerate(cursors) if (head := cursor.peek()) is not None]
            if not heads:
                break
            (_, raw), n = min(heads)
            cursor = cursors[n]
            cursor.pop()
            identifier = raw.decode()
            active = self.last_activity(identifier)
            if active is None:
                self.forget(identifier)  # expired or deleted
                cursor.removed()
            elif active > cutoff:
                command(self.channel, cursor.key, "ZADD", cursor.key, repr(active), raw)  # the score lagged
                cursor.removed()
            else:
                found.append(identifier)
        return found


class _Cursor:
    """Entries of one part scored up to a cutoff, lowest first, read a page at a time."""

    def __init__(self, catalog: Catalog, key: str, cutoff: float, page: int) -> None:
        self.catalog, self.key, self.cutoff, self.page = catalog, key, cutoff, page
        self.start = 0  # entries of the range before the next page
        self.buffer: list[tuple[float, bytes]] = []
        self.done = False

    def peek(self) -> tuple[float, bytes] | None:
        if not self.buffer and not self.done:
            reply = cast(
                list[object],
                command(
                    self.catalog.channel, self.key, "ZRANGEBYSCORE", self.key, "-inf", repr(self.cutoff),
                    "WITHSCORES", "LIMIT", self.start, self.page,
                ),
            )  # fmt: skip
            try:
                pairs = _pairs(reply)
            except (AttributeError, IndexError, TypeError, ValueError):
                self.catalog.channel.close()  # out of step, or not Redis
                message = f"the reply to ZRANGEBYSCORE on {self.key} is none Redis sends ({reply!r:.60})"
                raise ConnectionFailed(message, key=self.key) from None
            self.start += len(pairs)
            self.buffer = pairs[::-1]
            self.done = not pairs
        return self.buffer[-1] if self.buffer else None

    def pop(self) -> None:
        self.buffer.pop()

    def removed(self) -> None:
        """The entry just taken left the range (removed, or scored past the cutoff): later ones move up."""
        self.start -= 1


def _pairs(reply: list[object]) -> list[tuple[float, bytes]]:
    """(score, member) pairs of a WITHSCORES reply: a flat list (RESP2) or a list of pairs (RESP3).

    TypeError or ValueError for a reply of another shape.
    """
    if not isinstance(reply, list):
        raise TypeError(f"not a list: {reply!r:.40}")
    if reply and isinstance(reply[0], list):
        pairs = [(float(cast(bytes, score)), cast(bytes, member)) for member, score in cast(list[list[object]], reply)]
    else:
        flat = zip(reply[::2], reply[1::2], strict=True)
        pairs = [(float(cast(bytes, score)), cast(bytes, member)) for member, score in flat]
    if not all(isinstance(member, bytes) for _, member in pairs):
        raise TypeError("a member that is not a string")
    return pairs
