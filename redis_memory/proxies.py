"""Observed ``list``, ``dict`` and ``set``: real subclasses whose every mutation is saved.

A proxy stands for one node of a memory (``_rm_nid``). Reads are plain
list/dict reads of the local replica, which the memory refreshes in place
when an attribute is read. Each mutating method builds one operation from
the replica's current view and hands it to the memory's core, which sends it
to the server and applies it here; the builder runs again if the server
says the view was stale, so positions are resolved against a fresh list. A
builder that finds nothing to do, or raises (an empty list's ``pop``), is
run again on a view made fresh first: what the server holds decides.

``copy.deepcopy``, ``copy.copy`` and pickling give plain lists, dicts and sets.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, SupportsIndex

from . import ops
from .errors import MissingKey

if TYPE_CHECKING:
    from .memory import MemoryCore

NO_OP: Any = object()


def plain(value: Any) -> Any:
    """A deep copy of ``value`` with every proxy turned into a plain list, dict or set."""
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, set):
        return set(value)
    return value


class ObservedList(list):  # type: ignore[type-arg]
    """A list node of a memory. O(1) at both ends; whole-list methods are O(n)."""

    __slots__ = ("_rm_birth", "_rm_core", "_rm_live", "_rm_lo", "_rm_mod", "_rm_nid", "_rm_parent")

    def __init__(self, core: MemoryCore, nid: bytes) -> None:
        super().__init__()
        self._rm_core = core
        self._rm_nid = nid
        self._rm_birth = b""  # the token of the operation that created the node
        self._rm_lo = 0
        self._rm_mod = 0
        self._rm_live = True
        #: The container holding this one in the replica (None for the root).
        self._rm_parent: ObservedList | ObservedDict | ObservedSet | None = None

    def _rm_submit(self, build: Callable[[], ops.Op | None]) -> Any:
        return self._rm_core.submit(self, build)

    def _rm_slot(self, index: SupportsIndex) -> int:
        i = index.__index__()
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("list index out of range")
        return self._rm_lo + i

    def _rm_item(self, index: SupportsIndex) -> tuple[int, bytes]:
        """The slot of item ``index`` and its stored form, which name it to the server."""
        slot = self._rm_slot(index)
        return slot, ops.stored_form(list.__getitem__(self, slot - self._rm_lo))

    def _rm_place(self, index: SupportsIndex, value: Any) -> tuple[int, Any, bytes]:
        slot, seen = self._rm_item(index)
        return slot, value, seen

    def _rm_replace(
        self,
        compute: Callable[[list[Any]], list[Any]],
        intent: bytes = b"",
        by_items: Callable[[list[Any]], Callable[[list[Any]], list[Any]]] | None = None,
    ) -> None:
        """A whole-list rewrite. ``by_items`` makes, from the view it was built on, the
        rewrite a replay applies to the server's list (a slice names items, not positions)."""

        def build() -> ops.Op | None:
            view = list(self)
            new = compute(list(view))
            if len(new) == len(view) and all(a is b for a, b in zip(new, view, strict=True)):
                return None
            children = {id(v): v._rm_nid for v in view if isinstance(v, Proxy)}
            again = by_items(view) if by_items is not None else compute
            return ops.ListReplace(self._rm_nid, self._rm_mod, new, children, again, intent)

        self._rm_submit(build)

    # -- O(1) ------------------------------------------------------------

    def append(self, value: Any) -> None:
        """Add at the end: one FCALL, O(1)."""
        self._rm_submit(lambda: ops.ListAppend(self._rm_nid, [value]))

    def extend(self, values: Iterable[Any]) -> None:
        """Add each value at the end: one FCALL, O(len(values))."""
        items = list(values)
        if items:
            self._rm_submit(lambda: ops.ListAppend(self._rm_nid, items))

    def __iadd__(self, values: Iterable[Any]) -> ObservedList:  # type: ignore[misc]
        self.extend(values)
        return self

    def insert(self, index: SupportsIndex, value: Any) -> None:
        """Insert before ``index``: O(1) at either end, else O(distance to the nearer end)."""

        def build() -> ops.Op:
            i = index.__index__()
            n = len(self)
            i = max(0, min(n, i + n if i < 0 else i))
            # At an end of this view is at that end of the list on the server:
            # others may have added there since this replica looked.
            end = b"front" if i == 0 else b"back" if i == n else b""
            seen = b"" if end else ops.stored_form(list.__getitem__(self, i))  # inserted before it
            return ops.ListInsert(self._rm_nid, self._rm_lo + i, value, seen, end)

        self._rm_submit(build)

    def pop(self, index: SupportsIndex = -1) -> Any:
        """Remove and return an item: O(1) at either end."""

        def build() -> ops.Op:
            if not len(self):
                raise IndexError("pop from empty list")
            return ops.ListDelete(self._rm_nid, *self._rm_item(index))

        return self._rm_submit(build)

    def remove(self, value: Any) -> None:
        """Remove the first item equal to ``value``: O(n) to find it."""
        self._rm_submit(lambda: ops.ListDelete(self._rm_nid, *self._rm_item(self.index(value))))

    def __setitem__(self, index: Any, value: Any) -> None:
        if isinstance(index, slice):
            values = list(value)

            def compute(current: list[Any]) -> list[Any]:
                current[index] = values
                return current

            self._rm_replace(compute, by_items=lambda view: _slice_by_items(view, index, values))
        elif isinstance(value, Proxy) and self[index] is value:
            return  # `l[i] += [x]` assigns the mutated proxy back to where it is
        else:
            self._rm_submit(lambda: ops.ListSet(self._rm_nid, *self._rm_place(index, value)))

    def __delitem__(self, index: Any) -> None:
        if isinstance(index, slice):

            def compute(current: list[Any]) -> list[Any]:
                del current[index]
                return current

            self._rm_replace(compute, by_items=lambda view: _slice_by_items(view, index, None))
        else:
            self._rm_submit(lambda: ops.ListDelete(self._rm_nid, *self._rm_item(index)))

    # -- O(n), applied only to the list as this replica saw it --------------

    def clear(self) -> None:
        """Remove every item: O(n)."""
        self._rm_replace(ops.INTENTS[b"clear"], b"clear")

    def sort(self, *, key: Callable[[Any], Any] | None = None, reverse: bool = False) -> None:
        """Sort in place: O(n log n) here, O(n) fields rewritten."""
        if key is None:
            intent = b"sort-reverse" if reverse else b"sort"
            self._rm_replace(ops.INTENTS[intent], intent)
        else:
            self._rm_replace(lambda current: sorted(current, key=key, reverse=reverse))

    def reverse(self) -> None:
        """Reverse in place: O(n)."""
        self._rm_replace(ops.INTENTS[b"reverse"], b"reverse")

    def __imul__(self, times: SupportsIndex) -> ObservedList:
        # Repeated containers become separate copies: a memory is a tree.
        self._rm_replace(lambda current: current * times.__index__())
        return self

    # -- copies are plain ---------------------------------------------------

    def __copy__(self) -> list[Any]:
        return list(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return [copy.deepcopy(v, memo) for v in self]

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        return (list, (list(self),))

    def __repr__(self) -> str:
        return list.__repr__(self)


def _slice_by_items(view: list[Any], index: slice, values: list[Any] | None) -> Callable[[list[Any]], list[Any]]:
    """``view[index] = values`` (``del view[index]`` for None) as a change of the items it names.

    Made again on another list (the server's, on replay), it removes or
    replaces those items wherever they are now, and puts new ones where the
    first of them is (or before the item that followed the slice): O(n).
    """
    start, stop, step = index.indices(len(view))
    named = [ops.stored_form(view[i]) for i in range(start, stop, step)]
    follower = ops.stored_form(view[stop]) if step == 1 and stop < len(view) else None

    def again(current: list[Any]) -> list[Any]:
        forms = [ops.stored_form(item) for item in current]
        hits, cursor = [], 0
        for form in named:  # the named items, in order
            found = next((i for i in range(cursor, len(forms)) if forms[i] == form), None)
            if found is not None:
                hits.append(found)
                cursor = found + 1
        if values is not None and step != 1:  # an extended slice: each item replaced in place
            result = list(current)
            for position, value in zip(hits, values, strict=False):
                result[position] = value
            return result
        kept = [item for i, item in enumerate(current) if i not in hits]
        if values is None:
            return kept
        at = hits[0] if hits else next((i for i, form in enumerate(forms) if form == follower), len(current))
        return kept[:at] + values + kept[at:]

    return again


class ObservedDict(dict):  # type: ignore[type-arg]
    """A dict node of a memory. Setting, deleting and reading one key are O(1)."""

    __slots__ = ("_rm_birth", "_rm_core", "_rm_live", "_rm_mod", "_rm_next", "_rm_nid", "_rm_parent", "_rm_up")

    def __init__(self, core: MemoryCore, nid: bytes) -> None:
        super().__init__()
        self._rm_core = core
        self._rm_nid = nid
        self._rm_birth = b""
        self._rm_next = 1
        self._rm_mod = 0
        self._rm_live = True
        #: The container holding this one in the replica (None for the root).
        self._rm_parent: ObservedList | ObservedDict | ObservedSet | None = None
        #: The list holding this dict while it is stored whole (see ops.py), else None.
        self._rm_up: ObservedList | None = None

    def _rm_submit(self, build: Callable[[], ops.Op | None]) -> Any:
        return self._rm_core.submit(self, build)

    def __setitem__(self, key: Any, value: Any) -> None:
        """Set one key: one FCALL, O(1)."""
        if isinstance(value, Proxy) and dict.get(self, key) is value:
            return  # `d[k] += [x]` assigns the mutated proxy back to where it is
        self._rm_submit(lambda: ops.DictSet(self._rm_nid, [(key, value)]))

    def __delitem__(self, key: Any) -> None:
        """Delete one key: one FCALL, O(1)."""
        self.pop(key)

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Set several keys as one atomic operation: O(number of keys)."""
        items = list(dict(*args, **kwargs).items())
        if items:
            self._rm_submit(lambda: ops.DictSet(self._rm_nid, items))

    def __ior__(self, other: Any) -> ObservedDict:  # type: ignore[misc]
        self.update(other)
        return self

    def setdefault(self, key: Any, default: Any = None) -> Any:
        """Set ``key`` only if the server does not have it; return the stored value."""
        self._rm_submit(lambda: None if key in self else ops.DictSetDefault(self._rm_nid, [(key, default)]))
        return self[key]

    def pop(self, key: Any, default: Any = NO_OP) -> Any:
        """Remove ``key`` and return its value: O(1)."""

        def build() -> ops.Op | None:
            if key in self:
                return ops.DictDelete(self._rm_nid, [key])
            if default is NO_OP:
                raise MissingKey(key)
            return None

        result = self._rm_submit(build)
        return default if result is NO_OP else result

    def popitem(self) -> tuple[Any, Any]:
        """Remove and return the last inserted pair: O(1)."""
        box: list[Any] = []

        def build() -> ops.Op:
            if not len(self):
                raise MissingKey("popitem(): dictionary is empty")
            box[:] = [next(reversed(self))]
            return ops.DictDelete(self._rm_nid, box)

        value = self._rm_submit(build)
        return box[0], value

    def clear(self) -> None:
        """Remove every key the server holds: O(n)."""
        self._rm_submit(lambda: ops.DictClear(self._rm_nid))

    def __copy__(self) -> dict[Any, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[Any, Any]:
        return {copy.deepcopy(k, memo): copy.deepcopy(v, memo) for k, v in self.items()}

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        return (dict, (dict(self),))

    def __repr__(self) -> str:
        return dict.__repr__(self)


class ObservedSet(set):  # type: ignore[type-arg]
    """A set node of a memory. Adding, discarding and testing one element are O(1).

    Elements follow the rules of dict keys (see the codec). Operations that
    return a new set (``|``, ``&``, ``copy()``) give plain sets.
    """

    __slots__ = ("_rm_birth", "_rm_core", "_rm_live", "_rm_mod", "_rm_nid", "_rm_parent")

    def __init__(self, core: MemoryCore, nid: bytes) -> None:
        super().__init__()
        self._rm_core = core
        self._rm_nid = nid
        self._rm_birth = b""
        self._rm_parent: ObservedList | ObservedDict | ObservedSet | None = None
        self._rm_mod = 0
        self._rm_live = True

    def _rm_submit(self, build: Callable[[], ops.Op | None]) -> Any:
        return self._rm_core.submit(self, build)

    def _rm_change(
        self, add: Iterable[Any] = (), remove: Iterable[Any] = (), *, always: bool = False, **options: Any
    ) -> ops.SetChange | None:
        adds, removes = list(add), list(remove)
        return ops.SetChange(self._rm_nid, adds, removes, **options) if adds or removes or always else None

    def _rm_blind(self) -> bool:
        """True while offline: "nothing to do" cannot be checked against the server, so the change is queued."""
        return not self._rm_core.link.online

    def add(self, element: Any) -> None:
        """Add one element: one FCALL, O(1)."""
        self._rm_submit(lambda: self._rm_change(add=[element]) if element not in self or self._rm_blind() else None)

    def discard(self, element: Any) -> None:
        """Remove one element if present: one FCALL, O(1)."""
        self._rm_submit(lambda: self._rm_change(remove=[element]) if element in self or self._rm_blind() else None)

    def remove(self, element: Any) -> None:
        """Remove one element; KeyError if the server does not hold it: O(1)."""

        def build() -> ops.Op | None:
            if element not in self:
                raise MissingKey(element)
            return self._rm_change(remove=[element], strict=True)

        self._rm_submit(build)

    def pop(self) -> Any:
        """Remove and return an arbitrary element: O(1)."""
        box: list[Any] = []

        def build() -> ops.Op | None:
            if not len(self):
                raise MissingKey("pop from an empty set")
            box[:] = [next(iter(self))]
            return self._rm_change(remove=box, strict=True)

        self._rm_submit(build)
        return box[0]

    def _rm_whole(self, compute: Callable[[set[Any]], tuple[list[Any], list[Any]]], intent: bytes = b"") -> None:
        """A change that depends on the whole set: applied only to the set as seen, made again if it changed."""

        def build() -> ops.Op | None:
            adds, removes = compute(set(self))
            return self._rm_change(
                adds, removes, always=self._rm_blind(), mod=self._rm_mod, compute=compute, intent=intent
            )

        self._rm_submit(build)

    def clear(self) -> None:
        """Remove every element the server holds: O(n)."""
        self._rm_whole(ops.SET_INTENTS[b"clear"], b"clear")

    def update(self, *others: Iterable[Any]) -> None:
        """Add every element of ``others`` as one atomic operation: O(len(others))."""
        new = set().union(*others)
        # All of them: one this view holds may be gone from the server.
        self._rm_submit(lambda: self._rm_change(add=new) if not new <= self or self._rm_blind() else None)

    def difference_update(self, *others: Iterable[Any]) -> None:
        """Remove every element of ``others`` the server holds: O(len(others))."""
        gone = set().union(*others)
        self._rm_submit(lambda: self._rm_change(remove=gone) if not gone.isdisjoint(self) or self._rm_blind() else None)

    def intersection_update(self, *others: Iterable[Any]) -> None:
        """Keep only elements also in every one of ``others``: O(n), on the set as the server holds it."""
        kept = [set(other) for other in others]
        self._rm_whole(lambda current: ([], [e for e in current if not all(e in k for k in kept)]))

    def symmetric_difference_update(self, other: Iterable[Any]) -> None:
        """Add the elements of ``other`` not in the set, remove those in it: O(len(other)), on the server's set."""
        toggled = set(other)
        self._rm_whole(lambda current: (list(toggled - current), list(toggled & current)))

    def __ior__(self, other: Any) -> ObservedSet:  # type: ignore[misc]
        self.update(other)
        return self

    def __iand__(self, other: Any) -> ObservedSet:  # type: ignore[misc]
        self.intersection_update(other)
        return self

    def __isub__(self, other: Any) -> ObservedSet:  # type: ignore[misc]
        self.difference_update(other)
        return self

    def __ixor__(self, other: Any) -> ObservedSet:  # type: ignore[misc]
        self.symmetric_difference_update(other)
        return self

    def __copy__(self) -> set[Any]:
        return set(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> set[Any]:
        return {copy.deepcopy(v, memo) for v in self}

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        return (set, (list(self),))

    def __repr__(self) -> str:
        return repr(set(self))


Proxy = (ObservedList, ObservedDict, ObservedSet)
