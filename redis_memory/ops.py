"""The operation vocabulary: every change to a memory is one of these.

A proxy's mutator builds an operation; the store sends it to the server,
where one Lua script applies it atomically, and the replica applies the same
operation locally. Values are turned into *tokens* when the operation is
built, so an unsupported value raises ``TypeError`` before anything is
written, locally or remotely.

Token grammar (each token one script argument)::

    value := "s" <msgpack bytes>            scalar or immutable container
           | "l" <count> value*             new list node
           | "d" <count> <key>* value*      new dict node (keys, then values)
           | "f" <msgpack map>              new dict node kept whole (see below)
           | "t" <count> <key>*             new set node (its elements, encoded as dict keys)
           | "r" <nid>                      existing node kept (ListReplace only)

A dict that is an item of a list and holds at most :data:`WHOLE_MAX_KEYS`
scalars (a chat message) is stored *whole*: one msgpack map in its list
slot, with its node id, instead of a header and one field per key. Adding,
reading and dropping it then costs one field. It is still a node with a
stable id: before its first change, a :class:`Promote` gives it fields of
its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import codec
from .errors import UnsupportedValue


def op_token(writer: bytes, seq: int) -> bytes:
    """The token of operation ``(writer, seq)``: its version's, and the birth of the nodes it creates.

    Unique to the operation (a writer id is random, its seq only grows), so
    a server rolled back and written again never repeats a version or a
    node as this replica knew them.
    """
    return writer[:8] + b"%x" % seq


def item(data: bytes) -> bytes:
    """One script argument, already in its RESP form (a bulk string)."""
    return b"$%d\r\n%s\r\n" % (len(data), data)


_S, _L, _D, _F, _R, _T = item(b"s"), item(b"l"), item(b"d"), item(b"f"), item(b"r"), item(b"t")
_REF = b"\xc1"  # a reference to a node (see store.py)
#: The most keys a list item's dict may have to be stored whole.
WHOLE_MAX_KEYS = 16

#: Script arguments in RESP form, and how many there are.
Args = tuple[bytes, int]
#: A removal plan: for each container an operation may remove (by node id),
#: the change count it was seen at and, for a dict, its encoded keys.
Plan = dict[bytes, tuple[int, list[bytes]]]


@dataclass
class Encoded:
    """A value ready to send (``args``), and what the replica builds from it."""

    args: Args
    value: Any
    reuse: bytes | None = None  # the nid of an existing node kept in place
    depth: int = 0  # how many containers deep the value nests
    nodes: int = 0  # nodes the server creates for it: one per list, dict or set sent ("l", "d", "f", "t")


def stored_form(item: Any) -> bytes:
    """The bytes a list slot holds for ``item`` as a replica has it: how an operation names the item it means."""
    nid: bytes | None = getattr(item, "_rm_nid", None)
    if nid is None:
        return codec.encode(item)
    if getattr(item, "_rm_up", None) is not None:  # a dict stored whole (immutable while so)
        return _REF + nid + b"=" + codec.encode_whole(dict(item))
    return _REF + nid


def whole(value: Any) -> bool:
    """True if ``value``, as an item of a list, is stored whole (see the module's notes)."""
    if not isinstance(value, dict) or len(value) > WHOLE_MAX_KEYS:
        return False
    for element in value.values():  # a loop: twice as fast as any() here
        if type(element) not in codec.SIMPLE_TYPES and isinstance(element, (list, dict, set)):
            return False
    return True


def encode_value(value: Any, keep: dict[int, bytes] | None = None, in_list: bool = False) -> Encoded:
    """Tokenize ``value`` (an item of a list if ``in_list``).

    ``keep`` maps id(proxy) -> nid of nodes that may stay in place.
    """
    if keep is not None and isinstance(value, (list, dict, set)) and id(value) in keep:
        nid = keep.pop(id(value))
        return Encoded((_R + item(nid), 2), value, nid)
    out: list[bytes] = []
    made = [0]
    depth = _tokenize(value, out, set(), in_list, 0, made)
    return Encoded((b"".join(out), len(out)), value, depth=depth, nodes=made[0])


def check_depth(depth: int) -> None:
    """Refuse a value that would nest more than :data:`codec.MAX_DEPTH` containers deep in its attribute."""
    if depth > codec.MAX_DEPTH:
        raise UnsupportedValue(f"cannot store a value nested more than {codec.MAX_DEPTH} containers deep")


def _tokenize(value: Any, out: list[bytes], path: set[int], in_list: bool, level: int, made: list[int]) -> int:
    """Add the tokens of ``value``, held by ``level`` containers; return how deep it nests.

    ``made[0]`` counts the nodes the tokens create.
    """
    if isinstance(value, set):
        depth = 1 + max((codec.nesting(e) for e in value if type(e) not in codec.SIMPLE_TYPES), default=0)
        if level + depth > codec.MAX_DEPTH:
            check_depth(level + depth)
        out += (_T, item(b"%d" % len(value)))
        out.extend([item(codec.encode_key(e)) for e in value])
        made[0] += 1
        return depth
    if not isinstance(value, (list, dict)):
        depth = 0 if type(value) in codec.SIMPLE_TYPES else codec.nesting(value)
        if level + depth > codec.MAX_DEPTH:
            check_depth(level + depth)
        out += (_S, item(codec.encode(value)))
        return depth
    if in_list and isinstance(value, dict) and whole(value):
        depth = 1
        for element in value.values():
            if type(element) not in codec.SIMPLE_TYPES:
                depth = max(depth, 1 + codec.nesting(element))
        if level + depth > codec.MAX_DEPTH:
            check_depth(level + depth)
        out += (_F, item(codec.encode_whole(value)))
        made[0] += 1
        return depth
    if id(value) in path:
        raise UnsupportedValue("cannot store a container that contains itself")
    check_depth(level + 1)
    path.add(id(value))
    made[0] += 1
    depth = 0
    if isinstance(value, list):
        out += (_L, item(b"%d" % len(value)))
        for element in value:
            depth = max(depth, _tokenize(element, out, path, True, level + 1, made))
    else:
        out += (_D, item(b"%d" % len(value)))
        out.extend([item(codec.encode_key(k)) for k in value])
        for element in value.values():
            depth = max(depth, _tokenize(element, out, path, False, level + 1, made))
    path.discard(id(value))
    return depth + 1


def _args(plain: list[bytes], values: tuple[Encoded, ...] | list[Encoded] = ()) -> Args:
    """Plain arguments followed by encoded values, as one :data:`Args`."""
    head = b"".join(map(item, plain))
    if not values:
        return head, len(plain)
    return head + b"".join(v.args[0] for v in values), len(plain) + sum(v.args[1] for v in values)


def tokens(args: Args) -> list[bytes]:
    """The arguments of ``args`` one by one (the inverse of :func:`from_tokens`)."""
    data, count = args
    out, pos = [], 0
    for _ in range(count):
        end = data.index(b"\r\n", pos)
        size = int(data[pos + 1 : end])
        out.append(data[end + 2 : end + 2 + size])
        pos = end + 4 + size
    return out


def from_tokens(plain: list[bytes]) -> Args:
    """Script arguments from plain byte strings."""
    return _args(plain)


@dataclass
class Op:
    """Base of all operations: the node (container) it applies to."""

    nid: bytes
    name: bytes = field(init=False, default=b"")
    #: How many containers deep the values it adds nest (see :func:`check_depth`).
    depth: int = field(init=False, default=0)
    #: The user's statements it stands for: more than one for sets merged in a batch (see batch.py).
    statements: int = field(init=False, default=1)

    def args(self) -> Args:
        """The op's own arguments for the apply script."""
        raise NotImplementedError

    def nodes(self) -> int:
        """How many nodes the server creates when it applies this operation."""
        return 0


@dataclass
class DictSet(Op):
    """``d[k] = v`` for each pair, as one atomic change (``__setitem__``, ``update``)."""

    items: list[tuple[Any, Any]] = field(default_factory=list)
    keys: list[bytes] = field(init=False)
    values: list[Encoded] = field(init=False)
    _positions: dict[bytes, int] | None = field(init=False, default=None, repr=False)  # key -> index (merge)

    def __post_init__(self) -> None:
        self.name = b"dset"
        self.keys = [codec.encode_key(k) for k, _ in self.items]
        self.values = [encode_value(v) for _, v in self.items]
        self.depth = max((v.depth for v in self.values), default=0)

    def args(self) -> Args:
        return _args([b"%d" % len(self.keys), *self.keys], self.values)

    def nodes(self) -> int:
        return sum(v.nodes for v in self.values)

    def merge(self, later: DictSet) -> None:
        """Take in ``later``, a set on the same dict made after this one: this operation then does both.

        A key set again keeps its place and takes the later value, as two
        sets one after the other would leave it.
        """
        if self._positions is None:
            self._positions = {key: i for i, key in enumerate(self.keys)}
        positions = self._positions
        for pair, key, value in zip(later.items, later.keys, later.values, strict=True):
            at = positions.get(key)
            if at is None:
                positions[key] = len(self.keys)
                self.items.append(pair)
                self.keys.append(key)
                self.values.append(value)
            else:
                self.items[at], self.values[at] = pair, value
        self.depth = max(self.depth, later.depth)
        self.statements += later.statements


@dataclass
class DictSetDefault(DictSet):
    """``d.setdefault(k, v)``: set only if the key is absent on the server."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.name = b"dsetdefault"


@dataclass
class DictDelete(Op):
    """``del d[k]`` / ``d.pop(k)``: fails with nothing written if a key is absent."""

    key_list: list[Any] = field(default_factory=list)
    keys: list[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.name = b"ddel"
        self.keys = [codec.encode_key(k) for k in self.key_list]

    def args(self) -> Args:
        return _args([b"%d" % len(self.keys), *self.keys])


@dataclass
class DictClear(Op):
    """``d.clear()``: removes every entry the server holds."""

    def __post_init__(self) -> None:
        self.name = b"dclear"

    def args(self) -> Args:
        return b"", 0


@dataclass
class ListAppend(Op):
    """``append`` / ``extend`` / ``+=``: add at the end, O(1) per item.

    With ``keep`` (see :meth:`bounded`), the list keeps only its newest
    ``keep`` items: the script drops from the front what the append adds
    beyond that, and only the last ``keep`` values are sent.
    """

    value_list: list[Any] = field(default_factory=list)
    #: The root name it appends to, for an append by name (``add_message``): replayed
    #: from the offline queue, it goes to the list under that name then (see :data:`BY_NAME`).
    to: str = ""
    keep: int = field(init=False, default=0)
    values: list[Encoded] = field(init=False)

    def __post_init__(self) -> None:
        self.name = b"lappend"
        self.values = [encode_value(v, in_list=True) for v in self.value_list]
        self.depth = max((v.depth for v in self.values), default=0)

    def bounded(self, keep: int) -> None:
        """Make this append keep only the newest ``keep`` items (values are not encoded again)."""
        self.keep = keep
        if len(self.values) > keep:
            self.value_list, self.values = self.value_list[-keep:], self.values[-keep:]

    def args(self) -> Args:
        return _args([b"%d" % len(self.values), b"%d" % self.keep], self.values)

    def nodes(self) -> int:
        return sum(v.nodes for v in self.values)


def trimmed(length: int, added: int, keep: int) -> int:
    """How many items a bounded append drops from the front of a list of ``length`` (as the script computes it)."""
    return max(0, min(length, length + added - keep))


@dataclass
class _SlotValue(Op):
    """An operation on one list slot that writes one value.

    ``seen`` is the stored form of the item the client saw at ``slot``
    (:func:`stored_form`): the script finds it there, or wherever others'
    inserts and deletes in the middle have moved it.
    """

    slot: int = 0
    value: Any = None
    seen: bytes = b""
    encoded: Encoded = field(init=False)

    def __post_init__(self) -> None:
        self.encoded = encode_value(self.value, in_list=True)
        self.depth = self.encoded.depth

    def args(self) -> Args:
        return _args([b"%d" % self.slot, self.seen], [self.encoded])

    def nodes(self) -> int:
        return self.encoded.nodes


@dataclass
class ListInsert(_SlotValue):
    """``insert``: before the element at ``slot``, or at an ``end`` as the server has it; O(1) at the ends."""

    end: bytes = b""  # b"front", b"back", or b"" for a slot inside the list

    def __post_init__(self) -> None:
        super().__post_init__()
        self.name = b"linsert"

    def args(self) -> Args:
        return _args([self.end or b"%d" % self.slot, self.seen], [self.encoded])


@dataclass
class ListSet(_SlotValue):
    """``l[i] = v``: replaces the element at ``slot``, O(1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.name = b"lset"


@dataclass
class ListDelete(Op):
    """``del l[i]`` / ``pop`` / ``remove`` of the item seen at ``slot``: O(1) at the ends, else O(shorter side)."""

    slot: int = 0
    seen: bytes = b""  # the item's stored form (see _SlotValue)

    def __post_init__(self) -> None:
        self.name = b"ldel"

    def args(self) -> Args:
        return _args([b"%d" % self.slot, self.seen])


@dataclass
class ListReplace(Op):
    """Whole-list rewrite (sort, reverse, slices, ``*=``, clear), O(n).

    Applied only if the list is unchanged on the server since this replica
    saw it (``mod``); otherwise the replica refreshes and the caller recomputes.
    Child containers that stay in the list keep their nodes (and identity).
    ``compute`` makes the new list from the current one, so that a rewrite
    queued offline is made again from what the server holds when it is
    replayed; ``intent`` names it when it is one of :data:`INTENTS` (which a
    spool file can keep, where a function cannot go).
    """

    mod: int = 0
    value_list: list[Any] = field(default_factory=list)
    children: dict[int, bytes] = field(default_factory=dict)
    compute: Callable[[list[Any]], list[Any]] | None = field(default=None, compare=False, repr=False)
    intent: bytes = b""
    kept: list[bytes] = field(init=False)
    values: list[Encoded] = field(init=False)

    def __post_init__(self) -> None:
        self.name = b"lreplace"
        keep = dict(self.children)
        self.values = [encode_value(v, keep, in_list=True) for v in self.value_list]
        self.depth = max((v.depth for v in self.values), default=0)
        self.kept = [nid for key, nid in self.children.items() if key not in keep]

    def args(self) -> Args:
        return _args([b"%d" % self.mod, b"%d" % len(self.kept), *self.kept, b"%d" % len(self.values)], self.values)

    def nodes(self) -> int:
        return sum(v.nodes for v in self.values)


#: A queued append's intent when it went to a list by its root name: ``BY_NAME + name``.
BY_NAME = b"to:"

#: Whole-list rewrites that a name says in full (see :class:`ListReplace`).
INTENTS: dict[bytes, Callable[[list[Any]], list[Any]]] = {
    b"clear": lambda current: [],
    b"reverse": lambda current: current[::-1],
    b"sort": sorted,
    b"sort-reverse": lambda current: sorted(current, reverse=True),
}


#: Whole-set changes that a name says in full (see :class:`SetChange`).
SET_INTENTS: dict[bytes, Callable[[set[Any]], tuple[list[Any], list[Any]]]] = {
    b"clear": lambda current: ([], list(current)),
}


@dataclass
class SetChange(Op):
    """Add and remove set elements as one atomic change (every set method).

    With ``strict``, nothing is applied unless every element to remove is
    there; with ``mod`` (the set's change count as seen), nothing is applied
    if the set changed since: for methods whose result depends on the whole
    set (``clear``, ``&=``, ``^=``).
    """

    add: list[Any] = field(default_factory=list)
    remove: list[Any] = field(default_factory=list)
    strict: bool = False
    mod: int = -1
    #: For a change guarded by ``mod``: what to add and remove given the set's
    #: elements, so that a queued one is made again on replay (see ListReplace).
    compute: Callable[[set[Any]], tuple[list[Any], list[Any]]] | None = field(default=None, compare=False, repr=False)
    intent: bytes = b""
    added: list[bytes] = field(init=False)
    removed: list[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.name = b"schange"
        self.added = [codec.encode_key(e) for e in self.add]
        self.removed = [codec.encode_key(e) for e in self.remove]

    def args(self) -> Args:
        flag = b"1" if self.strict else b"0"
        counts = [b"%d" % len(self.added), *self.added, b"%d" % len(self.removed), *self.removed]
        return _args([b"%d" % self.mod, flag, *counts])


@dataclass
class Promote(Op):
    """Give a list item's dict stored whole (node ``child``) fields of its own.

    Sent before the first change to such a dict; ``slot`` is where this
    replica sees it (the script looks further if others moved it). It
    changes how the dict is stored, not what the list or dict holds.
    """

    child: bytes = b""
    slot: int = 0
    items: list[tuple[Any, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name = b"promote"

    def args(self) -> Args:
        keys = [codec.encode_key(k) for k, _ in self.items]
        values = [codec.encode(v) for _, v in self.items]
        # Its stored bytes too, which name it beyond its id (see the script).
        whole = codec.encode_whole(dict(self.items))
        return _args([self.child, b"%d" % self.slot, whole, b"%d" % len(keys), *keys, *values])
