"""Batches: ``with mem.batch():`` sends every change made inside in one call.

Inside the block each statement is built from the local view and applied to
it at once, as offline; nothing is sent. At the block's end the operations
go to the server in one ``FCALL`` of the apply function, which applies them
in order and all or none, so no other writer's change lands between them.
The block returns once they are in Redis.

* An exception inside the block sends nothing; the local view is reloaded
  from the server (offline: it is marked to reload once Redis is back).
* A batch inside a batch joins the outer one.
* Offline (or if the link broke while the call was on its way) the
  operations are queued as one group, replayed as one call.
* If the server refuses one of them (another writer changed what it depends
  on), nothing is written: the replica reloads and every statement is built
  again from the fresh view, as the online path does for a single
  operation, and the batch is sent again. A statement that can no longer be
  made (its container was deleted, its item is gone) is left out; the
  block then raises :class:`~redis_memory.errors.BatchIncomplete`, naming
  them, after the others are in Redis.

The memory's lock is held for the whole block: other threads using the
same memory wait for its end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import ops, queue
from .errors import BatchIncomplete, ConcurrentModification, ConnectionFailed, ContainerDeleted, RedisMemoryError
from .proxies import NO_OP, ObservedDict, ObservedList, ObservedSet
from .store import ANY_INCARNATION, Reply, Step

if TYPE_CHECKING:
    from .memory import MemoryCore

#: How often a batch is built again and resent after the server refused it.
MAX_ATTEMPTS = 20


@dataclass
class Entry:
    """One operation of a batch, and how to make it again."""

    op: ops.Op
    plan: ops.Plan | None
    seq: int
    created: list[bytes]  # provisional ids of the nodes it creates
    birth: bytes  # of node op.nid when it was built
    proxy: ObservedList | ObservedDict | ObservedSet
    build: Callable[[], ops.Op | None] | None  # None for a promotion (made again with what follows it)

    def step(self, writer: bytes) -> Step:
        return Step(self.seq, ops.op_token(writer, self.seq), self.op.name, self.op.nid, self.birth, self.created,
                    self.plan, self.op.args())  # fmt: skip


class Batch:
    """The operations of one ``with mem.batch():`` block, in order."""

    def __init__(self, core: MemoryCore) -> None:
        self.core = core
        self.entries: list[Entry] = []
        self.failures: list[RedisMemoryError] = []
        self.reload = False  # the replica cannot mirror an entry (it removes what it could not decode)

    def add(self, proxy: ObservedList | ObservedDict | ObservedSet, build: Callable[[], ops.Op | None]) -> Any:
        """Build the operation from the local view and apply it there; it is sent at the block's end."""
        core = self.core
        replica = core.replica
        if not proxy._rm_live:
            raise ContainerDeleted(
                f"this {type(proxy).__bases__[0].__name__} was deleted from {core.store.key}", key=core.store.key
            )
        op = build()
        if op is None:
            return NO_OP
        if op.depth:
            ops.check_depth(replica.depth(proxy) + op.depth)
        promotion = replica.promotion(proxy)
        if promotion is not None:
            # A list item's dict stored whole gets fields of its own first.
            self._record(promotion, proxy, None)
            op = build()
            if op is None:
                return NO_OP
        if core.bounds:
            op = core.bound(proxy, op)
        return self._record(op, proxy, build)

    def _record(
        self, op: ops.Op, proxy: ObservedList | ObservedDict | ObservedSet, build: Callable[[], ops.Op | None] | None
    ) -> Any:
        core = self.core
        replica = core.replica
        plan = replica.removal_plan(op)
        if plan is None:
            self.reload = True
        seq = core.next_seq()
        created = queue.provisional_ids(core.writer, core.provisional, op.nodes())
        entry = Entry(op, plan, seq, created, replica.nodes[op.nid]._rm_birth, proxy, build)
        removed = replica.value_at(op)
        replica.apply_local(op, iter(created), ops.op_token(core.writer, seq))
        self.entries.append(entry)
        return removed

    def abandon(self) -> None:
        """The block raised: nothing is sent, and the local view goes back to the server's."""
        core = self.core
        self.entries.clear()
        try:
            if core.reachable():
                core.replica.load(core.store.read_all())
                return
        except ConnectionFailed as exc:
            core.link.failed(exc)
        core.replica.speculative = True

    def commit(self) -> None:
        """Send the batch (or queue it), as described in the module's notes."""
        core = self.core
        for _ in range(MAX_ATTEMPTS):
            if not self.entries:
                break
            if not core.reachable():
                self._enqueue(may_be_applied=False)
                break
            try:
                reply = core.store.apply(self._call(), [entry.step(core.writer) for entry in self.entries])
            except ConnectionFailed as exc:
                core.link.failed(exc)
                self._enqueue(may_be_applied=True)
                break
            if self._settle(reply):
                break
        else:
            raise ConcurrentModification(
                f"gave up after {MAX_ATTEMPTS} attempts: other writers kept changing what this batch changes",
                key=core.store.key,
            )
        if self.failures:
            count = len(self.failures)
            raise BatchIncomplete(
                f"{count} operation{'s' if count > 1 else ''} of a batch on {core.store.key} could not be made "
                f"(the rest is in Redis): {'; '.join(str(f) for f in self.failures)}",
                key=core.store.key,
                failures=list(self.failures),
            )

    def _call(self) -> list[bytes]:
        core = self.core
        root = all(entry.op.nid == b"0" for entry in self.entries)
        expected = ANY_INCARNATION if root else core.replica.incarnation
        return [core.writer, expected, core.ttl, core.author]

    def _settle(self, reply: Reply) -> bool:
        """Bring the replica in line with the reply; False to send the batch again (built anew)."""
        core = self.core
        replica = core.replica
        if reply.status in ("ok", "same", "dup"):
            if reply.status == "ok":
                core.note_created(reply.stamp)
                mapping = {}
                for entry, result in zip(self.entries, reply.results or [b"-"] * len(self.entries), strict=True):
                    if result not in (b"-", b"x"):
                        first = int(result)
                        mapping.update({p: b"%d" % (first + i) for i, p in enumerate(entry.created)})
                replica.rename(mapping)
            exact = reply.status != "dup" and b"x" not in reply.results and not self.reload
            if exact and reply.before == replica.stamp and (
                reply.incarnation == replica.incarnation or replica.incarnation == b""
            ):
                replica.stamped(reply.stamp)
                replica.incarnation = reply.incarnation
            else:
                replica.load(core.store.read_all())
            self.entries.clear()
            return True
        # Refused, and nothing was written: build every statement again from
        # the server's view (a corrupt reply raises here, after the reload).
        replica.load(core.store.read_all())
        if reply.status == "corrupt":
            self.entries.clear()
            core.raise_corrupt(reply)
        entries, self.entries, self.reload = self.entries, [], False
        for entry in entries:
            if entry.build is None:
                continue  # a promotion: made again, if still needed, with the change after it
            try:
                self.add(entry.proxy, entry.build)
            except (LookupError, ValueError) as exc:
                if not isinstance(exc, RedisMemoryError):
                    exc = ContainerDeleted(f"a batched {entry.op.name.decode()} could no longer be made: {exc!r}",
                                           key=core.store.key)  # fmt: skip
                self.failures.append(exc)
        return False

    def _enqueue(self, may_be_applied: bool) -> None:
        """Queue the batch as one group (it was applied locally as it was made)."""
        core = self.core
        if not may_be_applied:
            core.outbox.check_room(core.store.key, needed=len(self.entries))
        group = self.entries[0].seq
        for entry in self.entries:
            core.queue_applied(entry.op, entry.plan or {}, entry.seq, entry.created, entry.birth, group)
        core.replica.speculative = True
        core.link.wait_for(core)
        self.entries.clear()
