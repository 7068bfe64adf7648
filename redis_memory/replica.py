"""The local replica: a memory's tree of proxies, and how it is kept exact.

The replica knows the server's ``version`` and ``incarnation`` it reflects.
It changes in three ways, all under the memory's lock:

* :meth:`Replica.load` rebuilds it from a full HGETALL;
* :meth:`Replica.apply_delta` applies the fields the journal says changed;
* :meth:`Replica.apply_local` applies an operation this process just had
  applied on the server, when the server's version proves that nothing else
  happened in between. It mirrors the server script step for step, so the
  replica equals what a fresh load would give.

Proxies are updated in place, never replaced, so a proxy a user holds stays
live; a proxy whose node disappears is marked dead and refuses mutations.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from . import codec, ops
from .errors import CorruptData, kept
from .proxies import ObservedDict, ObservedList, ObservedSet, plain
from .store import HEADER, HEADER_LIMIT, REF, version_number
from .tracking import Seen

if TYPE_CHECKING:
    from .memory import MemoryCore

Node = ObservedList | ObservedDict | ObservedSet
_NODES = (ObservedList, ObservedDict, ObservedSet)
_ABSENT: Any = object()
log = logging.getLogger("redis_memory")


class Corrupt:
    """Stands for a value whose stored data cannot be decoded: in the root, and in the containers above it.

    Reading the attribute raises its error; a container a user still holds
    keeps its other items. An operation removing it plans from the server's data.
    """

    __slots__ = ("_error", "unordered")

    def __init__(self, error: CorruptData, unordered: bool = False) -> None:
        self._error = kept(error)
        #: Its entry lost its '<seq>:': the script gives the value set over it the next one.
        self.unordered = unordered

    def error(self) -> Exception:
        """The error to raise, a new copy each time: one raised would keep the reader's frames in its traceback."""
        return kept(self._error)


class Resync(Exception):
    """A delta did not fit the replica; a full load is needed."""


class Header(NamedTuple):
    """A node's header field (see store.py): its kind, two numbers, change count and birth."""

    kind: str
    a: int
    b: int
    mod: int
    birth: bytes


def parse_header(raw: bytes) -> Header:
    """The parts of a header field; ValueError if it is not one (by the apply script's rule)."""
    found = HEADER.fullmatch(raw)
    if found is None:
        raise ValueError(f"bad node header {raw[:40]!r}")
    a, b, mod = int(found[2]), int(found[3]), int(found[4])
    if max(abs(a), abs(b), abs(mod)) >= HEADER_LIMIT:
        raise ValueError(f"a node header with counts of more than 15 digits {raw[:40]!r}")
    return Header(found[1].decode(), a, b, mod, found[5] or b"")


class Replica:
    """The materialized tree of one memory and the server version it reflects."""

    def __init__(self, core: MemoryCore) -> None:
        self.core = core
        self.key = core.store.key
        self.version = -1  # never loaded
        self.stamp = b""  # the server's version stamp ('<count> <token>'), b"" for none
        self.incarnation = b""
        # Changed by operations the server has not confirmed (made offline):
        # only a full load makes the replica exact again.
        self.speculative = False
        #: The tracking mark taken when it was last made exact (tracking.py); None: check the version.
        self.seen: Seen | None = None
        #: How many full loads it had: a batch whose view a load replaced is not exact.
        self.loads = 0
        self.root = ObservedDict(core, b"0")
        self.nodes: dict[bytes, Node] = {b"0": self.root}
        #: Root entries whose names cannot be decoded: no name reaches them,
        #: so listing the names (dir, to_dict) raises the first of these.
        self.unnamed: list[CorruptData] = []
        #: Nodes with corrupt data in them or under them (since the last
        #: load): this replica cannot describe what removing them removes.
        self.damaged: set[bytes] = set()

    @property
    def loaded(self) -> bool:
        return self.version >= 0

    # -- decoding -----------------------------------------------------------

    def _corrupt(self, field: bytes, why: object) -> CorruptData:
        return CorruptData(f"corrupt data in {self.key} field {field!r}: {why}", key=self.key, field=field)

    def _decode(self, payload: bytes, field: bytes, parent: Node) -> Any:
        if payload[:1] == _REF_BYTE:
            nid, whole, blob = payload[1:].partition(b"=")
            node = self.nodes.get(nid)
            if whole:
                # Stored whole, so unchanged since stored: a proxy we have is current.
                if isinstance(node, ObservedDict):
                    return node
                try:
                    return self._whole(nid, blob, parent, {})
                except ValueError as exc:
                    raise self._corrupt(field, exc) from None
            if node is None:
                raise Resync(field)
            if node._rm_parent is not parent:
                # Only a node new in this delta may be placed; a reference to
                # a node held elsewhere, or to an ancestor, is corrupt data.
                if node._rm_parent is not None or node is self.root or self._holds(node, parent):
                    raise Resync(field)
                node._rm_parent = parent
            return node
        try:
            return codec.decode(payload)
        except ValueError as exc:
            raise self._corrupt(field, exc) from None

    def _whole(self, nid: bytes, blob: bytes, parent: Node, reuse: dict[bytes, Node]) -> ObservedDict:
        """The proxy of a list item's dict stored whole (see ops.py); ValueError if undecodable."""
        value = codec.decode_whole(blob)
        if not isinstance(parent, ObservedList):
            raise ValueError("a dict stored whole must be in a list")
        old = reuse.pop(nid, None) if reuse else None
        # A dict stored whole never changes, so the proxy held for it stays as
        # it is; other contents under the same id are another dict (a
        # rolled-back server handed the id out again): a new proxy.
        if type(old) is ObservedDict and old._rm_up is not None and dict.__eq__(old, value):
            node = old
        else:
            node = ObservedDict(self.core, nid)
            dict.update(node, value)
        node._rm_live = True
        self.nodes[nid] = node
        node._rm_next, node._rm_mod, node._rm_up, node._rm_parent = len(value) + 1, 0, parent, parent
        return node

    def depth(self, node: Node) -> int:
        """How many containers hold ``node`` up to the root (the root: 0): O(depth)."""
        depth = 0
        while node._rm_parent is not None:
            node, depth = node._rm_parent, depth + 1
        return depth

    @staticmethod
    def _holds(node: Node, inner: Node) -> bool:
        """True if ``inner`` is ``node`` or lies under it: O(depth)."""
        up: Node | None = inner
        while up is not None:
            if up is node:
                return True
            up = up._rm_parent
        return False

    def _kill(self, value: Any) -> None:
        """Forget a node removed from the tree, and everything under it: O(size)."""
        doomed = [value]
        while doomed:
            value = doomed.pop()
            if isinstance(value, (ObservedList, ObservedDict, ObservedSet)) and self.nodes.get(value._rm_nid) is value:
                del self.nodes[value._rm_nid]
                value._rm_live = False
                if not isinstance(value, ObservedSet):  # a set's elements are never nodes
                    doomed.extend(value.values() if isinstance(value, ObservedDict) else value)

    def _proxy(self, nid: bytes, kind: str, reuse: dict[bytes, Node], birth: bytes) -> Node:
        """The proxy of node ``nid``: the one in ``reuse`` if it is that very node (same kind and birth)."""
        old = reuse.pop(nid, None)
        cls = _KINDS[kind]
        node = old if type(old) is cls and old._rm_birth == birth else cls(self.core, nid)
        node._rm_live = True
        node._rm_birth = birth
        self.nodes[nid] = node
        return node

    def stamped(self, stamp: bytes) -> None:
        """The replica now reflects the server's version ``stamp``.

        A damaged stamp is kept as opaque bytes (count 0): the version check
        still tells any write apart, since every write stores a good stamp, and
        the journal is never trusted from it (a full load is). So a damaged
        version never makes the memory unreadable, and the next write repairs it.
        """
        try:
            self.version = version_number(stamp)
        except ValueError:
            log.warning("%s: field 'v' is no version stamp (%r); the next write repairs it", self.key, stamp[:40])
            self.version = 0
        self.stamp = stamp

    # -- full load ----------------------------------------------------------

    def load(self, fields: dict[bytes, bytes]) -> None:
        """Rebuild from every field of the hash (an HGETALL): O(size)."""
        # Checked before anything changes. Every write that creates a memory
        # sets 'i' (a damaged 'v' is kept opaque: see stamped()).
        if fields and not fields.get(b"i"):
            raise self._corrupt(b"i", "a memory with fields but no incarnation")
        headers: dict[bytes, bytes] = {}
        entries: dict[bytes, list[tuple[bytes, bytes]]] = {}
        for field, value in fields.items():
            tag = field[0]
            if tag == 0x65:  # e<nid>:<slot or key>
                nid, _, slot = field[1:].partition(b":")
                bucket = entries.get(nid)
                if bucket is None:
                    entries[nid] = [(slot, value)]
                else:
                    bucket.append((slot, value))
            elif tag == 0x68:  # h<nid>
                headers[field[1:]] = value
        incarnation = fields.get(b"i", b"")
        for node in self.nodes.values():
            node._rm_live = False
        # Node ids restart in a new incarnation: only the root may be reused then.
        reuse: dict[bytes, Node] = dict(self.nodes) if incarnation == self.incarnation else {b"0": self.root}
        self.nodes = {}
        self.unnamed = []
        self.damaged = set()
        _Loader(self, headers, entries, reuse).fill(b"0", headers.get(b"0", b"d 0 1 0"), None, 0)
        self.stamped(fields.get(b"v", b""))
        self.incarnation = incarnation
        self.speculative = False
        self.loads += 1

    # -- deltas from the journal --------------------------------------------

    def apply_delta(self, stamp: bytes, changes: list[tuple[bytes, bytes | None]]) -> None:
        """Apply the current values of the fields changed since ``self.stamp``, reaching ``stamp``.

        Raises :class:`Resync` when the delta does not fit (the caller then
        loads everything); the replica may be half-updated then, which the
        full load repairs.
        """
        headers: dict[bytes, bytes | None] = {}
        entries: dict[bytes, dict[bytes, bytes | None]] = defaultdict(dict)
        for field, value in changes:
            tag = field[:1]
            if tag == b"e":
                nid, _, slot = field[1:].partition(b":")
                entries[nid][slot] = value
            elif tag == b"h":
                headers[field[1:]] = value
        try:
            created = [nid for nid, h in headers.items() if h is not None and nid not in self.nodes]
            for nid in created:
                header = parse_header(headers[nid] or b"")
                self._proxy(nid, header.kind, {}, header.birth)
            for nid in created:
                self._update(nid, headers[nid], entries.get(nid, {}), new=True)
            for nid in set(headers) | set(entries):
                if nid not in created and nid in self.nodes and headers.get(nid, b"") is not None:
                    self._update(nid, headers.get(nid), entries.get(nid, {}), new=False)
            for nid, h in headers.items():
                if h is None and nid in self.nodes:
                    self._kill(self.nodes[nid])
            for nid in created:
                if self.depth(self.nodes[nid]) > codec.MAX_DEPTH:
                    raise Resync(nid)  # the full load says what is corrupt
        except (ValueError, CorruptData) as exc:
            raise Resync(str(exc)) from exc
        self.stamped(stamp)

    def _update(self, nid: bytes, header: bytes | None, changed: dict[bytes, bytes | None], new: bool) -> None:
        node = self.nodes[nid]
        if isinstance(node, ObservedSet):
            if new:
                set.clear(node)
            for kbytes, raw in changed.items():
                element = codec.decode_key(kbytes)
                if raw is None:
                    set.discard(node, element)
                else:
                    set.add(node, element)
            if header:
                length, node._rm_mod = self._header(node, header, "s")[1::2]
                if length != len(node):
                    raise Resync(nid)
            return
        if isinstance(node, ObservedList):
            lo, n = node._rm_lo, len(node)
            _, lo2, hi2, mod, _ = self._header(node, header, "l") if header else ("l", lo, lo + n, node._rm_mod, b"")
            slots = {int(s): v for s, v in changed.items()}
            if (
                not new
                and lo2 == lo
                and hi2 >= lo + n
                and all(lo + n <= s < hi2 for s in slots)
                and len(slots) == hi2 - lo - n
            ):
                list.extend(node, [self._need(slots[s], node, s) for s in range(lo + n, hi2)])
            else:
                items = []
                for s in range(lo2, hi2):
                    if s in slots:
                        items.append(self._need(slots[s], node, s))
                    elif not new and 0 <= s - lo < n:
                        items.append(node[s - lo])
                    else:
                        raise Resync(nid)
                # Items no longer in the list are gone (a dict stored whole
                # has no header whose deletion would say so).
                kept = {id(v) for v in items}
                for value in list.__iter__(node):
                    if id(value) not in kept:
                        self._kill(value)
                list.__setitem__(node, slice(None), items)
            node._rm_lo, node._rm_mod = lo2, mod
            return
        assert isinstance(node, ObservedDict)
        first_new = 0 if new else node._rm_next
        moved = []
        for kbytes, raw in changed.items():
            key = codec.decode_key(kbytes)
            if raw is None:
                dict.pop(node, key, None)
                continue
            seq, _, payload = raw.partition(b":")
            value = self._decode(payload, b"e" + nid + b":" + kbytes, node)
            if int(seq) >= first_new:
                moved.append((int(seq), key, value))
            elif key in node:
                dict.__setitem__(node, key, value)
            else:
                raise Resync(nid)
        for _, key, value in sorted(moved, key=lambda t: t[0]):
            dict.pop(node, key, None)
            dict.__setitem__(node, key, value)
        if header:
            _, length, node._rm_next, node._rm_mod, _ = self._header(node, header, "d")
            node._rm_up = None  # a dict stored whole was given fields of its own
            if length != len(node):
                raise Resync(nid)

    @staticmethod
    def _header(node: Node, raw: bytes, kind: str) -> Header:
        """The header a delta brings for ``node``; Resync if it is another node's (a rollback reused the id)."""
        header = parse_header(raw)
        if header.kind != kind:
            raise Resync(node._rm_nid)
        if header.birth != node._rm_birth:
            if not (isinstance(node, ObservedDict) and node._rm_up is not None):
                raise Resync(node._rm_nid)
            node._rm_birth = header.birth  # a dict stored whole was given fields of its own
        return header

    def _need(self, payload: bytes | None, node: Node, slot: int) -> Any:
        if payload is None:
            raise Resync(node._rm_nid)
        return self._decode(payload, b"e%s:%d" % (node._rm_nid, slot), node)

    # -- this process's own operations --------------------------------------

    def removal_plan(self, op: ops.Op) -> ops.Plan | None:
        """Every container ``op`` may remove, as this replica sees it, for the server to check.

        None if it removes a value whose stored data is corrupt: only the
        server's data can tell what that holds.
        """
        node = self.nodes[op.nid]
        doomed: list[Any] = []
        if isinstance(op, (ops.DictSet, ops.DictDelete)):
            keys = op.key_list if isinstance(op, ops.DictDelete) else [k for k, _ in op.items]
            dct = cast(ObservedDict, node)
            doomed = [dict.get(dct, k) for k in keys]
        elif isinstance(op, ops.DictClear):
            doomed = [node]
        elif isinstance(op, (ops.ListSet, ops.ListDelete)):
            lst = cast(ObservedList, node)
            doomed = [lst[op.slot - lst._rm_lo]]
        elif isinstance(op, ops.ListReplace):
            doomed = [v for v in node if getattr(v, "_rm_nid", None) not in op.kept]
        elif isinstance(op, ops.ListAppend) and op.keep:
            doomed = cast(ObservedList, node)[: ops.trimmed(len(node), len(op.values), op.keep)]
        plan: ops.Plan = {}
        stack = doomed
        while stack:
            value = stack.pop()
            if isinstance(value, Corrupt) or (self.damaged and getattr(value, "_rm_nid", None) in self.damaged):
                return None
            if isinstance(value, ObservedDict) and value._rm_up is None:  # one stored whole has no fields to list
                plan[value._rm_nid] = (value._rm_mod, [codec.encode_key(k) for k in value])
                stack.extend(value.values())
            elif isinstance(value, ObservedList):
                plan[value._rm_nid] = (value._rm_mod, [])
                stack.extend(value)
            elif isinstance(value, ObservedSet):
                plan[value._rm_nid] = (value._rm_mod, [codec.encode_key(e) for e in value])
        return plan

    def removed_value(self, op: ops.Op, payloads: list[bytes]) -> Any:
        """What a delete returned: the server's scalar, or our copy of a container.

        None for a value that cannot be decoded: it is deleted all the same,
        and a deletion never fails on the data it removes.
        """
        if not payloads:
            return None
        payload = payloads[0]
        try:
            if payload[:1] != _REF_BYTE:
                return codec.decode(payload)
            nid, whole, blob = payload[1:].partition(b"=")
            node = self.nodes.get(nid)
            if node is None and whole:
                return codec.decode_whole(blob)
        except ValueError:
            return None
        return plain(node)

    def value_at(self, op: ops.Op) -> Any:
        """A plain copy of what a delete ``op`` targets in this replica, else None."""
        node = self.nodes.get(op.nid)
        if isinstance(op, ops.ListDelete) and isinstance(node, ObservedList):
            index = op.slot - node._rm_lo
            return plain(node[index]) if 0 <= index < len(node) else None
        if isinstance(op, ops.DictDelete) and isinstance(node, ObservedDict) and op.key_list:
            return plain(dict.get(node, op.key_list[0]))
        return None

    def apply_local(self, op: ops.Op, nids: Iterator[bytes], birth: bytes) -> None:
        """Apply ``op`` (whose token is ``birth``) as the server script does, new nodes getting the ids ``nids`` yields.

        Online, ``nids`` counts up from the first id the server gave; offline,
        it yields provisional ids that the replay maps to the server's.
        """
        node = self.nodes[op.nid]
        if isinstance(op, ops.Promote):
            # The dict keeps its contents; it is now a node with fields of its own.
            child = self.nodes.get(op.child)
            if isinstance(child, ObservedDict):
                child._rm_up, child._rm_birth = None, birth
            return
        if isinstance(node, ObservedSet):
            assert isinstance(op, ops.SetChange)
            set.difference_update(node, op.remove)
            set.update(node, op.add)
            node._rm_mod += 1
            return
        if isinstance(node, ObservedDict):
            if isinstance(op, ops.DictSet):
                # Build every new value before changing anything: a value may
                # be this very dict, and the server stored it as it was.
                built = [self._materialize(encoded, nids, node, birth) for encoded in op.values]
                for (key, _), value in zip(op.items, built, strict=True):
                    old = dict.get(node, key, _ABSENT)
                    if old is _ABSENT or (isinstance(old, Corrupt) and old.unordered):
                        dict.pop(node, key, None)  # the script placed it last, as a new key
                        node._rm_next += 1
                    elif isinstance(old, _NODES):
                        self._kill(old)
                    dict.__setitem__(node, key, value)
            elif isinstance(op, ops.DictDelete):
                for key in op.key_list:
                    self._kill(dict.pop(node, key))
            elif isinstance(op, ops.DictClear):
                for value in list(node.values()):
                    self._kill(value)
                dict.clear(node)
            node._rm_mod += 1
            return
        lo, hi = node._rm_lo, node._rm_lo + len(node)
        if isinstance(op, ops.ListAppend):
            trim = ops.trimmed(len(node), len(op.values), op.keep) if op.keep else 0
            for value in node[:trim]:
                self._kill(value)
            list.__delitem__(node, slice(0, trim))
            node._rm_lo += trim
            list.extend(node, [self._materialize(e, nids, node, birth) for e in op.values])
        elif isinstance(op, ops.ListInsert):
            value = self._materialize(op.encoded, nids, node, birth)
            slot = op.slot
            if op.end == b"front" or (not op.end and slot <= lo):
                list.insert(node, 0, value)
                node._rm_lo -= 1
            elif op.end == b"back":
                list.append(node, value)
            elif slot <= lo:
                list.insert(node, 0, value)
                node._rm_lo -= 1
            elif slot >= hi:
                list.append(node, value)
            else:
                list.insert(node, slot - lo, value)
                if slot - lo < hi - slot:
                    node._rm_lo -= 1
        elif isinstance(op, ops.ListSet):
            i = op.slot - lo
            self._kill(node[i])
            list.__setitem__(node, i, self._materialize(op.encoded, nids, node, birth))
        elif isinstance(op, ops.ListDelete):
            i = op.slot - lo
            self._kill(node[i])
            list.__delitem__(node, i)
            if op.slot - lo < hi - 1 - op.slot:
                node._rm_lo += 1
        elif isinstance(op, ops.ListReplace):
            kept = set(op.kept)
            for value in node:
                if getattr(value, "_rm_nid", None) not in kept:
                    self._kill(value)
            list.__setitem__(node, slice(None), [self._materialize(e, nids, node, birth) for e in op.values])
        node._rm_mod += 1

    def rename(self, mapping: dict[bytes, bytes]) -> None:
        """Give nodes created offline the ids the server assigned on replay."""
        for provisional, real in mapping.items():
            node = self.nodes.pop(provisional, None)
            if node is not None:
                node._rm_nid = real
                self.nodes[real] = node

    def _materialize(self, encoded: ops.Encoded, nids: Iterator[bytes], parent: Node, birth: bytes) -> Any:
        """The local value for what ``encoded`` sent, with the nids the server gave.

        Walks the value in the order it was tokenized, which is the order the
        script allocated node ids in; ``parent`` is the container it goes in.
        """
        if encoded.reuse is not None:
            return self.nodes[encoded.reuse]
        if not encoded.nodes:  # a scalar
            value = encoded.value
            return value if type(value) in codec.SIMPLE_TYPES else codec.detached(value)
        return self._build(encoded.value, nids, parent, birth)

    def _build(self, value: Any, nids: Iterator[bytes], parent: Node, birth: bytes) -> Any:
        if isinstance(value, set):
            elements = cast(ObservedSet, self._proxy(next(nids), "s", {}, birth))
            elements._rm_parent = parent
            set.update(elements, (codec.detached(e) for e in value))
            return elements
        simple = codec.SIMPLE_TYPES  # scalars of these types are kept as they are, without a call
        if isinstance(value, list):
            lst = cast(ObservedList, self._proxy(next(nids), "l", {}, birth))
            lst._rm_parent = parent
            list.extend(lst, [v if type(v) in simple else self._build(v, nids, lst, birth) for v in value])
            return lst
        if isinstance(value, dict):
            dct = cast(ObservedDict, self._proxy(next(nids), "d", {}, birth))
            dct._rm_parent = parent
            for key, v in value.items():
                dict.__setitem__(dct, key, v if type(v) in simple else self._build(v, nids, dct, birth))
            dct._rm_next = len(value) + 1
            if isinstance(parent, ObservedList) and ops.whole(value):
                dct._rm_up, dct._rm_birth = parent, b""  # no header, so no birth
            return dct
        return codec.detached(value)

    def promotion(self, proxy: Node) -> ops.Promote | None:
        """The operation that gives ``proxy`` fields of its own, if it is a dict stored whole."""
        if not isinstance(proxy, ObservedDict) or proxy._rm_up is None:
            return None
        parent = proxy._rm_up
        index = next((i for i, v in enumerate(list.__iter__(parent)) if v is proxy), -1)
        return ops.Promote(parent._rm_nid, proxy._rm_nid, parent._rm_lo + index, list(dict.items(proxy)))


class _Loader:
    """Builds the tree of a full load from the fields grouped by node."""

    def __init__(
        self,
        replica: Replica,
        headers: dict[bytes, bytes],
        entries: dict[bytes, list[tuple[bytes, bytes]]],
        reuse: dict[bytes, Node],
    ) -> None:
        self.replica = replica
        self.headers = headers
        self.entries = entries
        self.reuse = reuse
        # Decoded dict keys by their stored bytes: keys repeat across nodes
        # ("role", "content") and are immutable, so one decode serves all.
        self.keys: dict[bytes, Any] = {}

    def value(self, payload: bytes, nid: bytes, slot: bytes | int, parent: Node, depth: int) -> Any:
        """The value of entry ``slot`` of node ``nid`` (``parent``, ``depth`` containers deep)."""
        if payload[:1] == _REF_BYTE:
            if depth >= codec.MAX_DEPTH:
                # Only corruption nests this deep (a reference to an ancestor, say).
                raise self.corrupt(nid, slot, f"containers nested more than {codec.MAX_DEPTH} deep")
            child, whole, blob = payload[1:].partition(b"=")
            if whole:
                try:
                    return self.replica._whole(child, blob, parent, self.reuse)
                except ValueError as exc:
                    raise self.corrupt(nid, slot, exc) from None
            header = self.headers.get(child)
            if header is None:
                raise self.corrupt(nid, slot, f"reference to missing node {child!r}")
            try:
                return self.fill(child, header, parent, depth + 1)
            except CorruptData:
                self.replica.damaged.add(child)
                raise
        try:
            return codec.decode(payload)
        except ValueError as exc:
            raise self.corrupt(nid, slot, exc) from None

    def corrupt(self, nid: bytes, slot: bytes | int, why: object) -> CorruptData:
        name = slot if isinstance(slot, bytes) else b"%d" % slot
        return self.replica._corrupt(b"e" + nid + b":" + name, why)

    def fill(self, nid: bytes, header: bytes, parent: Node | None, depth: int) -> Node:
        """Build node ``nid`` and everything under it; ``parent`` is None for the root."""
        try:
            kind, a, b, c, birth = parse_header(header)
        except ValueError as exc:
            raise self.replica._corrupt(b"h" + nid, exc) from None
        node = self.replica._proxy(nid, kind, self.reuse, birth)
        node._rm_mod = c
        node._rm_parent = parent
        root = parent is None
        entries = self.entries.get(nid, ())
        if isinstance(node, ObservedSet):
            try:
                elements = {codec.decode_key(key) for key, _ in entries}
            except ValueError as exc:
                raise self.replica._corrupt(b"h" + nid, f"undecodable set element: {exc}") from None
            if len(elements) != a:
                raise self.replica._corrupt(b"h" + nid, f"a set of {a} elements has {len(elements)}")
            # By difference: an element that stays is never missing to a reader.
            set.difference_update(node, set(node) - elements)
            set.update(node, elements)
            return node
        if isinstance(node, ObservedList):
            # A corrupt item becomes a placeholder, and the list is filled
            # before its first error is raised: a user may hold this list.
            if b - a > len(entries):  # not walked: a corrupt range may claim millions of slots
                raise self.replica._corrupt(b"h" + nid, f"a list of {b - a} items has {len(entries)} fields")
            error = None
            slots = {}
            for slot, payload in entries:
                try:
                    slots[int(slot)] = payload
                except ValueError:
                    error = error or self.corrupt(nid, slot, "bad slot")
            items = []
            for s in range(a, b):
                found = slots.get(s)
                try:
                    if found is None:
                        raise self.corrupt(nid, s, "missing list element")
                    items.append(self.value(found, nid, s, node, depth))
                except CorruptData as exc:
                    error = error or exc
                    items.append(Corrupt(exc))
            list.__setitem__(node, slice(None), items)
            node._rm_lo = a
            if error is not None:
                raise error
            return node
        node._rm_up = None
        ordered: list[tuple[int, Any, bytes | CorruptData, bytes]] = []
        # As for a list: the root keeps each corrupt attribute as a
        # placeholder; a nested dict is filled, then raises its first error.
        error = None
        keys = self.keys
        for key, raw in entries:
            seq, sep, payload = raw.partition(b":")
            decoded = keys.get(key, _MISSING)
            if decoded is _MISSING:
                try:
                    decoded = keys[key] = codec.decode_key(key)
                except ValueError as exc:
                    # No name reaches this entry: in the root, listing the names raises.
                    bad = self.corrupt(nid, key, exc)
                    if root:
                        self.replica.unnamed.append(bad)  # raised as copies only (see Corrupt.error)
                    error = error or bad
                    continue
            if not (sep and seq.isdigit()):
                # Kept under its name (last), so it reads as corrupt, not as missing.
                ordered.append((_LAST, decoded, self.corrupt(nid, key, "an entry without its '<n>:' prefix"), key))
                continue
            ordered.append((int(seq), decoded, payload, key))
        if not root and len(entries) != a:
            error = error or self.replica._corrupt(b"h" + nid, f"a dict of {a} entries has {len(entries)}")
        if len(ordered) > 1:
            ordered.sort(key=_first)
        pairs: list[tuple[Any, Any]] = []
        for _, k, held, key in ordered:
            if isinstance(held, CorruptData):
                error = error or held
                pairs.append((k, Corrupt(held, unordered=True)))
                continue
            try:
                pairs.append((k, self.value(held, nid, key, node, depth)))
            except CorruptData as exc:
                error = error or exc
                pairs.append((k, Corrupt(exc)))
        _refill(node, pairs)
        node._rm_next = b
        if error is not None and not root:
            raise error
        return node


_REF_BYTE = bytes((REF,))
_MISSING: Any = object()
_KINDS: dict[str, type[Node]] = {"l": ObservedList, "d": ObservedDict, "s": ObservedSet}


_LAST = 1 << 62  # the order of an entry whose sequence number is lost


def _first(item: tuple[int, Any, bytes | CorruptData, bytes]) -> int:
    return item[0]


def _refill(node: ObservedDict, items: list[tuple[Any, Any]]) -> None:
    """Make ``node`` hold ``items``, in their order, by difference: O(n log n).

    Other threads read proxies without the memory's lock, so a key that
    stays where it was is never missing while this runs, not even for a
    moment. Only keys out of order are taken out and put back at the end
    (others deleted and set them again since this replica looked).
    """
    if not len(node):  # a new proxy (a first load): nobody can be reading it yet
        dict.update(node, items)
        return
    new = dict(items)
    for key in [k for k in node if k not in new]:
        dict.pop(node, key, None)
    position = {key: i for i, (key, _) in enumerate(items)}
    current = list(dict.keys(node))
    for key in _out_of_order([position[k] for k in current], current):
        dict.pop(node, key, None)
    for key, value in items:
        if dict.get(node, key, _MISSING) is not value:
            dict.__setitem__(node, key, value)
    order, wanted = list(dict.keys(node)), list(new)
    if order != wanted:  # keys that belong before others: put back from the first one out of place
        start = next(i for i, (a, b) in enumerate(zip(order, wanted, strict=True)) if a != b)
        for key in wanted[start:]:
            dict.__setitem__(node, key, dict.pop(node, key))


def _out_of_order(positions: list[int], keys: list[Any]) -> list[Any]:
    """The keys outside a longest run of ``positions`` that increases (patience sorting)."""
    tails: list[int] = []  # index in positions of the smallest tail of each run length
    back = [-1] * len(positions)
    for i, p in enumerate(positions):
        lo, hi = 0, len(tails)
        while lo < hi:
            mid = (lo + hi) // 2
            if positions[tails[mid]] < p:
                lo = mid + 1
            else:
                hi = mid
        back[i] = tails[lo - 1] if lo else -1
        if lo == len(tails):
            tails.append(i)
        else:
            tails[lo] = i
    keep = set()
    i = tails[-1] if tails else -1
    while i >= 0:
        keep.add(i)
        i = back[i]
    return [key for i, key in enumerate(keys) if i not in keep]
