"""Server-assisted invalidation (``tracking=True``): when a replica may be served without a round trip.

A tracked memory talks to Redis over a connection of its own kind: RESP3,
with ``CLIENT TRACKING ON``. The server then remembers every key a command
on that connection read (the version check, the sync and apply functions
all read the memory's hash), and when the key changes it pushes an
``invalidate`` message down this very connection. The messages ride the
connection the replies come on, so no thread listens: before serving a read
without asking the server, the reader looks at what the socket holds (one
``poll``), and applies every invalidation that has arrived.

A replica keeps a *mark* (:meth:`Tracker.mark`): the connection's epoch, how
many times the server said "everything changed", and how many invalidations
its key has had. The mark is taken *before* the round trip that made the
replica exact, so an invalidation that crosses that round trip voids it. A
read serves the replica without a round trip only if its mark is still the
current one, and for :data:`TRUST_SECONDS` at most. A (re)opened or closed
connection moves the epoch, which voids every mark (the server forgot what
it tracked); the age limit bounds what sends no message at all (a
partition that drops everything, SWAPDB, a key past its expiry that the
server has not deleted yet).

This process's own writes are invalidated too (NOLOOP is not used: with it,
the server also drops the invalidations of keys it evicts from its tracking
table, or from memory, while it runs this connection's command). An apply
call reads the hash before its first write, so the server tracks it then,
and the write sends exactly one invalidation, *after* the call's reply
(Redis 7.0 and Valkey defer a connection's own invalidations so). The
reply says whether the call modified the hash; if no other invalidation of
the key came before that reply, the next one is this call's own and is
expected (:meth:`Tracker.expect`), not counted. In every other case an own
write counts as any other, which only costs a version check. A tracked
connection calls the ``apply_tracked`` function, which reads the hash once
more as its last step, so the server tracks it still.

A write over any other connection of the process (an untracked memory's,
another client's) is reported to every tracker of the process as soon as
its reply is read (:func:`wrote_elsewhere`), so a tracked read after it
never waits for the server's invalidation.

The window in which a read can miss another process's completed write is
the time the invalidation takes from the server to this socket: the server
queues it when it applies the write, before the writer has its reply. See
docs/design.md for what was measured.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import redis

#: A replica's mark: (epoch, flushes, invalidations of its key).
Mark = tuple[int, int, int]
#: What a replica keeps: its mark, and when it was taken (time.monotonic()).
Seen = tuple[Mark, float]
#: How many keys' invalidation counts are kept; beyond it they are forgotten and every mark voided.
MAX_COUNTED_KEYS = 50_000
#: How long a mark is trusted (seconds): after it, a read checks the version once more. What
#: sends no invalidation (a partition that drops everything without closing the connection,
#: SWAPDB, a key past its expiry that the server has not deleted yet) is seen within it.
TRUST_SECONDS = 1.0


#: Every tracker of the process: each learns of the process's writes on other connections.
_TRACKERS: weakref.WeakSet[Tracker] = weakref.WeakSet()
#: Held to add to the set or copy it: a set iterated while another thread adds to it raises.
_TRACKERS_LOCK = threading.Lock()


def wrote_elsewhere(key: bytes, by: Tracker | None = None) -> None:
    """This process changed ``key`` over a connection other than each tracker's own (``by``'s excepted).

    Every other tracker voids its marks of the key: its next read checks the
    version, instead of waiting for the server's invalidation to arrive.
    """
    if _TRACKERS:
        with _TRACKERS_LOCK:
            trackers = list(_TRACKERS)
        for tracker in trackers:
            if tracker is not by:
                tracker.changed(key)


def after_fork() -> None:
    """In a forked child: locks nobody holds (one another thread held at the fork stays held in the child)."""
    global _TRACKERS_LOCK
    _TRACKERS_LOCK = threading.Lock()
    for tracker in list(_TRACKERS):
        tracker.lock = threading.Lock()


class Tracker:
    """The invalidations one tracked connection has received, as marks replicas compare against.

    Pushes are read by the thread that holds the channel's lock; a writer
    settles its own write after releasing it. So every change and every mark
    is made under the tracker's own lock: a mark is never built halfway
    through another thread's change.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: Whether the server tracks for this connection (None: not asked yet; False: it cannot).
        self.enabled: bool | None = None
        self.epoch = 0
        self.flushes = 0
        self.counts: dict[bytes, int] = {}
        #: Invalidations still to come of this process's own writes, by key: not counted.
        self.expected: dict[bytes, int] = {}
        #: How many invalidation messages arrived (for tests and the benchmark).
        self.received = 0
        with _TRACKERS_LOCK:
            _TRACKERS.add(self)

    def mark(self, key: bytes) -> Seen:
        with self.lock:
            return (self.epoch, self.flushes, self.counts.get(key, 0)), time.monotonic()

    def trusted(self, key: bytes, seen: Seen) -> bool:
        """Whether ``seen`` is still the current mark of ``key``, and younger than :data:`TRUST_SECONDS`."""
        mark, taken = seen
        with self.lock:
            current = (self.epoch, self.flushes, self.counts.get(key, 0))
        return current == mark and time.monotonic() - taken < TRUST_SECONDS

    def reset(self) -> None:
        """The connection was (re)opened, or its tracking is in doubt: every mark is void."""
        with self.lock:
            self.epoch += 1
            self.counts.clear()
            self.expected.clear()

    def changed(self, key: bytes) -> None:
        """``key`` changed (an invalidation, or this process's own write): its marks are void."""
        with self.lock:
            self._changed(key)

    def _changed(self, key: bytes) -> None:
        counts = self.counts
        if len(counts) >= MAX_COUNTED_KEYS and key not in counts:
            self.flushes += 1
            counts.clear()
        counts[key] = counts.get(key, 0) + 1

    def expect(self, key: bytes, before: Seen) -> None:
        """An own write's reply was just read and said it modified ``key``: its invalidation comes next.

        Only if nothing changed the key since mark ``before`` was taken (else
        the invalidation counts like any other, which costs a version check).
        """
        with self.lock:
            if (self.epoch, self.flushes, self.counts.get(key, 0)) == before[0]:
                self.expected[key] = self.expected.get(key, 0) + 1

    def wrote(self, key: bytes, before: Seen) -> Seen | None:
        """This process wrote ``key`` over the tracked connection, ``before`` being the mark taken first.

        The mark a replica made exact by that write may keep: None if anything
        else changed the key meanwhile (then the next read checks the version).
        Other memories of the process on the key see the write as a change.
        """
        with self.lock:
            unchanged = (self.epoch, self.flushes, self.counts.get(key, 0)) == before[0]
            self._changed(key)
            # Taken when the round trip began, as every mark is.
            return ((self.epoch, self.flushes, self.counts.get(key, 0)), before[1]) if unchanged else None

    def push(self, message: list[Any]) -> None:
        """One RESP3 push from the server: an invalidation is applied, anything else ignored."""
        with self.lock:
            if not message or message[0] != b"invalidate":
                return
            self.received += 1
            keys = message[1] if len(message) > 1 else None
            malformed = keys is not None and not (isinstance(keys, list) and all(isinstance(k, bytes) for k in keys))
            if keys is None or malformed:  # FLUSHALL, FLUSHDB, or the server's tracking table was flushed
                self.flushes += 1
                self.counts.clear()
                if malformed:  # no invalidation Redis sends: the link is not to be trusted (it is closed)
                    raise redis.ConnectionError(f"a malformed invalidation: {message!r:.60}")
                return
            expected = self.expected
            for key in keys:
                pending = expected.get(key)
                if pending:  # this process's own write, whose reply came first
                    if pending == 1:
                        del expected[key]
                    else:
                        expected[key] = pending - 1
                    continue
                self._changed(key)
