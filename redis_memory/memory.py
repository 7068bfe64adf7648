"""``Memory`` and ``ConversationMemory``: the attribute protocol, and the core
that turns reads and writes into store calls under one lock."""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import itertools
import logging
import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Self, cast, overload

from . import connection, green, ops, queue, tracking
from .batch import Batch
from .catalog import INDEX_REFRESH, Catalog, Listing
from .connection import Client
from .errors import (
    ConcurrentModification,
    ConnectionFailed,
    ContainerDeleted,
    CorruptData,
    InsideBatch,
    MemoryClosed,
    MissingAttribute,
    MissingKey,
    RedisMemoryError,
    ReservedName,
    ServerRefused,
    UnsupportedValue,
    WrongThread,
    kept,
)
from .feed import Event, Feed, Subscription
from .messages import as_message
from .proxies import NO_OP, ObservedDict, ObservedList, ObservedSet, Proxy, plain
from .replica import Corrupt, Replica, Resync
from .store import (
    ANY_INCARNATION,
    REF,
    REPLICA_TIMEOUT,
    Reply,
    Step,
    Store,
    Sync,
    append_hints,
    memory_key,
    set_hints,
    version_number,
)
from .window import fit_messages

#: How often an operation is rebuilt and resent after the server found this
#: replica's view stale (another writer changed the same container meanwhile).
MAX_ATTEMPTS = 20
#: After this many stale answers, the script reads what an operation removes itself.
SERVER_PLAN_AFTER = 3
#: How long close() may wait for queued changes to reach Redis, by default.
CLOSE_TIMEOUT = 5.0
_MISSING: Any = object()
_live_cores: weakref.WeakSet[MemoryCore] = weakref.WeakSet()
log = logging.getLogger("redis_memory")


def _new_token() -> bytes:
    return os.urandom(6).hex().encode()


class MemoryCore:
    """The machinery behind one :class:`Memory`: store, replica, queue, lock, writer id.

    Every operation carries an id, ``(writer, seq)``: the server records the
    highest ``seq`` applied per writer and answers a repeat with ``dup``
    instead of applying it twice (a command retried after a lost reply, or a
    queued operation replayed after an outage).
    """

    def __init__(
        self,
        store: Store,
        name: str,
        max_pending: int,
        spool: str | os.PathLike[str] | None,
        ttl: float | None = None,
        bounds: dict[str, int] | None = None,
        author: str | None = None,
        shared: bool = False,
    ) -> None:
        self.store = store
        self.name = name
        self.author = author.encode() if author else b""
        self.ttl = b"%d" % _milliseconds(ttl) if ttl is not None else b"0"
        self.bounds = bounds or {}
        self.catalog: Listing | None = None
        self.indexed_at = -INDEX_REFRESH
        #: The last look at the server found others' changes: the next read syncs at once (one round trip,
        #: not a version check then a sync), until a sync finds nothing new.
        self.contended = False
        self.lock = threading.RLock()
        self.writer = _new_token()
        self.seq = 0
        self.provisional = itertools.count(1)
        self.replica = Replica(self)
        self.link = queue.link(store.channel)
        self.outbox = queue.Outbox(max_pending, queue.Spool(spool, store.key) if spool is not None else None)
        self.closed = False
        #: The batch being made (``with mem.batch():``), under this core's lock.
        self.batching: Batch | None = None
        #: The only thread that may use this core, when an async memory drives it (aio.py).
        self.driver: threading.Thread | None = None
        #: An async memory's call runs on its event loop now (see green.py), holding the lock.
        self.on_loop = False
        #: A core shared by memory objects (see :class:`SharedCores`): those open on it.
        self.shared = shared
        self.holders: weakref.WeakSet[Memory] = weakref.WeakSet()
        self.closing = False  # its last holder is closing it (see SharedCores)
        self.lost = False  # closed with queued changes it could not send
        _live_cores.add(self)
        self.link.attach(self)
        self.adopt()

    def adopt(self) -> None:
        """Take up the queues that ended processes left in this memory's spool (see queue.Spool)."""
        if self.outbox.spool is None:
            return
        with self.lock:
            adopted = self.outbox.spool.adopt(self.writer)
            if adopted:
                log.info("%s: %d operations found in the spool of an ended process", self.store.key, len(adopted))
                self.outbox.entries.extend(adopted)
                self.link.wait_for(self)

    def reusable(self) -> bool:
        """Whether a closed core may be opened again: its replica holds nothing Redis may lack, no spool."""
        return not self.lost and not self.replica.speculative and self.outbox.spool is None

    def held(self) -> bool:
        """Whether a memory object holds this core (one being collected does not: iterating skips it)."""
        return any(True for _ in self.holders)

    def let_go(self) -> None:
        """A memory object holding this core was let go of: with none left, its connection may close."""
        if not self.held():
            self.link.release_if_unused()

    def in_use(self) -> bool:
        """Open, and (if shared) held by some memory object: it keeps its link's thread and connection."""
        return not self.closed and (not self.shared or self.held())

    def reopen(self) -> None:
        """A shared core closed by its last memory object is taken again (its replica kept)."""
        with self.lock:
            if self.closed:
                self.closed = False
                _live_cores.add(self)
                self.link.attach(self)

    def shadow(self) -> MemoryCore:
        """Another core on the same memory, with a replica of its own: for a reader in another thread."""
        store = Store(self.store.client, self.store.key, self.store.companions, self.store.tracking)
        return MemoryCore(store, self.name, 1, None)

    def after_fork(self) -> None:
        """In a forked child: a fresh lock, a writer id of its own, no queue (the parent replays it)."""
        self.lock = threading.RLock()
        self.batching = None  # a batch being made is the parent's to send
        self.writer = _new_token()
        self.seq = 0
        self.provisional = itertools.count(1)
        if self.outbox:
            self.replica.speculative = True
        self.outbox.after_fork()

    def check_open(self) -> None:
        if self.closed:
            raise MemoryClosed(f"{self.store.key} was closed here; open a new memory to use it", key=self.store.key)
        self.check_thread()

    def check_thread(self) -> None:
        """Refuse a call from outside the driver thread of an async memory (it would block the event loop)."""
        if self.driver is not None and threading.current_thread() is not self.driver and not green.driving(self):
            raise WrongThread(
                f"{self.store.key} belongs to an async memory: change it with its awaited methods "
                "(set, append, run, batch), not from the event loop",
                key=self.store.key,
            )

    def flush(self, timeout: float | None) -> bool:
        """Wait for the queue to reach Redis, up to ``timeout`` seconds (None: as long as it takes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.outbox and not self.link.online:
                with connection.deadline(None if deadline is None else deadline - time.monotonic()):
                    self.link.probe()  # outside the lock: it may wait the connect timeout
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self.lock.acquire(timeout=-1 if remaining is None else remaining):
                try:
                    if not self.outbox:
                        return True
                    if self.link.online:
                        with connection.deadline(None if deadline is None else deadline - time.monotonic()):
                            if self.drain():
                                return True
                finally:
                    self.lock.release()
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.05 if deadline is None else min(0.05, max(0.0, deadline - time.monotonic())))

    def close(self, timeout: float) -> None:
        """Release the link, the connection and the spool; see :meth:`Memory.close` for the queue."""
        if self.closed:
            return
        if self.outbox and not self.link.online:
            # Redis may be back before the reconnect thread's next try (up to a second away): try it once now.
            with connection.deadline(timeout):
                self.link.probe()
        if self.outbox and self.link.online:
            try:
                self.flush(timeout)
            except RedisMemoryError as exc:  # the server refused the replay: what is left is reported below
                log.error("%s: the queue could not be replayed before closing: %s", self.store.key, kept(exc))
        with self.lock:
            if self.closed:
                return
            self.closed = True
            _live_cores.discard(self)
            outbox, key = self.outbox, self.store.key
            if outbox and outbox.spool is not None:
                log.info("%s: %d queued operations stay in the spool for the next memory on it", key, len(outbox))
            elif outbox:
                log.error(
                    "%s: closed with %d queued operations, which never reached Redis and are lost "
                    "(a memory opened with spool= keeps them for the next one)",
                    key,
                    len(outbox),
                )
            if outbox.spool is not None:
                outbox.spool.close(keep=bool(outbox))
            self.lost = self.lost or bool(outbox)
            outbox.entries.clear()
            self.link.detach(self)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def reachable(self) -> bool:
        """True when commands may go to Redis now: online, with nothing queued ahead of them."""
        if not self.link.online:
            return False
        return not self.outbox or self.drain()

    # -- reads ----------------------------------------------------------------

    def refresh(self) -> None:
        """Make the replica reflect the server: one HMGET when nothing changed.

        This is the one place that decides freshness. A tracked memory
        (``tracking=True``) skips the version check while the server has sent
        no invalidation of its key since the replica was last made exact (see
        tracking.py): no round trip. While Redis is unreachable the replica
        is served as it is; a memory never loaded then raises ConnectionFailed.
        """
        replica = self.replica
        if self.batching is not None:
            return  # inside a batch the local view is the truth until it is sent
        store = self.store
        try:
            if not self.reachable():
                error = self.link.last_error
                if not isinstance(error, ConnectionFailed):
                    error = ConnectionFailed("Redis is unreachable")
                raise kept(error)  # a copy: the kept one, raised, would get a traceback holding this memory
            exact = replica.loaded and not replica.speculative
            mark = None
            if store.tracker is not None:  # an untracked memory pays nothing here
                if exact and store.vouches(replica.seen):
                    return
                mark = store.mark()  # before the round trip: an invalidation crossing it voids the mark
            if exact and not self.contended:
                stamp, incarnation = store.version()
                if stamp == replica.stamp and incarnation == replica.incarnation:
                    replica.seen = mark
                    return
                self.contended = True
            self.catch_up()
            replica.seen = mark
        except ConnectionFailed as exc:
            self.link.failed(exc)
            if not replica.loaded:
                raise ConnectionFailed(
                    f"Redis is unreachable and {self.store.key} was never loaded here: {exc}", key=self.store.key
                ) from exc

    def catch_up(self, sync: Sync | None = None) -> None:
        """Bring the replica to the server's version: journal delta, else HGETALL.

        ``sync``: what changed since the replica's version, if the server
        has said already (an apply's reply): no round trip for it.
        """
        replica = self.replica
        if replica.loaded and not replica.speculative:
            if sync is None:
                sync = self.store.sync(replica.stamp, replica.incarnation)
                # (a memory that does not exist answers 'empty', whatever this replica's stamp)
                self.contended = sync.kind != "empty" and sync.stamp != replica.stamp
            if sync.kind == "empty":
                replica.load({})
                return
            if sync.kind == "delta":
                try:
                    replica.apply_delta(sync.stamp, sync.changes)
                    return
                except Resync:
                    pass
        replica.load(self.store.read_all())

    def read(self, name: str, missing: type[RedisMemoryError]) -> Any:
        """The value stored under ``name``, fresh: O(1) when nothing changed."""
        _check_name(name)
        with self.lock:
            self.check_open()
            self.refresh()
            return self.peek(name, missing)

    def peek(self, name: str, missing: type[RedisMemoryError]) -> Any:
        """The value under ``name`` in the replica as it is, without touching the network."""
        value = dict.get(self.replica.root, name, _MISSING)
        if value is _MISSING:
            raise missing(f"{name!r} is not stored in {self.store.key}", key=self.store.key, field=name)
        if isinstance(value, Corrupt):
            raise value.error()
        return value

    def names(self) -> list[str]:
        with self.lock:
            self.check_open()
            self.refresh()
            if self.replica.unnamed:
                raise kept(self.replica.unnamed[0])  # a copy: see Corrupt.error
            return list(self.replica.root)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            self.check_open()
            self.refresh()
            if self.replica.unnamed:
                raise kept(self.replica.unnamed[0])  # a copy: see Corrupt.error
            for value in self.replica.root.values():
                if isinstance(value, Corrupt):
                    raise value.error()
            return cast(dict[str, Any], plain(self.replica.root))

    # -- writes ---------------------------------------------------------------

    def write(self, name: str, value: Any) -> None:
        _check_name(name)
        self.check_open()
        self.replica.root[name] = value

    def remove(self, name: str, missing: type[RedisMemoryError]) -> None:
        _check_name(name)
        with self.lock:
            self.check_open()
            self.refresh()
            try:
                self.replica.root.pop(name)
            except MissingKey:
                raise missing(f"{name!r} is not stored in {self.store.key}", key=self.store.key, field=name) from None

    def submit(self, proxy: ObservedList | ObservedDict | ObservedSet, build: Callable[[], ops.Op | None]) -> Any:
        """Send the operation ``build`` makes (or queue it), then apply it to the replica.

        Returns what a delete removed, or ``NO_OP`` when ``build`` found
        nothing to do. Raises ContainerDeleted if ``proxy``'s node is gone.
        """
        self.check_thread()  # before the lock, which the driver may hold over a round trip
        with self.lock:
            self.check_open()
            if self.batching is not None:
                return self.batching.add(proxy, build)
            replica = self.replica
            fresh = False  # whether this call has checked the server's version
            stale = 0  # how often the server found what the op removes changed
            for _ in range(MAX_ATTEMPTS):
                # Replaying a queue reloads the replica, and a speculative one
                # (a forked child's, or one whose reload failed) must be reloaded
                # before an operation is built from it: both before the check.
                online = self.reachable()
                if not replica.loaded or (online and replica.speculative):
                    self.refresh()
                    fresh, online = True, self.link.online
                if not proxy._rm_live:
                    raise ContainerDeleted(
                        f"this {type(proxy).__bases__[0].__name__} was deleted from {self.store.key}",
                        key=self.store.key,
                    )
                # A held proxy builds from the view it has, without a round trip;
                # the server checks what an operation depends on. But "nothing to
                # do" and "no such item" write nothing the server could check, so
                # they are decided again on a fresh view before they stand.
                try:
                    op = build()
                except (LookupError, ValueError):
                    if not online or fresh:
                        raise
                    op = None
                if op is None:
                    if online and not fresh:
                        self.refresh()
                        fresh = True
                        continue
                    return NO_OP
                if op.depth:
                    ops.check_depth(replica.depth(proxy) + op.depth)
                # A list item's dict stored whole gets fields of its own first
                # (one more operation, once); then the loop builds the change.
                promotion = replica.promotion(proxy)
                if promotion is not None:
                    op = promotion
                if self.bounds:
                    op = self.bound(proxy, op)
                if promotion is not None and not online:
                    # Queue the promotion only if the change after it fits too.
                    self.outbox.check_room(self.store.key, needed=2)
                plan = replica.removal_plan(op)
                seq = self.next_seq()
                if not online:
                    # An incomplete plan is made again from the server's data on replay.
                    result = self._enqueue(op, plan or {}, seq)
                    if promotion is None:
                        return result
                    continue
                # The token also makes a fresh incarnation, used only if this
                # operation is the one that creates the memory.
                token = ops.op_token(self.writer, seq)
                expected = ANY_INCARNATION if op.nid == b"0" else replica.incarnation
                birth = replica.nodes[op.nid]._rm_birth
                sent_plan: ops.Plan | None = plan
                if plan is None:
                    # It removes a value this replica could not decode: the script
                    # lists what that holds (O(size)), and the replica, which cannot
                    # mirror the removal, reloads after it.
                    replica.speculative = True
                elif stale >= SERVER_PLAN_AFTER and not isinstance(op, (ops.DictDelete, ops.ListDelete)):
                    # Others keep changing what this op removes faster than this
                    # replica catches up: let the script list it (O(size), never
                    # stale). Not for a delete, which returns this replica's copy.
                    sent_plan = None
                try:
                    step = Step(seq, token, op.name, op.nid, birth, [], sent_plan, op.args())
                    since = replica.stamp if replica.loaded and not replica.speculative else b""
                    call = [self.writer, expected, self.ttl, self.author]
                    if since and sent_plan == {} and replica.incarnation:
                        # (the incarnation the change event names: the one of the version sent)
                        who = [self.writer, replica.incarnation, self.ttl, self.author]
                        step.hints = _lean_hints(op, proxy, since, who, token)
                    reply = self.store.apply(call, [step], since)
                except ConnectionFailed as exc:
                    self.link.failed(exc)
                    # The server may have applied it before the link broke: queue
                    # this very operation, with its id, so the replay cannot repeat
                    # it; even past max_pending, since it may already be stored.
                    result = self._enqueue(op, plan or {}, seq, may_be_applied=True)
                    if promotion is None:
                        return result
                    continue
                stale += reply.status == "stale"
                try:
                    result = self._settle(proxy, op, reply, token)
                    replica.seen = self.store.written  # exact after the write, unless another's change crossed it
                except ConnectionFailed as exc:
                    self.link.failed(exc)
                    if reply.status not in ("ok", "dup"):
                        continue  # not applied: build it again, offline now
                    # Applied, but the replica could not catch up: apply it here
                    # too, and reload once the server is back.
                    result = replica.removed_value(op, reply.extra) if reply.status == "ok" else replica.value_at(op)
                    replica.apply_local(op, _server_ids(reply.first_nid), token)
                    replica.speculative = True
                if result is not _RETRY and promotion is None:
                    return result
            raise ConcurrentModification(
                f"gave up after {MAX_ATTEMPTS} attempts: other writers kept changing this container",
                key=self.store.key,
            )

    def _index(self, created: bool = False) -> None:
        """Keep this memory's entry in its listing fresh: at once if ``created``, else at most every INDEX_REFRESH s.

        A write that created the memory (again: deleted or expired meanwhile,
        perhaps by another process) always adds it, or it would stay unlisted.
        """
        now = time.monotonic()
        if self.catalog is not None and (created or now - self.indexed_at >= INDEX_REFRESH):
            try:
                self.catalog.touch(self.name)
                self.indexed_at = now
            except RedisMemoryError as exc:  # the index may lag; listing checks real activity
                log.info("%s: index not updated: %s", self.store.key, kept(exc))

    def bound(self, proxy: ObservedList | ObservedDict | ObservedSet, op: ops.Op) -> ops.Op:
        """``op``, made to keep a bounded attribute (``max_messages``) at its newest items, however it grows it."""
        root = self.replica.root
        if isinstance(op, ops.DictSet) and proxy is root:
            items, trimmed = [], False
            for name, value in op.items:
                keep = self.bounds.get(name, 0)
                if keep and isinstance(value, list) and len(value) > keep:
                    value, trimmed = value[-keep:], True
                items.append((name, value))
            return ops.DictSet(op.nid, items) if trimmed else op
        keep = next((keep for name, keep in self.bounds.items() if dict.get(root, name) is proxy), 0)
        if not keep or not isinstance(proxy, ObservedList):
            return op
        if isinstance(op, ops.ListAppend):
            op.bounded(keep)
        elif isinstance(op, ops.ListInsert) and op.end == b"back":
            op = ops.ListAppend(op.nid, [op.value])
            op.bounded(keep)
        elif isinstance(op, ops.ListInsert):
            # Inserting before the end of a history may make it overflow (others
            # may have filled it since this view): a rewrite of the (bounded, so
            # short) list that keeps its newest, made again if it changed.
            index = 0 if op.end == b"front" else op.slot - proxy._rm_lo
            value = op.value

            def insert(current: list[Any]) -> list[Any]:
                current.insert(index, value)
                return current[-keep:]

            children = {id(v): v._rm_nid for v in proxy if isinstance(v, Proxy)}
            op = ops.ListReplace(op.nid, proxy._rm_mod, insert(list(proxy)), children, insert)
        elif isinstance(op, ops.ListReplace) and len(op.value_list) > keep:
            compute = op.compute

            def bounded(current: list[Any]) -> list[Any]:
                return (compute(current) if compute else current)[-keep:]

            op = ops.ListReplace(op.nid, op.mod, op.value_list[-keep:], op.children, bounded)
        return op

    def _settle(self, proxy: ObservedList | ObservedDict | ObservedSet, op: ops.Op, reply: Reply, token: bytes) -> Any:
        """Bring the replica in line with what the server answered; ``_RETRY`` to build again."""
        replica = self.replica
        if reply.status == "ok":
            self.note_created(reply.stamp)
            removed = replica.removed_value(op, reply.extra)
            created = replica.incarnation == b"" and replica.version == 0
            if reply.before == replica.stamp and (reply.incarnation == replica.incarnation or created):
                replica.apply_local(op, _server_ids(reply.first_nid), token)
                replica.stamped(reply.stamp)
                replica.incarnation = reply.incarnation
            elif (reply.stamp, reply.incarnation) != (replica.stamp, replica.incarnation):
                self.catch_up(reply.delta if reply.incarnation == replica.incarnation else None)
            return removed
        if reply.status == "same":
            # Nothing changed on the server; others may have written.
            if (reply.stamp, reply.incarnation) != (replica.stamp, replica.incarnation):
                self.catch_up()
            return NO_OP
        if reply.status == "dup":
            # A resent command whose first copy was applied (and may have
            # created the memory): the replica still shows what that copy removed.
            self._index(created=True)
            removed = replica.value_at(op)
            self.catch_up()
            return removed
        if reply.status == "corrupt":
            self.raise_corrupt(reply)
        if (reply.stamp, reply.incarnation) == (replica.stamp, replica.incarnation):
            # Refused at the very version this replica holds: the hash was
            # changed outside the library (a version would have moved), so
            # the replica is read whole again rather than trusted.
            replica.load(self.store.read_all())
        else:
            self.catch_up()
        if reply.status == "gone":
            proxy._rm_live = False
            return _RETRY
        if reply.status == "exists":
            return NO_OP
        # 'stale', 'index' or 'missing': this replica's view was out of date;
        # build the operation again from the fresh view.
        return _RETRY

    def note_created(self, stamp: bytes) -> None:
        """After an applied write whose version is ``stamp``: list the memory if that write created it."""
        self._index(created=stamp[:2] == b"1 ")  # version 1: this write created the memory

    @staticmethod
    def raise_corrupt(reply: Reply) -> None:
        """The apply function met malformed stored data and wrote nothing: CorruptData."""
        key, field, why = (part.decode(errors="replace") for part in reply.extra[:3])
        message = f"corrupt data in {key} field {reply.extra[1]!r}: {why}" if field else f"{key} {why}"
        raise CorruptData(message, key=key, field=reply.extra[1] or None)

    def outside_batch(self, call: str) -> None:
        """Refuse ``call`` (which would reach Redis at once) inside a batch of this thread."""
        batch = self.batching
        if batch is not None and batch.thread == threading.get_ident():
            message = f"{call} inside a batch of {self.store.key} would reach Redis before the batch: end it first"
            raise InsideBatch(message, key=self.store.key)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """See :meth:`Memory.batch`."""
        with self.lock:
            self.check_open()
            if self.batching is not None:
                # Joins the outer batch; raising, it takes back its own statements.
                outer = self.batching
                mark = outer.nest()
                try:
                    yield
                except BaseException:
                    outer.take_back(mark)
                    raise
                return
            self.refresh()  # one version check: the block builds on a fresh view
            batch = self.batching = Batch(self)
            try:
                yield
            except BaseException:
                self.batching = None
                batch.abandon()
                raise
            self.batching = None
            batch.commit()

    def append_to(self, name: str, items: list[Any]) -> None:
        """Append ``items`` to the list under ``name``, made first (a root setdefault) if the fresh view has none.

        A list held in the replica is appended to without a version check:
        the server checks what an append depends on. If another writer has
        put a new list under ``name`` since, the refused append has brought
        the replica up to date, and it goes to the list there now. Queued
        offline, it goes to the list under ``name`` at the replay (see
        :data:`ops.BY_NAME`).
        """
        with self.lock:
            self.check_open()
            _check_name(name)
            for _ in range(MAX_ATTEMPTS):
                found = dict.get(self.replica.root, name, _MISSING)
                if not isinstance(found, ObservedList):
                    self.refresh()
                    self.replica.root.setdefault(name, [])
                    found = self.read(name, MissingAttribute)
                if not isinstance(found, ObservedList):
                    raise UnsupportedValue(
                        f"{name} in {self.store.key} is a {type(found).__name__}, not a list", key=self.store.key,
                        field=name,
                    )  # fmt: skip
                if not items:
                    return
                try:
                    self.submit(found, _appending(found, items, name))
                    return
                except ContainerDeleted:
                    continue  # replaced by another writer: the replica shows what is there now
            raise ConcurrentModification(
                f"gave up after {MAX_ATTEMPTS} attempts: other writers kept replacing {name}", key=self.store.key
            )

    def pending(
        self, op: ops.Op, plan: ops.Plan, seq: int, created: list[bytes], birth: bytes, group: int = 0
    ) -> queue.Pending:
        """The queue entry of an operation (``group``: its batch's first seq, or 0)."""
        entry = queue.Pending(
            self.writer, seq, self.replica.incarnation, op.name, op.nid, plan, ops.tokens(op.args()), created,
            self.author, birth, group=group, statements=op.statements,
        )  # fmt: skip
        if isinstance(op, (ops.ListReplace, ops.SetChange)):
            entry.intent, entry.recompute = op.intent, op.compute
        elif isinstance(op, ops.ListAppend) and op.to:
            entry.intent = ops.BY_NAME + op.to.encode()
        return entry

    def _enqueue(self, op: ops.Op, plan: ops.Plan, seq: int, may_be_applied: bool = False) -> Any:
        """Offline: apply ``op`` to the replica and queue it for the replay."""
        replica = self.replica
        if not may_be_applied:
            self.outbox.check_room(self.store.key)
        # The ids of the nodes it creates go into the record before it is
        # written: a spool read by the next process must map them on replay.
        created = queue.provisional_ids(self.writer, self.provisional, op.nodes())
        removed = replica.value_at(op)
        self.outbox.push(self.writer, self.pending(op, plan, seq, created, replica.nodes[op.nid]._rm_birth))
        replica.apply_local(op, iter(created), ops.op_token(self.writer, seq))
        replica.speculative = True
        self.link.wait_for(self)
        return removed

    def drain(self) -> bool:
        """Replay the queue in order, then reload the replica; True when the queue is empty."""
        with self.lock:
            outbox = self.outbox
            if not outbox:
                self.link.replayed(self)
                return True
            replayed = 0
            try:
                while outbox:
                    entry = outbox.entries[0]
                    group = self._group_at_head()
                    if group and self._replay_group(group):
                        for member in group:
                            outbox.confirmed(self.writer, member)
                        replayed += len(group)
                        continue
                    try:
                        self._replay(entry)
                    except ServerRefused as exc:
                        if not _malformed(exc):
                            raise  # out of memory, no permission: it may pass later, so it stays queued
                        # The script failed on the operation itself (a damaged spool
                        # record): it can never apply, and must not hold up the rest.
                        self._dropped(entry, exc)
                    outbox.confirmed(self.writer, entry)
                    replayed += 1
                self.replica.load(self.store.read_all())
            except ConnectionFailed as exc:
                self.link.failed(exc)
                return False
            log.info("%s: %d queued operations replayed", self.store.key, replayed)
            self.link.replayed(self)
            return True

    def _group_at_head(self) -> list[queue.Pending]:
        """The queued batch at the head of the queue (its operations, in order), or nothing."""
        entries = self.outbox.entries
        head = entries[0]
        if not head.group:
            return []
        return list(itertools.takewhile(lambda e: (e.writer, e.group) == (head.writer, head.group), entries))

    def _replay_group(self, group: list[queue.Pending]) -> bool:
        """Send a queued batch as one call, all or none; False if the server refused it.

        Refused, it is replayed operation by operation instead, each handled
        as a queued operation is (so nothing is lost, but others' changes
        may then land between them).
        """
        outbox = self.outbox
        sent = [entry.renamed(outbox.renames) for entry in group]
        head = sent[0]
        expected = head.incarnation or outbox.joined
        if not expected and all(entry.nid == b"0" for entry in sent):
            expected = ANY_INCARNATION
        steps = []
        for entry in sent:
            args = entry.args
            skipped = outbox.skipped.get(entry.nid, 0)
            if entry.name == b"lreplace" and skipped:
                args = [b"%d" % (int(args[0]) - skipped), *args[1:]]
            birth = outbox.births.get(entry.nid, entry.birth)
            token = ops.op_token(entry.writer, entry.seq)
            steps.append(Step(entry.seq, token, entry.name, entry.nid, birth, entry.created, entry.plan,
                              ops.from_tokens(args)))  # fmt: skip
        try:
            reply = self.store.apply([head.writer, expected, self.ttl, head.author], steps)
        except ServerRefused as exc:
            if not _malformed(exc):
                raise  # out of memory, no permission: it stays queued
            return False  # one of them is damaged: replayed one by one, the damaged one dropped
        if reply.status not in ("ok", "dup", "same"):
            return False
        self._index(created=reply.status == "dup" or version_number(reply.stamp) == 1)
        if not head.incarnation and not outbox.joined:
            outbox.join(self.writer, reply.incarnation)
            if not self.replica.incarnation:
                self.replica.incarnation = reply.incarnation
        # The nodes each operation created, from its result (a resend's, the
        # call's first: they were given in order).
        if len(group) == 1 or (reply.status == "dup" and not reply.results and reply.first_nid is not None):
            # A single operation's reply names its first new node only; so does a
            # resend of a batch applied whole, whose nodes were made in order (a
            # wrong guess, after a setdefault skipped, is caught by the births).
            first, results = reply.first_nid, []
            for entry in group:
                results.append(b"%d" % first if first is not None and entry.created else b"-")
                first = None if first is None else first + len(entry.created)
        else:
            results = reply.results or [b"-"] * len(group)
        for entry, result in zip(group, results, strict=True):
            if entry.created and result.isdigit():
                self._map(entry.created, [b"%d" % (int(result) + i) for i in range(len(entry.created))])
            elif entry.created and result[:1] == b"x" and b"/" in result:
                # setdefault found a container: what was queued for the default goes to it.
                there, _, birth = result[1:].partition(b"/")
                self._map(entry.created[:1], [there], {there: birth})
        return True

    def _replay(self, entry: queue.Pending) -> None:
        """Send one queued operation; map the nodes it created, or report why it was dropped."""
        outbox = self.outbox
        sent = entry.renamed(outbox.renames)
        expected = sent.incarnation or outbox.joined
        if not expected and sent.nid == b"0":
            expected = ANY_INCARNATION
        args = sent.args
        skipped = outbox.skipped.get(sent.nid, 0)
        if sent.name == b"lreplace" and skipped:
            args = [b"%d" % (int(args[0]) - skipped), *args[1:]]
        token = ops.op_token(entry.writer, entry.seq)
        birth = outbox.births.get(sent.nid, entry.birth)
        call = [entry.writer, expected, self.ttl, entry.author]
        plan: ops.Plan | None = sent.plan
        nid, by_name = sent.nid, entry.intent.removeprefix(ops.BY_NAME) if entry.intent[:3] == ops.BY_NAME else b""
        queued = (nid, birth)
        if by_name:
            nid, birth = outbox.moved.get(queued) or queued
        for _ in range(MAX_ATTEMPTS):
            step = Step(entry.seq, token, sent.name, nid, birth, [], plan, ops.from_tokens(args))
            reply = self.store.apply(call, [step])
            if reply.status == "gone" and by_name and outbox.moved.get(queued, ()) is not None:
                # An append by name (add_message) goes to the list under that
                # name now, as it would have online; if there is none (or that
                # one is refused too: another incarnation), it is dropped, and so
                # are the next ones queued for the same list, without a lookup each.
                there = self._list_named(by_name.decode())
                if there is None or there == (nid, birth):
                    outbox.moved[queued] = None
                    break
                outbox.moved[queued] = nid, birth = there
                continue
            if reply.status != "stale":
                break
            # Others changed what this operation depends on since it was queued:
            # plan again from the server's data, as the online path builds again
            # from a fresh view; a whole-list rewrite is made again from the list
            # the server holds (sort what is there, clear what is there).
            if sent.name not in (b"lreplace", b"schange"):
                plan = None  # the script lists what is there now: never stale
                continue
            again = self.rewrite_again(entry, sent.nid, self.store.read_all())
            if again is None:
                break
            args, plan = again
        status = reply.status
        if status in ("ok", "dup"):
            self._index(created=status == "dup" or version_number(reply.stamp) == 1)
            if not entry.incarnation and not outbox.joined:
                # This replay created (or joined) the memory: the replica, made
                # offline on no incarnation, belongs to this one.
                outbox.join(self.writer, reply.incarnation)
                if not self.replica.incarnation:
                    self.replica.incarnation = reply.incarnation
            if entry.created and reply.first_nid is not None:
                first = reply.first_nid
                self._map(entry.created, [b"%d" % (first + i) for i in range(len(entry.created))])
            return
        if status == "exists" and not entry.incarnation and not outbox.joined and reply.incarnation:
            # Made offline on no memory, which another writer created meanwhile:
            # what was queued after it goes to that one, as it would have online.
            outbox.join(self.writer, reply.incarnation)
        if status == "exists" and entry.created and reply.extra and reply.extra[0][:1] == bytes((REF,)):
            # setdefault found a container already there: what was queued for
            # the default made offline goes to the one the server holds.
            real = reply.extra[0][1:].partition(b"=")[0]
            self._map(entry.created[:1], [real], {real: reply.extra[1]} if len(reply.extra) > 1 else {})
        if sent.name[:1] == b"l":
            outbox.skip(self.writer, sent.nid)
        if status in ("same", "exists") or (status == "missing" and sent.name != b"lset"):
            return  # the server already is as this operation would leave it
        why = {
            "gone": "the container it changes was deleted (or the server lost the memory) while offline",
            "index": "the list position it names no longer exists",
            "missing": "another writer removed the list item it replaces while offline",
            "stale": "another writer changed the same list while offline",
        }.get(status, status)
        error_type = ContainerDeleted if status == "gone" else ConcurrentModification
        error = error_type(f"a queued {sent.name.decode()} on {self.store.key} was dropped: {why}", key=self.store.key)
        outbox.dropped += entry.statements
        outbox.last_error = error
        log.warning("%s", error)

    def _list_named(self, name: str) -> tuple[bytes, bytes] | None:
        """The node id and birth of the list the server holds under root ``name``, or None if it holds none."""
        scratch = Replica(self)
        scratch.load(self.store.read_all())
        found = dict.get(scratch.root, name)
        return (found._rm_nid, found._rm_birth) if isinstance(found, ObservedList) else None

    def _dropped(self, entry: queue.Pending, error: Exception) -> None:
        """Count and report a queued operation that will never apply."""
        self.outbox.dropped += entry.statements
        self.outbox.last_error = kept(error)
        log.warning("%s: a queued %s was dropped: %s", self.store.key, entry.name.decode(), error)

    def rewrite_again(
        self, entry: queue.Pending, nid: bytes, fields: dict[bytes, bytes]
    ) -> tuple[list[bytes], ops.Plan] | None:
        """A queued whole-list or whole-set change made again from node ``nid`` in ``fields`` (an HGETALL).

        None if it cannot be: its function is not in this process (adopted
        from a spool), the node is gone, or the function fails on what the
        server holds now (a sort meeting a value it cannot compare).
        """
        named: dict[bytes, Callable[[Any], Any]] = ops.SET_INTENTS if entry.name == b"schange" else ops.INTENTS
        compute = entry.recompute or named.get(entry.intent)
        if compute is None:
            return None
        scratch = Replica(self)
        scratch.load(fields)
        node = scratch.nodes.get(nid)
        try:
            if isinstance(node, ObservedSet) and entry.name == b"schange":
                adds, removes = compute(set(node))
                op: ops.Op = ops.SetChange(nid, adds, removes, mod=node._rm_mod)
            elif isinstance(node, ObservedList) and entry.name == b"lreplace":
                children = {id(v): v._rm_nid for v in node if isinstance(v, Proxy)}
                op = ops.ListReplace(nid, node._rm_mod, compute(list(node)), children)
            else:
                return None
        except Exception as exc:  # the user's function, on data others changed: report, never wedge the queue
            log.warning("%s: a queued %s could not be made again on the server's data: %r", self.store.key,
                        entry.name.decode(), exc)  # fmt: skip
            return None
        return ops.tokens(op.args()), scratch.removal_plan(op) or {}

    def _map(self, provisional: list[bytes], real: list[bytes], births: dict[bytes, bytes] | None = None) -> None:
        """Nodes made offline now have the server's ids (and, when joined to nodes made by others, their births)."""
        mapping = {p: r for p, r in zip(provisional, real, strict=True) if p not in self.outbox.renames}
        self.outbox.rename(self.writer, mapping)
        self.replica.rename(mapping)
        if births:
            self.outbox.rebirth(self.writer, births)
            for nid, birth in births.items():
                node = self.replica.nodes.get(nid)
                if node is not None:
                    node._rm_birth = birth


@dataclass(frozen=True)
class Stats:
    """What :meth:`Memory.stats` reports."""

    bytes_used: int  #: MEMORY USAGE of the memory's keys (their stored bytes where the server lacks it)
    fields: int  #: hash fields, journal and bookkeeping included
    pending: int  #: operations queued offline, not yet in Redis


@dataclass(frozen=True)
class Metadata:
    """What :meth:`Memory.metadata` reports."""

    created_at: dt.datetime | None  #: when the memory was first written (UTC); None if it does not exist
    last_activity: dt.datetime | None  #: when it last changed (UTC)
    message_count: int | None  #: ``len(messages)`` of a conversation; None for a plain memory


def _datetime(milliseconds: int | None) -> dt.datetime | None:
    return None if milliseconds is None else dt.datetime.fromtimestamp(milliseconds / 1000, dt.UTC)


def _milliseconds(seconds: float) -> int:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not seconds > 0:
        raise ValueError(f"an expiry must be a positive number of seconds, not {seconds!r}")
    return max(1, round(seconds * 1000))


def _appending(target: ObservedList, items: list[Any], name: str) -> Callable[[], ops.Op]:
    """What builds an append of ``items`` to ``target`` by its root ``name`` (see :meth:`MemoryCore.append_to`)."""

    # The list's id as it is when the op is built: the replay that submit may
    # run first gives a list made offline the id the server gave it.
    def build() -> ops.Op:
        return ops.ListAppend(target._rm_nid, list(items), to=name)

    return build


def _lean_hints(
    op: ops.Op, proxy: ObservedList | ObservedDict | ObservedSet, since: bytes, call: list[bytes], token: bytes
) -> tuple[bytes, ...]:
    """What an append of one item (not a container with fields of its own) that trims nothing, or a set of one key
    to a scalar, writes (see :func:`~redis_memory.store.append_hints`); else ()."""
    if isinstance(op, ops.ListAppend) and isinstance(proxy, ObservedList):
        if len(op.values) != 1 or op.values[0].args[1] != 2 or (op.keep and len(proxy) + 1 > op.keep):
            return ()
        return append_hints(op.nid, proxy._rm_lo, len(proxy), proxy._rm_mod, proxy._rm_birth, since, call, token)
    if isinstance(op, ops.DictSet) and isinstance(proxy, ObservedDict) and proxy._rm_up is None:
        if isinstance(op, ops.DictSetDefault):
            return ()  # not a path of its own on the server
        if len(op.values) != 1 or op.values[0].args[1] != 2 or op.values[0].nodes:
            return ()
        header = (len(proxy), proxy._rm_next, proxy._rm_mod, proxy._rm_birth)
        return set_hints(op.nid, *header, op.keys[0], op.items[0][0] not in proxy, since, call, token)
    return ()


def _server_ids(first: int | None) -> Iterator[bytes]:
    """The ids the server gave the nodes an operation created, in order."""
    return (b"%d" % n for n in itertools.count(first or 0))


_RETRY: Any = object()


def _malformed(error: ServerRefused) -> bool:
    """True if the script itself failed on the operation's arguments (a Lua error), not a command it ran.

    A command refused inside the script (OOM, NOPERM) names the script too,
    but starts with its own error code: that refusal may pass later.
    """
    text = str(error.__cause__ or error)
    if "OOM" in text or "NOPERM" in text or "permission" in text or "can't run" in text:
        return False
    # A Lua error names its line ("user_function:360: ..."); a refused command
    # ends with where it was called from ("on @user_function:620.").
    return bool(re.search(r"user_function:\d+: |unknown operation", text))


class SharedCores:
    """The cores of this process's memories, by server, key and options, least recently used first.

    Memory objects built on the same server (client), key and options share
    one core: one replica, one writer id, one queue. So a memory built per
    request in a process that served that memory before costs no full load,
    and writer entries grow with processes, not with objects built. Cores
    that no open memory object holds (let go of, or closed) are kept up to
    :attr:`limit`, then the least recently used is forgotten (a proxy still
    held on it keeps working through it). A core closed with changes it
    could not send, or with a spool, is never taken again; nor is one being
    closed. Taking, holding and letting go happen under one lock, so a core
    is never closed under a memory object that has just taken it.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lock = threading.Lock()
        self.cores: OrderedDict[tuple[Any, ...], MemoryCore] = OrderedDict()
        #: Channels whose client is gone that still have cores kept here (one had a queue to replay).
        self.orphans: weakref.WeakSet[Any] = weakref.WeakSet()

    def take(self, key: tuple[Any, ...], make: Callable[[], MemoryCore], holder: Memory) -> MemoryCore:
        """The core for ``key`` (made if there is none), held by ``holder``, marked most recently used."""
        with self.lock:
            if connection.orphaned or self.orphans:
                self._forget_orphans()
            core = self.cores.pop(key, None)
            if core is not None and (core.closing or (core.closed and not core.reusable())):
                core = None  # a fresh core takes up what that one leaves
            if core is None:
                core = make()
            core.holders.add(holder)
            self.cores[key] = core
            if len(self.cores) > self.limit:  # else no idle core is beyond the limit: nothing to scan
                self._trim()
        # Weakly: a memory object kept after its close must not keep the core alive.
        weakref.finalize(holder, _let_go, weakref.ref(core))
        core.reopen()
        core.adopt()  # a process that ended since this core was made may have left a queue
        return core

    def release(self, core: MemoryCore, holder: Memory) -> bool:
        """``holder`` is closed: True if it was the last memory object holding ``core`` (now closing)."""
        with self.lock:
            core.holders.discard(holder)
            if core.holders or core.closing:
                return False
            core.closing = True
            return True

    def closed(self, core: MemoryCore) -> None:
        """The last holder closed ``core``: it may be taken again (or, closed unfit for it, it is forgotten)."""
        with self.lock:
            core.closing = False
            if not core.reusable():
                for key, kept in list(self.cores.items()):
                    if kept is core:
                        del self.cores[key]
            self._trim()

    def _forget_orphans(self) -> None:
        """Forget the idle cores of channels whose client is gone: no memory object can take them again.

        A core with a queue stays until it is replayed; its channel is looked at again on each take.
        """
        while connection.orphaned:
            found = connection.orphaned.popleft()()
            if found is not None:
                self.orphans.add(found)
        kept = set()
        for key, core in list(self.cores.items()):
            if key[0] in self.orphans:
                if core.holders or core.outbox or core.closing:
                    kept.add(key[0])
                else:
                    del self.cores[key]
        for found in list(self.orphans):
            if found not in kept:
                self.orphans.discard(found)

    def _trim(self) -> None:
        """Forget the least recently used cores no memory object holds, beyond the limit (with the lock)."""
        idle = [key for key, core in self.cores.items() if not (core.holders or core.outbox or core.closing)]
        for key in idle[: max(0, len(idle) - self.limit)]:
            del self.cores[key]

    def resize(self, limit: int) -> None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise ValueError(f"the number of memories kept for reuse must be an int >= 0, not {limit!r}")
        with self.lock:
            self.limit = limit
            self._trim()

    def after_fork(self) -> None:
        """In a forked child: closed cores keep the parent's writer id, so they are not taken again."""
        self.lock = threading.Lock()
        for key, core in list(self.cores.items()):
            if core.closed:
                del self.cores[key]


_shared = SharedCores(256)


def _let_go(core: weakref.ref[MemoryCore]) -> None:
    found = core()
    if found is not None:
        found.let_go()


def keep_memories(limit: int) -> None:
    """How many memories this process keeps loaded for reuse once no memory object holds them (default 256).

    A memory built again on the same server, key and options then starts
    from the kept replica (one version check) instead of a full load. 0
    keeps none (memory objects open at the same time still share one).
    """
    _shared.resize(limit)


def _check_name(name: Any) -> None:
    if not isinstance(name, str):
        raise TypeError(f"memory field names are str, not {type(name).__name__}")


def _after_fork_in_child() -> None:
    tracking.after_fork()  # first: the channels reset their trackers
    _shared.after_fork()
    for core in list(_live_cores):
        core.after_fork()
    connection.after_fork()
    queue.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _report_unsent_at_exit() -> None:
    """At interpreter exit: replay what can be replayed now, and say what is lost."""
    for core in list(_live_cores):
        if core.outbox and core.link.online:
            with contextlib.suppress(Exception):
                core.drain()
        if core.outbox and core.outbox.spool is None:
            log.error(
                "%s: %d queued operations never reached Redis and are lost with this process "
                "(a memory opened with spool= keeps them for the next process)",
                core.store.key,
                len(core.outbox),
            )


atexit.register(_report_unsent_at_exit)


def _status(core: MemoryCore) -> queue.Status:
    outbox = core.outbox
    error = outbox.last_error or core.link.last_error
    # A copy: the kept one, raised by its reader, would get a traceback holding the reader's frames.
    return queue.Status(core.link.online, len(outbox), outbox.dropped, None if error is None else kept(error))


class _Closed:
    """What a closed memory object reaches instead of its core: MemoryClosed for all but its name and key."""

    def __init__(self, core: MemoryCore) -> None:
        self.store, self.name = core.store, core.name
        #: What status() answers once closed (it keeps no hold on the core).
        self.status = _status(core)

    def __getattr__(self, attribute: str) -> Any:
        key = self.store.key
        raise MemoryClosed(f"{key} was closed here; open a new memory to use it", key=key)


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
    * *offline*: a command could not reach Redis (it waited at most the
      connect timeout). Writes apply to the replica and join a bounded queue
      (``max_pending``; beyond it :class:`~redis_memory.errors.OfflineQueueFull`
      and nothing changes), without touching the network; reads are served
      from the replica. A memory never loaded raises
      :class:`~redis_memory.errors.ConnectionFailed`. A background thread
      reconnects.
    * *replaying*: Redis is back; the queue replays in order, exactly once,
      then the replica reloads. Operations the server refuses then (their
      container was deleted meanwhile) are dropped, logged and counted in
      :meth:`status`. Then *online* again.
    * *deleted*: after :meth:`delete` the memory's keys are gone; the next
      write starts a new memory under the same name.
    * *closed*: after :meth:`close` (or the end of a ``with`` block) its
      connection, reconnect thread and spool file are released: changes
      still queued were flushed (if Redis was reachable, within a bound),
      left in the spool, or reported lost. Reads and writes through it, and
      changes through its proxies, raise
      :class:`~redis_memory.errors.MemoryClosed`; closing again does nothing.
      A memory let go of without closing releases its claim on the thread
      once nothing of it is queued.

    With ``spool=<directory>`` queued operations are also appended to a file
    there, so that a process that dies while offline loses nothing: the
    next memory opened on the same key and spool replays them.

    With ``tracking=True`` the replica is kept coherent by the server
    (CLIENT TRACKING on a RESP3 connection of the library's own): a read of
    unchanged data makes no round trip, and a read that follows an
    invalidation checks the version as usual. A server or client that cannot
    track (fakeredis, a Redis Cluster) keeps the version check. See
    tracking.py for what it guarantees and docs/design.md for the window in
    which a read may miss a write another process just made.

    With ``wait_for_replicas=N`` each write also waits (``WAIT``, in the same
    round trip) until N replicas of its master have it, at most
    ``replica_timeout`` seconds. A write fewer replicas confirmed in time is
    kept as one whose outcome is unknown: applied here and queued with its
    id (``status().pending`` counts it, ``flush()`` waits for it), and sent
    again, answered ``dup`` or applied if a failover lost it, until N
    replicas confirm it.
    """

    _rm: MemoryCore
    _rm_client: Client
    _rm_feeds: weakref.WeakSet[Feed | Subscription]
    _rm_drops_told: int
    _rm_kind = "memory"

    def __init__(
        self,
        name: str,
        *,
        client: Client | None = None,
        url: str | None = None,
        prefix: str = "rm",
        max_pending: int = queue.DEFAULT_MAX_PENDING,
        spool: str | os.PathLike[str] | None = None,
        ttl: float | None = None,
        author: str | None = None,
        wait_for_replicas: int = 0,
        replica_timeout: float = REPLICA_TIMEOUT,
        tracking: bool = False,
    ) -> None:
        if not isinstance(tracking, bool):
            raise TypeError(f"tracking must be True or False, not {tracking!r}")
        if author is not None and not isinstance(author, str):
            raise TypeError(f"author must be a str, not {type(author).__name__}")
        if not isinstance(max_pending, int) or isinstance(max_pending, bool) or max_pending < 1:
            raise ValueError(f"max_pending must be an int of at least 1, not {max_pending!r}")
        if not isinstance(wait_for_replicas, int) or isinstance(wait_for_replicas, bool) or wait_for_replicas < 0:
            raise ValueError(f"wait_for_replicas must be an int >= 0, not {wait_for_replicas!r}")
        # Checked before they key a shared core.
        ttl_ms = None if ttl is None else _milliseconds(ttl)
        replicas = (wait_for_replicas, _milliseconds(replica_timeout))
        redis_client = connection.connect(client, url)
        key, companions, bounds = self._rm_own_key(prefix, name), self._rm_companions(prefix, name), self._rm_bounds()
        spooled = None if spool is None else os.fspath(spool)
        options = (max_pending, spooled, ttl_ms, tuple(sorted(bounds.items())), author, replicas, tracking)

        # A memory built by an async memory's worker (aio.py) gets a core of its own,
        # driven by that thread only: a shared one would also serve other threads.
        driver = threading.current_thread() if getattr(threading.current_thread(), "rm_driver", False) else None
        loop = getattr(driver, "rm_loop", None)  # the event loop of the call that builds it

        def make() -> MemoryCore:
            store = Store(redis_client, key, companions, tracking, driven=driver is not None, loop=loop)
            connection.watch(redis_client, store.channel)  # its end makes the kept core an orphan
            store.replicas = replicas
            core = MemoryCore(store, name, max_pending, spool, ttl, bounds, author, shared=driver is None)
            core.catalog = self._rm_catalog(redis_client, prefix)
            if core.catalog is not None:
                # Its listing speaks over its own channel, which closes with it (a tracked one included).
                core.catalog.channel = store.channel
            core.driver = driver
            return core

        if driver is not None:
            core = make()
            core.holders.add(self)
        else:
            # Keyed by the channel the store uses (the tracked one for tracked memories): the one watched
            # for its client's end (see connection.watch).
            core = _shared.take((connection.channel(redis_client, tracking), key, companions, options), make, self)
        object.__setattr__(self, "_rm", core)
        # The core holds it weakly (kept for reuse, it must not keep the client alive): the memory object does.
        object.__setattr__(self, "_rm_client", redis_client)
        object.__setattr__(self, "_rm_feeds", weakref.WeakSet())
        #: The queue's drop count when this object's flush() last told of drops (see flush).
        object.__setattr__(self, "_rm_drops_told", core.outbox.dropped)

    @classmethod
    def _rm_key(cls, prefix: str, name: str) -> str:
        return memory_key(prefix, cls._rm_kind, name)

    def _rm_own_key(self, prefix: str, name: str) -> str:
        return self._rm_key(prefix, name)

    def _rm_companions(self, prefix: str, name: str) -> tuple[str, ...]:
        """Keys outside the memory that share its expiry."""
        return ()

    @classmethod
    def _rm_catalog(cls, client: Client, prefix: str) -> Catalog | None:
        """The index this kind of memory is listed in."""
        return Catalog(client, prefix, cls._rm_kind, lambda name: cls._rm_key(prefix, name))

    @classmethod
    def list_ids(
        cls,
        *,
        idle_for: float | None = None,
        limit: int | None = None,
        client: Client | None = None,
        url: str | None = None,
        prefix: str = "rm",
    ) -> list[str]:
        """Ids of the stored memories of this kind, least recently active first.

        With ``idle_for``, only those not written for that many seconds.
        From the library's index: O(log n + result), never KEYS or SCAN.
        """
        catalog = cls._rm_catalog(connection.connect(client, url), prefix)
        return catalog.ids(idle_for, limit) if catalog else []

    @classmethod
    def delete_idle(
        cls,
        idle_for: float,
        *,
        batch: int = 100,
        client: Client | None = None,
        url: str | None = None,
        prefix: str = "rm",
    ) -> int:
        """Delete every memory of this kind idle for ``idle_for`` seconds, ``batch`` at a time; how many."""
        redis_client = connection.connect(client, url)
        deleted = 0
        while True:
            found = cls.list_ids(idle_for=idle_for, limit=batch, client=redis_client, prefix=prefix)
            kept = 0
            for name in found:
                with cls._rm_open(name, redis_client, prefix) as opened:
                    # Idle again by the server's clock, in the delete itself: a
                    # write since the listing (or a client clock ahead) keeps it.
                    if opened._rm_delete(_milliseconds(idle_for) if idle_for > 0 else 0):
                        deleted += 1
                    else:
                        kept += 1
            if len(found) < batch or kept == len(found):
                return deleted

    @classmethod
    def _rm_open(cls, name: str, client: Client, prefix: str) -> Any:
        """The object that owns the stored memory ``name`` (for deleting it whole)."""
        return cls(name, client=client, prefix=prefix)

    def _rm_bounds(self) -> dict[str, int]:
        """Attributes whose lists keep only their newest items, and how many."""
        return {}

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

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """``with mem.batch():`` makes every change inside one call to Redis, atomic and in order.

        Each statement applies to the local view at once; at the block's end
        they go to Redis in one round trip, all or none, and the block
        returns once they are there. An exception inside sends nothing. See
        :mod:`redis_memory.batch` for conflicts, nesting and offline.
        """
        return self._rm.batch()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every change made so far is in Redis; True when it is.

        Online, writes are sent before the statement that made them returns,
        so this only waits for writes in flight on other threads. With
        changes queued offline it retries the server and replays the queue,
        for up to ``timeout`` seconds (None: as long as it takes). False
        also when the server refused a queued change on replay (its
        container was deleted meanwhile, or the server came back without the
        memory) since this object's last flush that reached Redis:
        :meth:`status` counts those, and the log names each.
        """
        core = self._rm
        core.check_open()
        core.outside_batch("flush()")
        if not core.flush(timeout):
            return False  # not there yet: a drop meanwhile is told by the flush that gets there
        told, self._rm_drops_told = self._rm_drops_told, core.outbox.dropped
        return self._rm_drops_told == told

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Release the memory's connection, threads and spool file; using it afterwards raises MemoryClosed.

        Changes still queued (Redis was unreachable) are flushed first if
        Redis is reachable, waiting at most ``timeout`` seconds; what is
        left then stays in the spool for the next memory opened on it, or,
        without a spool, is logged as an error: lost. Feeds and
        subscriptions made by :meth:`subscribe` are closed too. Closing
        twice does nothing.
        """
        core = self._rm
        if isinstance(core, _Closed):
            return
        for feed in list(self._rm_feeds):
            feed.close()
        handle = _Closed(core)
        object.__setattr__(self, "_rm", handle)
        if _shared.release(core, self):  # the last memory object open on it
            try:
                core.close(timeout)
            finally:
                _shared.closed(core)
        handle.status = _status(core)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self) -> queue.Status:
        """Online or offline, operations queued, operations dropped on replay, the last error."""
        if isinstance(self._rm, _Closed):
            return self._rm.status
        with self._rm.lock:
            return _status(self._rm)

    def expire(self, seconds: float) -> None:
        """Let the memory expire in ``seconds`` unless written again (PEXPIRE of its keys): O(1).

        With ``ttl=`` every write restarts that clock anyway. Needs Redis.
        """
        self._rm_server_call(lambda store: store.expire(_milliseconds(seconds)))

    def persist(self) -> None:
        """Remove any expiry (PERSIST of its keys): O(1). Writes with ``ttl=`` set one again."""
        self._rm_server_call(lambda store: store.expire(None))

    def ttl(self) -> float | None:
        """Seconds left before the memory expires (PTTL), None if it does not expire or does not exist."""
        left = self._rm_server_call(lambda store: store.remaining())
        return left / 1000 if left >= 0 else None

    def metadata(self) -> Metadata:
        """When the memory was created and last changed (kept by the write script), and its message count.

        Read from Redis (one HMGET), outside the attribute namespace.
        """
        created, active = self._rm_server_call(lambda store: store.activity())
        with self._rm.lock:
            self._rm.refresh()  # for the message count
        return Metadata(_datetime(created), _datetime(active), self._rm_message_count())

    def _rm_message_count(self) -> int | None:
        return None

    def stats(self) -> Stats:
        """Bytes this memory takes in Redis (MEMORY USAGE), its hash fields, and operations queued offline."""
        used, fields = self._rm_server_call(lambda store: store.size())
        return Stats(used, fields, len(self._rm.outbox))

    @overload
    def subscribe(self, callback: None = None) -> Feed: ...

    @overload
    def subscribe(self, callback: Callable[[Event], Any]) -> Subscription: ...

    def subscribe(self, callback: Callable[[Event], Any] | None = None) -> Feed | Subscription:
        """Follow this memory's changes, made by any process, from now on.

        Without a callback: a :class:`~redis_memory.feed.Feed`, an iterator of
        :class:`~redis_memory.feed.Event` (``for event in mem.subscribe()``).
        With one: a :class:`~redis_memory.feed.Subscription` that calls it
        with each event from a background thread. Close either to stop.
        """
        self._rm.check_open()
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        made = Feed(self._rm.shadow()) if callback is None else Subscription(self._rm.shadow(), callback)
        self._rm_feeds.add(made)
        return made

    def health_check(self) -> connection.Health:
        """Round trip, server version and mode of this memory's server."""
        return connection.health_check(self._rm_client)

    @classmethod
    def count(cls, *, client: Client | None = None, url: str | None = None, prefix: str = "rm") -> int:
        """How many memories of this kind the index lists (ZCARD): O(1). Expired ones leave when listed."""
        catalog = cls._rm_catalog(connection.connect(client, url), prefix)
        return catalog.count() if catalog else 0

    def _rm_server_call(self, call: Callable[[Store], Any]) -> Any:
        """``call`` on the store; offline, only after one probe (at most the connect timeout) found Redis back."""
        core = self._rm
        with core.lock:
            core.check_open()
            link = core.link
            if not link.online and not link.probe():
                error = link.last_error
                raise ConnectionFailed(f"Redis is unreachable: {error}", key=core.store.key) from error
            try:
                return call(core.store)
            except ConnectionFailed as exc:
                core.link.failed(exc)
                raise

    def delete(self) -> None:
        """Remove the whole memory from Redis (DEL): O(size). Needs Redis; queued changes are discarded."""
        self._rm.outside_batch("delete()")
        self._rm_delete(None)

    def _rm_delete(
        self,
        idle_ms: int | None,
        keys: tuple[str, ...] = (),
        hashes: int = 1,
        participants: tuple[str, int] | None = None,
    ) -> bool | None:
        """Delete the memory, and ``keys`` with it, in one step; with ``idle_ms``, only if idle that long.

        Idleness is that of the first ``hashes`` keys (this memory's first),
        by the server's clock. Whether anything was deleted; None if the
        participant set (``participants``: its key and size) has changed.
        """
        core = self._rm
        with core.lock:
            done = self._rm_server_call(lambda store: store.delete(core.author, idle_ms, keys, hashes, participants))
            if done == -2:
                return None
            if done < 0:
                return False
            core.outbox.discard()
            core.replica.load({})
            if core.catalog is not None:
                core.indexed_at = -INDEX_REFRESH
                try:
                    core.catalog.forget(core.name)
                except RedisMemoryError as exc:  # a stale entry goes when a listing meets it
                    log.info("%s: index entry not removed: %s", core.store.key, exc)
        return True


class ConversationMemory(Memory):
    """A :class:`Memory` keyed by a conversation id.

    With ``max_messages=N``, every append to ``messages`` keeps only the
    newest N, dropping the oldest in the same atomic step: O(1) per message.
    """

    _rm_kind = "conversation"

    def __init__(self, conversation_id: str, *, max_messages: int | None = None, **options: Any) -> None:
        if max_messages is not None and (not isinstance(max_messages, int) or max_messages < 1):
            raise ValueError(f"max_messages must be a positive int, not {max_messages!r}")
        object.__setattr__(self, "_rm_max_messages", max_messages)
        super().__init__(conversation_id, **options)

    def _rm_bounds(self) -> dict[str, int]:
        limit: int | None = self._rm_max_messages
        return {"messages": limit} if limit else {}

    def _rm_message_count(self) -> int | None:
        messages = dict.get(self._rm.replica.root, "messages")
        return len(messages) if isinstance(messages, list) else 0

    def window(
        self,
        max_tokens: int,
        *,
        counter: Callable[[str], int] | None = None,
        keep_system: bool = True,
        summarize: Callable[[list[dict[str, Any]]], Any] | None = None,
    ) -> list[dict[str, Any]]:
        """The newest ``messages`` that fit ``max_tokens``, as plain dicts to send to a model.

        Reads the messages fresh, then :func:`~redis_memory.window.fit_messages`:
        a leading system message is kept, ``summarize`` may fold what was cut
        into one message. Nothing stored changes.
        """
        try:
            messages = self._rm.read("messages", MissingAttribute)
        except MissingAttribute:
            messages = []
        return fit_messages(messages, max_tokens, counter=counter, keep_system=keep_system, summarize=summarize)

    def add_message(self, message: Any) -> None:
        """Append one message to ``messages`` (made if missing): a dict, an OpenAI SDK object or a LangChain message.

        Stored as an OpenAI-style dict (see :mod:`redis_memory.messages`):
        one FCALL, two the first time (the list is made by a setdefault, so
        two processes starting one conversation never overwrite each other).
        """
        self.add_messages([message])

    def add_messages(self, messages: Iterable[Any]) -> None:
        """Append several messages at once (one FCALL): see :meth:`add_message`."""
        stored = [as_message(message) for message in messages]
        if stored:
            self._rm.append_to("messages", stored)

    @property
    def conversation_id(self) -> str:
        """The id this conversation was opened with."""
        return self._rm.name
