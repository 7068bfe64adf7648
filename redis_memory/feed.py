"""The change feed: a memory's changes as events, from Redis pub/sub.

The apply script publishes every change it makes, in the same atomic step,
on the memory's channel (its key plus ``:changes``; same hash tag). A
message is one line per operation of the call (one, or a batch's), each
nine space-separated fields (none can hold a space), then the author and
the keys as length-prefixed parts (``<len>:<bytes>``), each after a space;
lines are separated by a newline after the last part:

    version time(ms) writer op nid incarnation index count trim author key...

All lines of a message carry the version the call made.

``index`` and ``count`` are set for list changes (the position at the time
of the change, and how many items); ``trim`` is how many items a bounded
append dropped from the front first; the keys are the dict keys whose
entries a dict change set or deleted (msgpack-encoded). Deleting a memory
publishes a ``clear`` of the root with version 0.

The server knows a container by its node id, not by its path. A feed
resolves the id to a path in a replica of its own (never the user's, which
it must not change under a user's loop), brought at least to the event's
version first; paths are those of the state when the event is read.

Pub/sub delivers to connected subscribers only. A subscriber that misses
changes (its link broke, went silent, or versions skip) gets one ``resync``
event, which says: read the state again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from . import codec
from .connection import UNAVAILABLE
from .errors import RedisMemoryError, ServerRefused
from .proxies import ObservedDict, ObservedList, ObservedSet

if TYPE_CHECKING:
    from .memory import MemoryCore

log = logging.getLogger("redis_memory")

#: The operation names events use, by the script's operation names.
OPS = {
    b"dset": "set",
    b"dsetdefault": "setdefault",
    b"ddel": "delete",
    b"dclear": "clear",
    b"lappend": "append",
    b"linsert": "insert",
    b"lset": "set",
    b"ldel": "delete",
    b"lreplace": "replace",
    b"schange": "update",
}
_WAIT_SLICE = 0.2  # a blocked read wakes this often to notice close()
_MAX_DELAY = 1.0
#: What redis-py raises from a pub/sub link that broke, went silent, or sent bytes it could not take for a
#: message (a peer that is not Redis): each time, the feed subscribes again and says resync.
_BROKEN_LINK = (redis.RedisError, OSError, AttributeError, IndexError, KeyError, TypeError, ValueError)
#: After this many seconds without a message, a feed PINGs its connection,
#: and counts the link as lost if no answer comes within PONG_WAIT: a link
#: that died without closing (a partition) is noticed.
IDLE_PING = 30.0
PONG_WAIT = 10.0
_live: weakref.WeakSet[Subscription] = weakref.WeakSet()
_feeds: weakref.WeakSet[Feed] = weakref.WeakSet()


@dataclass(frozen=True)
class Event:
    """One change to a memory.

    ``path`` leads from the memory to what changed: ``("context", "topic")``
    for ``mem.context["topic"] = ...``, ``("messages", 41)`` for the append
    that made item 41. A change to a whole container (``clear``,
    ``replace``) names the container. ``attribute`` is ``path[0]``; both are
    empty (None, ``()``) for a change to the whole memory (``clear`` after
    :meth:`Memory.delete`, ``resync``) and for a container deleted before
    the event was read.
    """

    memory: str  #: the name (id) of the memory
    attribute: str | None  #: the top-level name the change is under
    path: tuple[Any, ...]  #: keys and list indexes from the memory to what changed
    op: str  #: set, setdefault, delete, clear, append, insert, replace, update (of a set); or resync
    author: str | None  #: the ``author=`` of the memory that wrote it
    time: dt.datetime  #: when the server applied it (UTC)
    version: int  #: the memory's version after the change (0 for a delete)


def _lines(message: bytes) -> list[list[bytes]]:
    """The fields of each line of a published message (see the module's notes); ValueError if malformed."""
    lines, pos = [], 0
    while True:
        parts = []
        for _ in range(9):
            space = message.index(b" ", pos)
            parts.append(message[pos:space])
            pos = space + 1
        while True:  # the author, then the keys
            colon = message.index(b":", pos)
            end = colon + 1 + int(message[pos:colon])
            if end > len(message):
                raise ValueError("a part longer than the message")
            parts.append(message[colon + 1 : end])
            if message[end : end + 1] != b" ":
                break
            pos = end + 1
        lines.append(parts)
        if end == len(message):
            return lines
        if message[end : end + 1] != b"\n":
            raise ValueError("junk after a line")
        pos = end + 1


class _Paths:
    """Node id → path, from a memory's replica, cached and checked on use."""

    def __init__(self, core: MemoryCore) -> None:
        self.core = core
        self.parents: dict[bytes, tuple[bytes, Any]] = {}

    def of(self, nid: bytes, version: int, incarnation: bytes) -> tuple[Any, ...] | None:
        """The path of node ``nid`` in the replica, brought at least to ``version`` first."""
        core = self.core
        with core.lock:
            refreshed = False
            replica = core.replica
            if replica.incarnation != incarnation or replica.version < version:
                refreshed = self._refresh()
            found = self._walk_up(nid)
            if found is None:  # not known yet: look in the replica as it is
                self._rebuild()
                found = self._walk_up(nid)
            if found is None and not refreshed and self._refresh():
                self._rebuild()
                found = self._walk_up(nid)
            return found

    def _refresh(self) -> bool:
        try:
            self.core.refresh()
            return True
        except RedisMemoryError:
            return False

    def _walk_up(self, nid: bytes) -> tuple[Any, ...] | None:
        nodes = self.core.replica.nodes
        path: list[Any] = []
        while nid != b"0":
            entry = self.parents.get(nid)
            node = nodes.get(nid)
            if entry is None or node is None:
                return None
            parent_nid, where = entry
            parent = nodes.get(parent_nid)
            if isinstance(parent, ObservedList):
                index = where - parent._rm_lo
                if not 0 <= index < len(parent) or list.__getitem__(parent, index) is not node:
                    return None
                path.append(index)
            elif isinstance(parent, ObservedDict) and dict.get(parent, where) is node:
                path.append(where)
            else:
                return None
            nid = parent_nid
        return tuple(reversed(path))

    def _rebuild(self) -> None:
        """One walk of the replica: O(number of containers)."""
        parents: dict[bytes, tuple[bytes, Any]] = {}
        stack: list[ObservedDict | ObservedList] = [self.core.replica.root]
        while stack:
            node = stack.pop()
            children: Iterable[tuple[Any, Any]]
            if isinstance(node, ObservedDict):
                children = dict.items(node)
            else:
                children = enumerate(list.__iter__(node), node._rm_lo)
            for where, child in children:
                if isinstance(child, (ObservedDict, ObservedList)):
                    parents[child._rm_nid] = (node._rm_nid, where)
                    stack.append(child)
                elif isinstance(child, ObservedSet):
                    parents[child._rm_nid] = (node._rm_nid, where)
        self.parents = parents


class Feed:
    """An iterator over a memory's change events, from the moment it was made.

    ``for event in feed`` blocks for each next event; :meth:`get` waits at
    most a timeout. Close it (or use ``with``) to unsubscribe. A lost link
    is reconnected in the background of :meth:`get`, followed by a
    ``resync`` event.
    """

    def __init__(self, core: MemoryCore) -> None:
        """``core``: a core of the memory's own, used to resolve paths (see the module's notes)."""
        self._core = core
        self._channel = core.store.feed
        self._paths = _Paths(core)
        self._ready: deque[Event] = deque()
        self._last: tuple[bytes, int] | None = None  # incarnation and version of the last event
        self._closed = False
        self._pubsub: Any = None
        self._pid = os.getpid()
        self._delay = 0.0
        self._heard = self._pinged = 0.0
        self._io = threading.Lock()  # held while reading: close() never closes a socket in use
        _feeds.add(self)
        if not self._subscribe(timeout=5.0):
            log.warning("%s: change feed not subscribed yet; retrying", self._channel)

    # -- the subscription -------------------------------------------------

    def _subscribe(self, timeout: float) -> bool:
        """A fresh pub/sub connection, subscribed (confirmed by the server).

        On a Redis Cluster the changes are published with SPUBLISH, so the
        feed subscribes (SSUBSCRIBE) on the master serving the memory's
        slot now, asking the cluster for it each time it (re)subscribes.
        """
        self._drop_pubsub()
        try:
            channel = self._core.store.channel
            sharded = channel.is_cluster()
            pubsub: Any = channel.subscriber(self._channel).pubsub()  # redis-py's pubsub() is untyped
        except (RedisMemoryError, redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            log.info("%s: change feed cannot subscribe: %s", self._channel, exc)
            return False
        try:
            (pubsub.ssubscribe if sharded else pubsub.subscribe)(self._channel)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                message = pubsub.get_message(timeout=min(_WAIT_SLICE, max(0.0, deadline - time.monotonic())))
                if message is not None and message["type"] in ("subscribe", "ssubscribe"):
                    self._pubsub = pubsub  # (the wait before the next try shrinks once a message comes)
                    self._heard, self._pinged = time.monotonic(), 0.0
                    return True
        except redis.ResponseError as exc:
            pubsub.close()
            if str(exc).startswith(UNAVAILABLE):  # BUSY, LOADING, ...: not now, so try again later
                log.info("%s: change feed cannot subscribe now: %s", self._channel, exc)
                return False
            # NOPERM: the ACL user may not use the channel
            raise ServerRefused(f"Redis refused the change feed {self._channel}: {exc}", key=self._channel) from exc
        except _BROKEN_LINK as exc:
            log.info("%s: change feed cannot subscribe: %s", self._channel, exc)
        pubsub.close()
        return False

    def _drop_pubsub(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                self._pubsub.close()
            self._pubsub = None

    def _receive(self, wait: float) -> bytes | None:
        """The next published message within ``wait`` seconds, reconnecting if needed."""
        if self._pid != os.getpid():
            # A forked child: the connection is the parent's (closing our copy
            # of the socket leaves the parent's open); subscribe afresh.
            self._pid = os.getpid()
            self._drop_pubsub()
        if self._pubsub is None:
            time.sleep(min(self._delay, wait))
            self._delay = min(_MAX_DELAY, max(0.05, self._delay * 2))
            if not self._subscribe(timeout=max(wait, 0.5)):
                return None
            self._resync()
            return None
        try:
            now = time.monotonic()
            if self._pinged and now - self._pinged > PONG_WAIT:
                raise redis.ConnectionError(f"no answer to a PING in {PONG_WAIT:g} s")
            if not self._pinged and now - self._heard > IDLE_PING:
                self._pubsub.ping()
                self._pinged = now
            message = self._pubsub.get_message(timeout=wait)
            if message is not None and not (isinstance(message, dict) and isinstance(message.get("type"), str)):
                raise redis.ConnectionError(f"not a pub/sub message: {message!r:.60}")
        except _BROKEN_LINK as exc:
            # Bytes redis-py could not take for a pub/sub message (a peer that is
            # not Redis, or garbled) are a broken link too: subscribe again.
            if not self._closed:
                log.info("%s: change feed lost its link: %s", self._channel, exc)
            self._drop_pubsub()
            return None
        if message is None:
            return None
        self._heard, self._pinged = time.monotonic(), 0.0
        self._delay = 0.0  # a link that works: the next break is tried again at once
        if message["type"] == "sunsubscribe":
            # The server ended a sharded subscription: the slot moved to
            # another master (a resharding, a failover). Subscribe there.
            log.info("%s: change feed's slot moved; subscribing again", self._channel)
            self._drop_pubsub()
            return None
        if message["type"] not in ("message", "smessage"):
            return None
        data = message.get("data")
        if not isinstance(data, bytes):
            log.info("%s: change feed got a message without data; subscribing again", self._channel)
            self._drop_pubsub()
            return None
        return data

    # -- events -----------------------------------------------------------

    def _resync(self) -> None:
        self._ready.append(Event(self._core.name, None, (), "resync", None, dt.datetime.now(dt.UTC), -1))
        self._last = None

    def _in_sequence(self, incarnation: bytes, version: int) -> bool:
        """Whether this event directly follows the last one seen (nothing was missed)."""
        last = self._last
        if last is None or version == 0:  # the first one, or a delete
            return True
        if last[1] == 0:  # after a delete, a new memory starts at 1
            return version == 1
        return last == (incarnation, version - 1)

    def _events(self, message: bytes) -> list[Event]:
        try:
            lines = _lines(message)
            version_b, ms, incarnation = lines[0][0], lines[0][1], lines[0][5]
            version = int(version_b)
            when = dt.datetime.fromtimestamp(int(ms) / 1000, dt.UTC)
        except ValueError:
            log.warning("%s: change feed ignored a malformed message", self._channel)
            return []
        # The lines of one message are one call's operations: one version.
        if not self._in_sequence(incarnation, version):
            self._resync()
        self._last = (incarnation, version)
        events: list[Event] = []
        for line in lines:
            events += self._line_events(line, version, when)
        return events

    def _line_events(self, line: list[bytes], version: int, when: dt.datetime) -> list[Event]:
        """The events of one operation (one line of a message)."""
        _version, _ms, _writer, name, nid, incarnation, index_b, count_b, trim_b, author_b, *keys = line
        if name == b"promote":
            return []  # a change of how a dict is stored, not of what it holds
        op = OPS.get(name, name.decode(errors="replace"))
        author = author_b.decode(errors="replace") or None
        base = () if nid == b"0" else self._paths.of(nid, version, incarnation)

        def event(*where: Any, what: str = op) -> Event:
            path = () if base is None else (*base, *where)
            attribute = path[0] if path and isinstance(path[0], str) else None
            return Event(self._core.name, attribute, path, what, author, when, version)

        events: list[Event] = []
        if base is None:
            events.append(event())
        elif keys:
            try:
                events += [event(codec.decode_key(k)) for k in keys]
            except ValueError:
                events.append(event())
        elif index_b:
            try:
                # A bounded append first drops items from the front: each a delete at 0.
                events += [event(0, what="delete") for _ in range(int(trim_b or b"0"))]
                start = int(index_b)
                events += [event(start + i) for i in range(int(count_b or b"1"))]
            except ValueError:
                events.append(event())
        else:
            events.append(event())
        return events

    # -- the public side --------------------------------------------------

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event; None if none came within ``timeout`` seconds (None: wait for one)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready:
            if self._closed:
                break
            wait = _WAIT_SLICE if deadline is None else max(0.0, min(_WAIT_SLICE, deadline - time.monotonic()))
            with self._io:
                message = self._receive(wait)
            if message is not None:
                self._ready.extend(self._events(message))
            elif deadline is not None and time.monotonic() >= deadline:
                return None
        if self._closed:  # closed by another thread while this one read
            with self._io:
                self._drop_pubsub()
            return None
        return self._ready.popleft()

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        event = self.get()
        if event is None:  # closed
            raise StopIteration
        return event

    def close(self) -> None:
        """Unsubscribe; iteration then stops (a read in progress ends within 0.2 s)."""
        self._closed = True
        if self._io.acquire(blocking=False):
            try:
                self._drop_pubsub()
            finally:
                self._io.release()
        self._core.close(timeout=0)  # a reader's core: nothing of it is ever queued

    def __enter__(self) -> Feed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Subscription:
    """Runs a callback on each change event, in a daemon thread, until closed.

    An exception from the callback is logged and the subscription goes on.
    """

    def __init__(self, core: MemoryCore, callback: Callable[[Event], Any]) -> None:
        self._feed = Feed(core)
        self._callback = callback
        self._stop = threading.Event()
        self._name = f"redis_memory feed {core.name}"
        self._start()
        _live.add(self)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                event = self._feed.get(timeout=_WAIT_SLICE)
            except Exception:  # the feed's own failure, never the callback's (a subscription refused, say)
                # Not a loop that spins: the feed waits before each new try to subscribe,
                # longer each time until a message comes (see Feed._receive).
                log.exception("the change feed of %s failed; trying again", self._feed._channel)
                continue
            if event is None:
                continue
            try:
                self._callback(event)
            except Exception:
                log.exception("a change callback raised; the subscription goes on")

    def close(self) -> None:
        """Stop calling back and unsubscribe (waits for a callback in progress)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._feed.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _after_fork_in_child() -> None:
    """Threads do not survive fork: each open subscription gets its own again in the child.

    A lock held by a parent's thread at the fork would stay held for ever
    in the child: each feed gets a fresh one.
    """
    for feed in list(_feeds):
        feed._io = threading.Lock()
    for subscription in list(_live):
        if not subscription._stop.is_set():
            subscription._start()


os.register_at_fork(after_in_child=_after_fork_in_child)
