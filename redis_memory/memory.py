"""``Memory`` and ``ConversationMemory``: the attribute protocol, and the core
that turns reads and writes into store calls under one lock."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, cast

import redis

from . import connection, ops
from .errors import (
    ConcurrentModification,
    ContainerDeleted,
    CorruptData,
    MissingAttribute,
    MissingKey,
    RedisMemoryError,
    ReservedName,
)
from .proxies import NO_OP, ObservedDict, ObservedList, plain
from .replica import Corrupt, Replica, Resync
from .store import ANY_INCARNATION, Store, memory_key

#: How often an operation is rebuilt and resent after the server found this
#: replica's view stale (another writer changed the same container meanwhile).
MAX_ATTEMPTS = 20
_MISSING: Any = object()
_live_cores: weakref.WeakSet[MemoryCore] = weakref.WeakSet()


def _new_token() -> bytes:
    return os.urandom(6).hex().encode()


class MemoryCore:
    """The machinery behind one :class:`Memory`: store, replica, lock, writer id.

    Every operation carries an id, ``(writer, seq)``: the server records the
    highest ``seq`` applied per writer and answers a repeat with ``dup``
    instead of applying it twice (a command retried after a lost reply).
    """

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name
        self.lock = threading.RLock()
        self.writer = _new_token()
        self.seq = 0
        self.replica = Replica(self)
        _live_cores.add(self)

    def after_fork(self) -> None:
        """In a forked child: a fresh lock and a writer id of its own."""
        self.lock = threading.RLock()
        self.writer = _new_token()
        self.seq = 0

    # -- reads ----------------------------------------------------------------

    def refresh(self) -> None:
        """Make the replica reflect the server: one HMGET when nothing changed.

        This version check is the one place that decides freshness, so that
        server-assisted invalidation can replace it without touching callers.
        """
        replica = self.replica
        if replica.loaded:
            version, incarnation = self.store.version()
            if version == replica.version and incarnation == replica.incarnation:
                return
        self.catch_up()

    def catch_up(self) -> None:
        """Bring the replica to the server's version: journal delta, else HGETALL."""
        replica = self.replica
        if replica.loaded:
            sync = self.store.sync(replica.version, replica.incarnation)
            if sync.kind == "empty":
                replica.load({})
                return
            if sync.kind == "delta":
                try:
                    replica.apply_delta(sync.version, sync.changes)
                    return
                except Resync:
                    pass
        replica.load(self.store.read_all())

    def read(self, name: str, missing: type[RedisMemoryError]) -> Any:
        """The value stored under ``name``, fresh: O(1) when nothing changed."""
        _check_name(name)
        with self.lock:
            self.refresh()
            value = dict.get(self.replica.root, name, _MISSING)
        if value is _MISSING:
            raise missing(f"{name!r} is not stored in {self.store.key}", key=self.store.key, field=name)
        if isinstance(value, Corrupt):
            raise value.error
        return value

    def names(self) -> list[str]:
        with self.lock:
            self.refresh()
            return list(self.replica.root)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            self.refresh()
            for value in self.replica.root.values():
                if isinstance(value, Corrupt):
                    raise value.error
            return cast(dict[str, Any], plain(self.replica.root))

    # -- writes ---------------------------------------------------------------

    def write(self, name: str, value: Any) -> None:
        _check_name(name)
        self.replica.root[name] = value

    def remove(self, name: str, missing: type[RedisMemoryError]) -> None:
        _check_name(name)
        with self.lock:
            self.refresh()
            try:
                self.replica.root.pop(name)
            except CorruptData:
                # Deleted on the server; only the old value was undecodable.
                self.catch_up()
            except MissingKey:
                raise missing(f"{name!r} is not stored in {self.store.key}", key=self.store.key, field=name) from None

    def submit(self, proxy: ObservedList | ObservedDict, build: Callable[[], ops.Op | None]) -> Any:
        """Send the operation ``build`` makes, then apply it to the replica.

        Returns what a delete removed, or ``NO_OP`` when ``build`` found
        nothing to do. Raises ContainerDeleted if ``proxy``'s node is gone.
        """
        with self.lock:
            replica = self.replica
            if not replica.loaded:
                self.refresh()
            for _ in range(MAX_ATTEMPTS):
                if not proxy._rm_live:
                    raise ContainerDeleted(
                        f"this {type(proxy).__bases__[0].__name__} was deleted from {self.store.key}",
                        key=self.store.key,
                    )
                op = build()
                if op is None:
                    return NO_OP
                plan = replica.removal_plan(op)
                self.seq += 1
                seq = b"%d" % self.seq
                # The writer id and seq also make a fresh incarnation token, used
                # only if this operation is the one that creates the memory.
                expected = ANY_INCARNATION if op.nid == b"0" else replica.incarnation
                header = [self.writer, seq, self.writer + b"." + seq, expected, op.name, op.nid]
                reply = self.store.apply(header, plan, op.args())
                if reply.status == "ok":
                    removed = replica.removed_value(op, reply.extra)
                    created = replica.incarnation == b"" and replica.version == 0
                    if reply.version == replica.version + 1 and (reply.incarnation == replica.incarnation or created):
                        replica.apply_local(op, reply.first_nid)
                        replica.version, replica.incarnation = reply.version, reply.incarnation
                    elif (reply.version, reply.incarnation) != (replica.version, replica.incarnation):
                        self.catch_up()
                    return removed
                if reply.status == "same":
                    # Nothing changed on the server; others may have written.
                    if (reply.version, reply.incarnation) != (replica.version, replica.incarnation):
                        self.catch_up()
                    return NO_OP
                if reply.status == "dup":
                    # A resent command whose first copy was applied: the
                    # replica still shows what that copy removed.
                    removed = replica.value_at(op)
                    self.catch_up()
                    return removed
                self.catch_up()
                if reply.status == "gone":
                    proxy._rm_live = False
                    continue
                if reply.status == "exists":
                    return NO_OP
                # 'stale', 'index' or 'missing': this replica's view was out of
                # date; build the operation again from the fresh view.
            raise ConcurrentModification(
                f"gave up after {MAX_ATTEMPTS} attempts: other writers kept changing this container",
                key=self.store.key,
            )


def _check_name(name: Any) -> None:
    if not isinstance(name, str):
        raise TypeError(f"memory field names are str, not {type(name).__name__}")


def _after_fork_in_child() -> None:
    for core in list(_live_cores):
        core.after_fork()
    connection.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Memory:
    """One named memory: a Redis hash seen as an object with attributes.

    ``mem.x = v`` stores, ``mem.x`` reads, ``del mem.x`` deletes; ``mem["x"]``
    does the same for any name. Names starting with ``_`` belong to the
    object and are never stored. Lists and dicts read back are live proxies.

    States:

    * *unloaded*: just created; the first read or write loads the replica
      (one HGETALL).
    * *online*: each attribute read checks the version (one HMGET) and
      catches up through the journal if another process wrote; each write is
      one script call, in Redis when the statement returns.
    * *deleted*: after :meth:`delete` the hash is gone; the next write starts
      a new memory under the same name.

    A connection failure raises :class:`~redis_memory.errors.ConnectionFailed`
    and changes nothing locally.
    """

    _rm: MemoryCore
    _rm_kind = "memory"

    def __init__(
        self,
        name: str,
        *,
        client: redis.Redis | None = None,
        url: str | None = None,
        prefix: str = "rm",
    ) -> None:
        store = Store(connection.connect(client, url), memory_key(prefix, self._rm_kind, name))
        object.__setattr__(self, "_rm", MemoryCore(store, name))

    @property
    def key(self) -> str:
        """The Redis key of this memory's hash."""
        return self._rm.store.key

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._rm.read(name, MissingAttribute)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
            return
        if hasattr(type(self), name):
            raise ReservedName(
                f"{name!r} is a method or property of {type(self).__name__}; store it as mem[{name!r}]",
                key=self.key,
                field=name,
            )
        self._rm.write(name, value)

    def __delattr__(self, name: str) -> None:
        if name.startswith("_"):
            object.__delattr__(self, name)
            return
        self._rm.remove(name, MissingAttribute)

    def __getitem__(self, name: str) -> Any:
        return self._rm.read(name, MissingKey)

    def __setitem__(self, name: str, value: Any) -> None:
        self._rm.write(name, value)

    def __delitem__(self, name: str) -> None:
        self._rm.remove(name, MissingKey)

    def __contains__(self, name: object) -> bool:
        return name in self._rm.names()

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._rm.names()))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._rm.name!r} at {self.key}>"

    def to_dict(self) -> dict[str, Any]:
        """A plain deep copy of every stored name and value, fresh."""
        return self._rm.snapshot()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every change made so far is in Redis; True when it is.

        Writes are sent before the statement that made them returns, so this
        only waits for writes in flight on other threads (up to ``timeout``
        seconds; None waits as long as they take).
        """
        lock = self._rm.lock
        if not lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        lock.release()
        return True

    def delete(self) -> None:
        """Remove the whole memory from Redis (DEL): O(size)."""
        with self._rm.lock:
            self._rm.store.delete()
            self._rm.replica.load({})


class ConversationMemory(Memory):
    """A :class:`Memory` keyed by a conversation id."""

    _rm_kind = "conversation"

    def __init__(self, conversation_id: str, **options: Any) -> None:
        super().__init__(conversation_id, **options)

    @property
    def conversation_id(self) -> str:
        """The id this conversation was opened with."""
        return self._rm.name
