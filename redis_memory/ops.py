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
           | "r" <nid>                      existing node kept (ListReplace only)

A dict that is an item of a list and holds at most :data:`WHOLE_MAX_KEYS`
scalars (a chat message) is stored *whole*: one msgpack map in its list
slot, with its node id, instead of a header and one field per key. Adding,
reading and dropping it then costs one field. It is still a node with a
stable id: before its first change, a :class:`Promote` gives it fields of
its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import codec
from .errors import UnsupportedValue


def item(data: bytes) -> bytes:
    """One script argument, already in its RESP form (a bulk string)."""
    return b"$%d\r\n%s\r\n" % (len(data), data)


_S, _L, _D, _F, _R = item(b"s"), item(b"l"), item(b"d"), item(b"f"), item(b"r")
#: The most keys a list item's dict may have to be stored whole.
WHOLE_MAX_KEYS = 16

#: Script arguments in RESP form, and how many there are.
Args = tuple[bytes, int]


@dataclass
class Encoded:
    """A value ready to send (``args``), and what the replica builds from it."""

    args: Args
    value: Any
    reuse: bytes | None = None  # the nid of an existing node kept in place
    nodes: int = 0  # nodes the server creates for it: one per list or dict sent ("l", "d", "f")


def whole(value: Any) -> bool:
    """True if ``value``, as an item of a list, is stored whole (see the module's notes)."""
    if not isinstance(value, dict) or len(value) > WHOLE_MAX_KEYS:
        return False
    for element in value.values():  # a loop: twice as fast as any() here
        if type(element) not in codec.SIMPLE_TYPES and isinstance(element, (list, dict)):
            return False
    return True


def encode_value(value: Any, keep: dict[int, bytes] | None = None, in_list: bool = False) -> Encoded:
    """Tokenize ``value`` (an item of a list if ``in_list``).

    ``keep`` maps id(proxy) -> nid of nodes that may stay in place.
    """
    if keep is not None and isinstance(value, (list, dict)) and id(value) in keep:
        nid = keep.pop(id(value))
        return Encoded((_R + item(nid), 2), value, nid)
    out: list[bytes] = []
    nodes = _tokenize(value, out, set(), in_list)
    return Encoded((b"".join(out), len(out)), value, nodes=nodes)


def _tokenize(value: Any, out: list[bytes], path: set[int], in_list: bool) -> int:
    """Append ``value``'s tokens to ``out``; return how many nodes they create."""
    if not isinstance(value, (list, dict)):
        out += (_S, item(codec.encode(value)))
        return 0
    if in_list and isinstance(value, dict) and whole(value):
        out += (_F, item(codec.encode_whole(value)))
        return 1
    if id(value) in path:
        raise UnsupportedValue("cannot store a container that contains itself")
    path.add(id(value))
    nodes = 1
    if isinstance(value, list):
        out += (_L, item(b"%d" % len(value)))
        for element in value:
            nodes += _tokenize(element, out, path, True)
    else:
        out += (_D, item(b"%d" % len(value)))
        out.extend([item(codec.encode_key(k)) for k in value])
        for element in value.values():
            nodes += _tokenize(element, out, path, False)
    path.discard(id(value))
    return nodes


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

    def __post_init__(self) -> None:
        self.name = b"dset"
        self.keys = [codec.encode_key(k) for k, _ in self.items]
        self.values = [encode_value(v) for _, v in self.items]

    def args(self) -> Args:
        return _args([b"%d" % len(self.keys), *self.keys], self.values)

    def nodes(self) -> int:
        return sum(v.nodes for v in self.values)


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
    keep: int = field(init=False, default=0)
    values: list[Encoded] = field(init=False)

    def __post_init__(self) -> None:
        self.name = b"lappend"
        self.values = [encode_value(v, in_list=True) for v in self.value_list]

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
    """An operation on one list slot that writes one value."""

    slot: int = 0
    value: Any = None
    encoded: Encoded = field(init=False)

    def __post_init__(self) -> None:
        self.encoded = encode_value(self.value, in_list=True)

    def args(self) -> Args:
        return _args([b"%d" % self.slot], [self.encoded])

    def nodes(self) -> int:
        return self.encoded.nodes


@dataclass
class ListInsert(_SlotValue):
    """``insert``: before the element at ``slot``; O(1) at either end."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.name = b"linsert"


@dataclass
class ListSet(_SlotValue):
    """``l[i] = v``: replaces the element at ``slot``, O(1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.name = b"lset"


@dataclass
class ListDelete(Op):
    """``del l[i]`` / ``pop`` / ``remove``: O(1) at either end, else shifts the shorter side."""

    slot: int = 0

    def __post_init__(self) -> None:
        self.name = b"ldel"

    def args(self) -> Args:
        return _args([b"%d" % self.slot])


@dataclass
class ListReplace(Op):
    """Whole-list rewrite (sort, reverse, slices, ``*=``, clear), O(n).

    Applied only if the list is unchanged on the server since this replica
    saw it (``mod``); otherwise the replica refreshes and the caller recomputes.
    Child containers that stay in the list keep their nodes (and identity).
    """

    mod: int = 0
    value_list: list[Any] = field(default_factory=list)
    children: dict[int, bytes] = field(default_factory=dict)
    kept: list[bytes] = field(init=False)
    values: list[Encoded] = field(init=False)

    def __post_init__(self) -> None:
        self.name = b"lreplace"
        keep = dict(self.children)
        self.values = [encode_value(v, keep, in_list=True) for v in self.value_list]
        self.kept = [nid for key, nid in self.children.items() if key not in keep]

    def args(self) -> Args:
        return _args([b"%d" % self.mod, b"%d" % len(self.kept), *self.kept, b"%d" % len(self.values)], self.values)

    def nodes(self) -> int:
        return sum(v.nodes for v in self.values)


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
        return _args([self.child, b"%d" % self.slot, b"%d" % len(keys), *keys, *values])
