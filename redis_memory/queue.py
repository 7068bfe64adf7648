"""The offline write queue, its optional spool on disk, and reconnecting.

While Redis is unreachable a memory keeps working on its replica: each change
is applied locally and queued as the same operation the server would have
run, with the same operation id. When Redis is back the queue is replayed in
order; the server applies an operation id once, so a replayed operation whose
first copy did land is answered ``dup`` instead of being applied twice.

Nodes created offline get provisional ids (``~<writer>.<n>``); when the
operation that created them is replayed, the server's reply says which ids it
gave, and later queued operations and the replica's proxies are renamed.

The states of a connection (:class:`Link`):

* *online*: commands go to Redis.
* *offline*: a command failed to reach Redis. A warning is logged once;
  writes queue without touching the network; reads are served from the
  replica. A background thread probes the server with growing, jittered
  delays (:data:`FIRST_DELAY` up to :data:`MAX_DELAY`).
* back *online*: the probe succeeded. Every memory with queued operations
  replays them (in the background, or on its own next read or write,
  whichever comes first), then reloads its replica from the server.

The thread runs only while it is needed: while some memory has operations
queued, or while offline with some memory open on the link. It ends once
no memory needs it (the last one closed, or let go with nothing queued),
and the connection is closed with the last memory.
"""

from __future__ import annotations

import logging
import os
import random
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import codec, ops
from .connection import Channel, deadline
from .errors import ConnectionFailed, OfflineQueueFull, UnsupportedPlatform, kept
from .store import escape_id

try:
    import fcntl
except ImportError:  # Windows: no file locks of this kind, so no spool (see Spool)
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from .memory import MemoryCore

log = logging.getLogger("redis_memory")
_jitter = random.Random()

#: Operations one memory may queue while offline; beyond it a change raises
#: :class:`~redis_memory.errors.OfflineQueueFull` and nothing is queued.
DEFAULT_MAX_PENDING = 10_000
#: Delays between reconnect attempts: doubling from the first to the last,
#: each drawn at random between half and all of it.
FIRST_DELAY = 0.05
MAX_DELAY = 1.0
#: The spool is fsynced when it was last fsynced longer ago than this.
SPOOL_FSYNC_INTERVAL = 1.0


@dataclass
class Pending:
    """One queued operation: its id, what it expects, and its script arguments."""

    writer: bytes
    seq: int
    incarnation: bytes  # of the memory it was made on; b"" if it did not exist
    name: bytes
    nid: bytes
    plan: ops.Plan
    args: list[bytes]
    created: list[bytes] = field(default_factory=list)  # provisional ids, in the server's allocation order
    author: bytes = b""  # the author= of the memory that made it, for its change event
    birth: bytes = b""  # the birth of node ``nid`` when the operation was made (see store.py)
    intent: bytes = b""  # a whole-list rewrite's name (ops.INTENTS), to make it again on replay
    #: The function that makes a whole-list rewrite again from the server's list; not spooled.
    recompute: Callable[[Any], Any] | None = field(default=None, compare=False, repr=False)
    group: int = 0  # the first seq of the batch it belongs to (replayed with it as one call), or 0
    statements: int = 1  # the statements it stands for (a batch's sets merged into one, see batch.py)

    def record(self) -> list[Any]:
        plan = [[nid, mod, keys] for nid, (mod, keys) in self.plan.items()]
        return [
            b"op", self.writer, self.seq, self.incarnation, self.name, self.nid, plan, self.args, self.created,
            self.author, self.birth, self.intent, self.group, self.statements,
        ]  # fmt: skip

    @classmethod
    def from_record(cls, record: list[Any]) -> Pending:
        if len(record) == 12:  # written before batches existed
            record = [*record, 0]
        if len(record) == 13:  # written before a batch's sets were merged
            record = [*record, 1]
        _, writer, seq, incarnation, name, nid, plan, args, created, author, birth, intent, group, statements = record
        plan_map = {n: (m, list(k)) for n, m, k in plan}
        return cls(writer, seq, incarnation, name, nid, plan_map, list(args), list(created), author, birth, intent,
                   group=group, statements=statements)  # fmt: skip

    def renamed(self, renames: dict[bytes, bytes]) -> Pending:
        """This operation with provisional node ids replaced by the server's."""
        if not renames:
            return self

        def rename(value: bytes) -> bytes:
            if value[:1] == b"~":
                return renames.get(value, value)
            if value[:2] == b"\xc1~":  # a reference (the item a list write names, see ops.stored_form)
                nid, sep, blob = value[1:].partition(b"=")
                return b"\xc1" + renames.get(nid, nid) + sep + blob
            return value

        return Pending(
            self.writer,
            self.seq,
            self.incarnation,
            self.name,
            rename(self.nid),
            {rename(n): keys for n, keys in self.plan.items()},
            [rename(a) for a in self.args],
            self.created,
            self.author,
            self.birth,
            self.intent,
            self.recompute,
            self.group,
            self.statements,
        )


def provisional_ids(writer: bytes, counter: Iterator[int], count: int) -> list[bytes]:
    """Ids for ``count`` nodes made offline, in the order the server will allocate its own."""
    return [b"~%s.%d" % (writer, next(counter)) for _ in range(count)]


class Spool:
    """An append-only file of one memory's queued operations, for one process.

    Files live in ``<directory>/<escaped key>/<writer>.spool``; each is held
    with an exclusive ``flock`` by the process writing it. A file nobody
    holds belongs to a process that died: the next memory opened on the same
    key and directory adopts its operations. Records are length-prefixed
    msgpack: an operation, or the id of one the server has confirmed.

    fsync policy: every record is written to the operating system before the
    statement that queued it returns, so a process that crashes or is killed
    loses nothing. The file is fsynced when a record is appended and the
    last fsync is older than :data:`SPOOL_FSYNC_INTERVAL`, so a machine that
    loses power loses at most about that much of its queue.
    """

    def __init__(self, directory: str | os.PathLike[str], key: str) -> None:
        if fcntl is None:
            raise UnsupportedPlatform("spool= needs a POSIX system (Linux or macOS): its files are held with flock")
        self.folder = Path(directory) / escape_id(key)
        self.fd: int | None = None
        self.path: Path | None = None
        self.synced = 0.0
        self._release: Any = None  # the finalizer that releases the file of a spool collected unclosed

    def _own(self, writer: bytes) -> int:
        if self.fd is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            # Locked before it gets the name adopters look for, so that none
            # can take a live process's new file for a dead one's.
            path = self.folder / f"{writer.decode()}.spool"
            fresh = path.with_suffix(".new")
            fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(fresh, path)
            self.fd, self.path = fd, path
            # A core let go of and forgotten unclosed (its program let go of its memories)
            # must not keep the file open and locked for the life of the process.
            self._release = weakref.finalize(self, _release_spool, fd, path)
            # Not at interpreter exit: the exit's replay (memory._report_unsent_at_exit) runs after the
            # finalizers and still writes to the file; the process's end closes it and releases the lock.
            self._release.atexit = False
        return self.fd

    def _write(self, writer: bytes, record: list[Any]) -> None:
        data = codec.encode_record(record)
        fd = self._own(writer)
        frame = memoryview(struct.pack(">I", len(data)) + data)
        while frame:
            frame = frame[os.write(fd, frame) :]
        now = time.monotonic()
        if now - self.synced > SPOOL_FSYNC_INTERVAL:
            os.fsync(fd)
            self.synced = now

    def append(self, owner: bytes, entry: Pending) -> None:
        self._write(owner, entry.record())

    def append_group(self, owner: bytes, entries: list[Pending]) -> None:
        """A batch's operations as one record: a process killed while writing it leaves none of them."""
        self._write(owner, [b"ops", [entry.record() for entry in entries]])

    def confirm(self, owner: bytes, entry: Pending) -> None:
        if self.fd is not None:
            self._write(owner, [b"ack", entry.writer, entry.seq])

    def note(self, owner: bytes, record: list[Any]) -> None:
        """Record what the replay learned (node ids, incarnation, skipped list changes)."""
        if self.fd is not None:
            self._write(owner, record)

    def clear(self) -> None:
        """The queue is empty: nothing in the file is needed any more."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)

    def close(self, keep: bool) -> None:
        """Release the file: kept for the next memory opened on this spool if ``keep``, else removed."""
        if self.fd is not None:
            self._release.detach()
            if not keep and self.path is not None:
                self.path.unlink(missing_ok=True)  # while locked: no adopter reads it half gone
            os.close(self.fd)
        self.fd = self.path = None

    def forget(self) -> None:
        """In a forked child: the file stays the parent's; closing this copy leaves the lock to the parent alone."""
        if self.fd is not None:
            self._release.detach()
            os.close(self.fd)
        self.fd = self.path = None

    def adopt(self, owner: bytes) -> list[Pending]:
        """The unconfirmed operations of dead processes' files, moved into this process's file."""
        if not self.folder.is_dir():
            return []
        adopted: list[Pending] = []
        for path in sorted(self.folder.glob("*.spool")):
            if path == self.path:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live process owns it
                found = _read_spool(path)
                for entry in found:
                    self.append(owner, entry)
                if found and self.fd is not None:
                    os.fsync(self.fd)
                path.unlink()
                adopted += found
            finally:
                os.close(fd)
        return adopted


def _release_spool(fd: int, path: Path) -> None:
    """A spool collected unclosed: an empty file is removed (while still locked), and the lock released.

    One with records is kept for the next memory opened on it to adopt.
    """
    try:
        if os.fstat(fd).st_size == 0:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _read_spool(path: Path) -> list[Pending]:
    """The operations of a spool file not confirmed in it, with what the replay learned applied.

    A torn last record (the process died while writing it) is ignored.
    """
    data = path.read_bytes()
    entries: dict[tuple[bytes, int], Pending] = {}
    renames: dict[bytes, bytes] = {}
    births: dict[bytes, bytes] = {}
    skipped: dict[bytes, int] = {}
    joined = b""
    pos = 0
    while pos + 4 <= len(data):
        (size,) = struct.unpack(">I", data[pos : pos + 4])
        if pos + 4 + size > len(data):
            break
        try:
            record = codec.decode_record(data[pos + 4 : pos + 4 + size])
        except ValueError:
            log.error("spool %s: undecodable record at byte %d; the rest of the file is skipped", path, pos)
            break
        pos += 4 + size
        if record[0] in (b"op", b"ops"):
            try:
                found = [Pending.from_record(r) for r in (record[1] if record[0] == b"ops" else [record])]
            except (ValueError, TypeError):
                log.error("spool %s: a malformed operation record at byte %d is dropped", path, pos)
                continue
            for entry in found:
                entries[(entry.writer, entry.seq)] = entry
        elif record[0] == b"ack":
            entries.pop((record[1], record[2]), None)
        elif record[0] == b"map":
            renames.update((p, r) for p, r in record[1])
        elif record[0] == b"birth":
            births.update((n, b) for n, b in record[1])
        elif record[0] == b"join":
            joined = record[1]
        elif record[0] == b"skip":
            skipped[record[1]] = skipped.get(record[1], 0) + 1
    adopted = []
    for entry in entries.values():
        entry = entry.renamed(renames)
        entry.birth = births.get(entry.nid, entry.birth)
        if not entry.incarnation:
            entry.incarnation = joined
        if entry.name == b"lreplace" and entry.nid in skipped:
            entry.args[0] = b"%d" % (int(entry.args[0]) - skipped[entry.nid])
        adopted.append(entry)
    return adopted


class Outbox:
    """One memory's queue of operations waiting for Redis, in order."""

    def __init__(self, limit: int, spool: Spool | None) -> None:
        if limit < 1:
            raise ValueError(f"max_pending must be at least 1, not {limit}")
        self.limit = limit
        self.spool = spool
        self.entries: deque[Pending] = deque()
        # Provisional node id -> the id the server gave, for entries still queued.
        self.renames: dict[bytes, bytes] = {}
        # How many queued changes to a list did not change it on the server,
        # so that a queued whole-list rewrite expects the right counter.
        self.skipped: dict[bytes, int] = {}
        # The births of nodes made by others that nodes made offline were joined to.
        self.births: dict[bytes, bytes] = {}
        # The incarnation a memory created by a replayed operation got.
        self.joined = b""
        # Lists replaced while offline (node id and birth) -> the list now under
        # the same name, for appends by name; None if there is none (not spooled:
        # found again on a replay).
        self.moved: dict[tuple[bytes, bytes], tuple[bytes, bytes] | None] = {}
        self.dropped = 0
        self.last_error: Exception | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def check_room(self, key: str, needed: int = 1) -> None:
        if len(self.entries) + needed > self.limit:
            raise OfflineQueueFull(
                f"Redis is unreachable and {self.limit} operations are already queued for {key}; "
                "this change was not made",
                key=key,
            )

    def push(self, owner: bytes, entry: Pending) -> None:
        if self.spool is not None:
            self.spool.append(owner, entry)
        self.entries.append(entry)

    def push_group(self, owner: bytes, entries: list[Pending]) -> None:
        """Queue a batch's operations, spooled as one record."""
        if self.spool is not None:
            self.spool.append_group(owner, entries)
        self.entries.extend(entries)

    def confirmed(self, owner: bytes, entry: Pending) -> None:
        """The head entry reached the server (or was dropped): take it off."""
        self.entries.popleft()
        if self.spool is not None:
            self.spool.confirm(owner, entry)
        if not self.entries:
            self.renames.clear()
            self.births.clear()
            self.skipped.clear()
            self.moved.clear()
            self.joined = b""
            if self.spool is not None:
                self.spool.clear()

    def after_fork(self) -> None:
        """In a forked child: the queue and its spool file stay the parent's."""
        if self.spool is not None:
            self.spool.forget()
        self.discard()

    def rename(self, owner: bytes, mapping: dict[bytes, bytes]) -> None:
        if mapping:
            self.renames.update(mapping)
            if self.spool is not None:
                self.spool.note(owner, [b"map", [[p, r] for p, r in mapping.items()]])

    def rebirth(self, owner: bytes, births: dict[bytes, bytes]) -> None:
        self.births.update(births)
        if self.spool is not None:
            self.spool.note(owner, [b"birth", [[n, b] for n, b in births.items()]])

    def join(self, owner: bytes, incarnation: bytes) -> None:
        self.joined = incarnation
        if self.spool is not None:
            self.spool.note(owner, [b"join", incarnation])

    def skip(self, owner: bytes, nid: bytes) -> None:
        self.skipped[nid] = self.skipped.get(nid, 0) + 1
        if self.spool is not None:
            self.spool.note(owner, [b"skip", nid])

    def discard(self) -> None:
        """Forget every queued entry (the memory was deleted, or in a forked child)."""
        self.entries.clear()
        self.renames.clear()
        self.births.clear()
        self.skipped.clear()
        self.moved.clear()
        self.joined = b""
        if self.spool is not None:
            self.spool.clear()


class Link:
    """Whether one channel reaches Redis, and the thread that finds out when it does again."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.online = True
        self.last_error: Exception | None = None
        self.lock = threading.Lock()
        # Strong references: a memory with queued operations is kept alive
        # until they are replayed, even if its user has let go of it.
        self.waiting: set[MemoryCore] = set()
        # The open memories on this link; weak, so that one let go of ends
        # its claim on the thread and the connection (so does a core kept for
        # reuse that no memory object holds: see MemoryCore.in_use).
        self.users: weakref.WeakSet[MemoryCore] = weakref.WeakSet()
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()
        self.pid = os.getpid()

    def attach(self, core: MemoryCore) -> None:
        """``core`` is open on this link."""
        with self.lock:
            self.users.add(core)

    def detach(self, core: MemoryCore) -> None:
        """``core`` was closed: forget it; with no memory left, close the connection and let the thread end."""
        with self.lock:
            self.users.discard(core)
            self.waiting.discard(core)
            idle = not self._used() and not self.waiting
        if idle:
            self.wake.set()
            # Not waiting for a probe in progress: the thread closes it then.
            self.channel.close(blocking=False)

    def release_if_unused(self) -> None:
        """No memory object may use this link any more: close its connection (the next command opens one).

        Called when a memory object is collected, perhaps inside this very
        thread's hold of the lock: so it never waits for the lock, and
        leaves the connection to the next check if the lock is busy.
        """
        if not self.lock.acquire(blocking=False):
            return
        try:
            idle = not self._used() and not self.waiting
        finally:
            self.lock.release()
        if idle:
            self.channel.close(blocking=False)

    def failed(self, error: ConnectionFailed) -> None:
        """A command did not reach Redis: go offline (once) and start reconnecting."""
        with self.lock:
            self.last_error = kept(error)
            if self.online:
                self.online = False
                log.warning("Redis unreachable (%s); changes are queued until it is back", self.last_error)
            self._start()

    def wait_for(self, core: MemoryCore) -> None:
        """``core`` has queued operations: replay them once Redis is reachable."""
        with self.lock:
            self.waiting.add(core)
            self._start()

    def replayed(self, core: MemoryCore) -> None:
        """``core``'s queue was replayed (by any thread): the link no longer keeps it."""
        with self.lock:
            self.waiting.discard(core)

    def probe(self) -> bool:
        """One PING now, waiting at most the connect timeout; True (and online) if Redis answered it.

        An error reply (BUSY, NOPERM, NOAUTH, ...) counts as still offline:
        the server cannot take the queue yet either.
        """
        try:
            with deadline(self.channel.connect_timeout()):
                self.channel.call(b"PING")
        except Exception as exc:
            with self.lock:
                self.last_error = kept(exc)
            return False
        with self.lock:
            if not self.online:
                self.online = True
                log.info("Redis reachable again")
        return True

    def _start(self) -> None:
        if self.pid != os.getpid():  # forked: the thread stayed in the parent
            self.pid, self.thread = os.getpid(), None
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._run, name="redis_memory-reconnect", daemon=True)
            self.thread.start()

    def _needed(self) -> bool:
        """Whether the thread has work: queued operations, or an open memory waiting for Redis (with the lock)."""
        # A queue emptied otherwise (delete(), close()) waits no more.
        self.waiting = {core for core in self.waiting if core.outbox}
        return bool(self.waiting) or (not self.online and self._used())

    def _used(self) -> bool:
        """Whether some memory object still uses this link (with the lock)."""
        return any(core.in_use() for core in self.users)

    def _pause(self, delay: float) -> None:
        """Sleep about ``delay`` (jittered); the last memory closing cuts it short."""
        self.wake.wait(delay * _jitter.uniform(0.5, 1.0))
        self.wake.clear()

    def _run(self) -> None:
        delay = FIRST_DELAY
        while True:
            with self.lock:
                if not self._needed():
                    self.thread = None
                    unused = not self._used()
                    break
            if not self.online:
                self._pause(delay)
                if not self.probe():
                    delay = min(delay * 2, MAX_DELAY)
                    continue
                delay = FIRST_DELAY
            with self.lock:
                cores = list(self.waiting)
            for core in cores:
                try:
                    # A replay that empties the queue says so itself, under the memory's lock
                    # (Link.replayed): a change queued after it is waited for again.
                    core.drain()
                except Exception as exc:  # a server error reply: report it, try again later
                    self.last_error = kept(exc)
                    log.error("replaying the queue of %s failed: %s", core.store.key, self.last_error)
                    self._pause(delay)
                    delay = min(delay * 2, MAX_DELAY)
        if unused:
            self.channel.close()

    def after_fork(self) -> None:
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread = None
        self.pid = os.getpid()
        self.waiting = set()


#: Every link of the process (for the fork). Each is kept by its channel and
#: the memories using it, and keeps its channel: so both go together.
_links: weakref.WeakSet[Link] = weakref.WeakSet()
_links_lock = threading.Lock()


def link(channel: Channel) -> Link:
    """The link state of ``channel``, shared by every memory using it."""
    with _links_lock:
        found: Link | None = channel.link
        if found is None:
            found = channel.link = Link(channel)
            _links.add(found)
        return found


def after_fork() -> None:
    """In a forked child: fresh locks, no reconnect thread yet."""
    global _links_lock
    _links_lock = threading.Lock()
    for found in list(_links):
        found.after_fork()


@dataclass(frozen=True)
class Status:
    """What :meth:`Memory.status` reports."""

    online: bool  #: the last command reached Redis, or a probe since did
    pending: int  #: operations queued, not yet confirmed by Redis
    dropped: int  #: queued operations the server refused on replay (reported in the log)
    last_error: Exception | None  #: the last connection error, or why the last dropped operation was
