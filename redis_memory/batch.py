"""Batches: ``with mem.batch():`` sends every change made inside in one call.

Inside the block each statement is built from the local view and applied to
it at once, as offline; nothing is sent. At the block's end the operations
go to the server in one ``FCALL`` of the apply function, which applies them
in order and all or none, so no other writer's change lands between them.
The block returns once they are in Redis.

* An exception inside the block sends nothing; the local view is reloaded
  from the server (offline: it is marked to reload once Redis is back).
* Consecutive sets of scalars on one dict go as one operation (see
  :meth:`Batch._merged`): the change feed names each key once.
* A batch inside a batch joins the outer one; if it raises, its own
  statements are not sent (the local view shows them until the outer
  block ends, then reloads).
* ``delete()`` and ``flush()`` inside a batch (of the same thread) raise
  :class:`~redis_memory.errors.InsideBatch`: they would reach Redis before
  the batch does.
* Offline (or if the link broke while the call was on its way) the
  operations are queued as one group, replayed as one call.
* If the server refuses one of them (another writer changed what it depends
  on), nothing is written, and the batch is sent again with that operation
  as it was made (the items it names, the values it stores, what a pop
  handed out), the way a queued operation is replayed: what it removes is
  then listed by the server, and a whole-list or whole-set change is made
  again from the server's data. One that can no longer apply (its container
  was deleted, its item is gone) is left out; the block then raises
  :class:`~redis_memory.errors.BatchIncomplete`, naming them, after the
  others are in Redis, and the local view is reloaded.
* If the block's end cannot send it (the queue is full, the server refuses
  it) the local view goes back to Redis's, as after an exception.
* A process forked inside a block does not send the parent's batch.

The memory's lock is held for the whole block: other threads using the
same memory wait for its end.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import ops, queue
from .errors import BatchIncomplete, ConcurrentModification, ConnectionFailed, ContainerDeleted, RedisMemoryError
from .ops import Args
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
    args: Args | None = None  # made again from the server's data (a whole-list change), else the op's

    def step(self, writer: bytes) -> Step:
        args = self.args if self.args is not None else self.op.args()
        return Step(self.seq, ops.op_token(writer, self.seq), self.op.name, self.op.nid, self.birth, self.created,
                    self.plan, args)  # fmt: skip


class Batch:
    """The operations of one ``with mem.batch():`` block, in order."""

    def __init__(self, core: MemoryCore) -> None:
        self.core = core
        self.entries: list[Entry] = []
        self.failures: list[RedisMemoryError] = []
        self.reload = False  # the replica cannot mirror an entry (it removes what it could not decode)
        self.pid = os.getpid()
        self.loads = core.replica.loads  # the view it applies to locally
        self.thread = threading.get_ident()
        self.floor = 0  # operations before this index take no merge (see _merged)

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
            self._record(promotion)
            op = build()
            if op is None:
                return NO_OP
        if core.bounds:
            op = core.bound(proxy, op)
        return self._record(op)

    def _record(self, op: ops.Op) -> Any:
        core = self.core
        replica = core.replica
        plan = replica.removal_plan(op)
        if plan is None:
            self.reload = True
        elif not plan and self._merged(op):
            return None
        seq = core.next_seq()
        created = queue.provisional_ids(core.writer, core.provisional, op.nodes())
        entry = Entry(op, plan, seq, created, replica.nodes[op.nid]._rm_birth)
        removed = replica.value_at(op)
        replica.apply_local(op, iter(created), ops.op_token(core.writer, seq))
        self.entries.append(entry)
        return removed

    def _merged(self, op: ops.Op) -> bool:
        """Merge ``op`` into the batch's last operation if both set scalars on one dict (and remove nothing).

        A thousand ``mem.x = v`` then go as one operation, which the server
        applies at the cost of one: the same writes, in the same order, with
        the same outcome (it is one atomic call either way). Never into an
        operation made before the innermost nested batch began (see
        :meth:`take_back`).
        """
        entries = self.entries
        if len(entries) <= self.floor or type(op) is not ops.DictSet or op.nodes():
            return False
        last = entries[-1]
        prior = last.op
        if type(prior) is not ops.DictSet or prior.nid != op.nid or last.plan or last.created or last.args is not None:
            return False
        prior.merge(op)
        replica = self.core.replica
        replica.apply_local(op, iter(()), b"")
        replica.nodes[op.nid]._rm_mod -= 1  # the server counts one change for the merged operation
        return True

    def nest(self) -> int:
        """A nested batch begins: the mark :meth:`take_back` takes its statements back to."""
        self.floor = len(self.entries)
        return self.floor

    def take_back(self, mark: int) -> None:
        """An inner batch raised: its statements (those after the first ``mark``) are not sent.

        The local view keeps showing them until the outer batch ends, then
        reloads.
        """
        del self.entries[mark:]
        self.reload = True

    def abandon(self) -> None:
        """The block raised: nothing is sent, and the local view goes back to the server's."""
        self.entries.clear()
        self._restore()

    def _restore(self) -> None:
        """Make the local view Redis's again: reload it now, or (offline) once Redis is back."""
        core = self.core
        if os.getpid() != self.pid:
            return
        try:
            if core.reachable():
                core.replica.load(core.store.read_all())
                return
        except ConnectionFailed as exc:
            core.link.failed(exc)
        core.replica.speculative = True

    def commit(self) -> None:
        """Send the batch (or queue it), as described in the module's notes."""
        if os.getpid() != self.pid:
            return  # forked inside the block: the batch is the parent's to send
        try:
            self._send()
        except BaseException:
            self._restore()
            raise
        if self.failures:
            count = len(self.failures)
            raise BatchIncomplete(
                f"{count} operation{'s' if count > 1 else ''} of a batch on {self.core.store.key} could not be "
                f"applied (the rest is in Redis): {'; '.join(str(f) for f in self.failures)}",
                key=self.core.store.key,
                failures=list(self.failures),
            )

    def _send(self) -> None:
        core = self.core
        for _ in range(MAX_ATTEMPTS):
            if not self.entries:
                return
            try:
                if core.outbox or not core.link.online:
                    # Offline, or with a queue to replay first: queued behind it (a
                    # replay now would reload the view this batch applied to).
                    self._enqueue(may_be_applied=False)
                    if core.link.online:
                        core.drain()
                    return
                reply = core.store.apply(self._call(), [entry.step(core.writer) for entry in self.entries])
                if self._settle(reply):
                    return
            except ConnectionFailed as exc:
                # It may have been applied before the link broke: queued with its
                # ids, the replay cannot repeat it.
                core.link.failed(exc)
                self._enqueue(may_be_applied=True)
                return
        raise ConcurrentModification(
            f"gave up after {MAX_ATTEMPTS} attempts: other writers kept changing what this batch changes",
            key=core.store.key,
        )

    def _call(self) -> list[bytes]:
        core = self.core
        root = all(entry.op.nid == b"0" for entry in self.entries)
        expected = ANY_INCARNATION if root else core.replica.incarnation
        return [core.writer, expected, core.ttl, core.author]

    def _settle(self, reply: Reply) -> bool:
        """Bring the replica in line with the reply; False to send what is left of the batch again."""
        core = self.core
        replica = core.replica
        entries = self.entries
        if reply.status in ("ok", "same", "dup"):
            core.note_created(reply.stamp)
            if len(entries) == 1:  # a single operation's reply names its first new node only
                results = [b"%d" % reply.first_nid if reply.first_nid is not None else b"-"]
            else:
                results = reply.results
            mapping, births = {}, {}
            for entry, result in zip(entries, results, strict=True):
                if entry.created and result.isdigit():
                    mapping.update({p: b"%d" % (int(result) + i) for i, p in enumerate(entry.created)})
                elif entry.created and result[:1] == b"x" and b"/" in result:
                    # A setdefault that found a container there: what this view made
                    # for the default is that container.
                    there, _, birth = result[1:].partition(b"/")
                    mapping[entry.created[0]], births[there] = there, birth
            replica.rename(mapping)
            for nid, birth in births.items():
                node = replica.nodes.get(nid)
                if node is not None:
                    node._rm_birth = birth
            # Exact if every operation did here what it did there, and nobody else wrote between.
            clean = reply.status == "ok" and not self.reload and not self.failures
            clean = clean and not any(result[:1] in (b"x", b"d") for result in results)
            unmoved = reply.before == replica.stamp and replica.incarnation in (reply.incarnation, b"")
            unmoved = unmoved and replica.loads == self.loads
            if clean and unmoved:
                replica.stamped(reply.stamp)
                replica.incarnation = reply.incarnation
            else:
                replica.load(core.store.read_all())
            entries.clear()
            return True
        if reply.status == "corrupt":
            entries.clear()
            core.raise_corrupt(reply)
        # Refused, and nothing was written. The operation refused is sent again
        # as it was made (what it names, the values it stores, what a pop handed
        # out), the way a queued one is replayed: with what it removes listed by
        # the server if others changed that; else it is left out and reported.
        index = (reply.failed or 1) - 1
        entry = entries[index]
        if reply.status == "stale" and entry.plan is not None and entry.op.name not in (b"lreplace", b"schange"):
            entry.plan = None  # listed by the script from the hash: never stale
            return False
        if reply.status == "stale" and self._make_again(entry):
            return False
        why = {
            "gone": "the container it changes was deleted (or replaced) by another writer",
            "index": "the list position it names no longer exists",
            "missing": "another writer removed the item it names",
            "stale": "another writer changed the same container",
            "exists": "the key it sets by default was set by another writer",
        }.get(reply.status, reply.status)
        error_type = ContainerDeleted if reply.status == "gone" else ConcurrentModification
        # One error per statement: sets merged into one operation are each left out.
        self.failures.extend(error_type(f"a batched {entry.op.name.decode()} was left out: {why}", key=core.store.key)
                             for _ in range(entry.op.statements))  # fmt: skip
        del entries[index]
        return False

    def _make_again(self, entry: Entry) -> bool:
        """A whole-list or whole-set change made again from what the server holds now; False if it cannot be."""
        core = self.core
        pending = core.pending(entry.op, entry.plan or {}, entry.seq, entry.created, entry.birth)
        again = core.rewrite_again(pending, entry.op.nid, core.store.read_all())
        if again is None:
            return False
        args, plan = again
        entry.args, entry.plan = ops.from_tokens(args), plan
        return True

    def _enqueue(self, may_be_applied: bool) -> None:
        """Queue the batch as one group (it was applied locally as it was made)."""
        core = self.core
        if not self.entries:
            return
        if not may_be_applied:
            core.outbox.check_room(core.store.key, needed=len(self.entries))
        group = self.entries[0].seq
        pending = [core.pending(e.op, e.plan or {}, e.seq, e.created, e.birth, group) for e in self.entries]
        for queued, entry in zip(pending, self.entries, strict=True):
            if entry.args is not None:
                queued.args = ops.tokens(entry.args)
        core.outbox.push_group(core.writer, pending)
        core.replica.speculative = True
        core.link.wait_for(core)
        self.entries.clear()
