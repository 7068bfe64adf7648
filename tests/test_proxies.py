"""Observed lists and dicts: real subclasses, every mutation saved at any depth."""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import redis

from redis_memory import Memory, ObservedDict, ObservedList
from redis_memory.store import version_number


def nested(client: redis.Redis) -> tuple[Memory, Memory]:
    mem = Memory("p", client=client)
    mem.root = {"outer": [{"inner": [3, 1, 2], "d": {"a": 1, "b": 2}}]}
    return mem, Memory("p", client=client)


def test_proxies_are_real_lists_and_dicts(client: redis.Redis) -> None:
    """isinstance, ==, json.dumps and msgpack.packb work on proxies as on plain values."""
    mem, _ = nested(client)
    root = mem.root
    assert isinstance(root, dict) and isinstance(root, ObservedDict)
    assert isinstance(root["outer"], list) and isinstance(root["outer"], ObservedList)
    plain = {"outer": [{"inner": [3, 1, 2], "d": {"a": 1, "b": 2}}]}
    assert root == plain and plain == root
    assert json.dumps(root) == json.dumps(plain)
    assert msgpack.packb(root) == msgpack.packb(plain)
    assert repr(root) == repr(plain)


def test_copies_are_plain(client: redis.Redis) -> None:
    """copy.deepcopy, copy.copy and pickle give plain lists and dicts."""
    mem, _ = nested(client)
    deep = copy.deepcopy(mem.root)
    assert type(deep) is dict and type(deep["outer"]) is list and type(deep["outer"][0]["d"]) is dict
    assert type(copy.copy(mem.root)) is dict and type(copy.copy(mem.root["outer"])) is list
    unpickled = pickle.loads(pickle.dumps(mem.root))
    assert type(unpickled) is dict and type(unpickled["outer"][0]) is dict
    assert unpickled == mem.root
    deep["outer"].append(1)
    assert len(mem.root["outer"]) == 1


LIST_MUTATIONS: dict[str, Callable[[Any], Any]] = {
    "append": lambda x: x.append(9),
    "extend": lambda x: x.extend([7, 8]),
    "insert_front": lambda x: x.insert(0, 0),
    "insert_middle": lambda x: x.insert(1, 5),
    "insert_end": lambda x: x.insert(99, 5),
    "pop": lambda x: x.pop(),
    "pop_front": lambda x: x.pop(0),
    "pop_middle": lambda x: x.pop(1),
    "remove": lambda x: x.remove(1),
    "clear": lambda x: x.clear(),
    "sort": lambda x: x.sort(),
    "sort_key_reverse": lambda x: x.sort(key=lambda v: -v, reverse=True),
    "reverse": lambda x: x.reverse(),
    "setitem": lambda x: x.__setitem__(1, 10),
    "setitem_negative": lambda x: x.__setitem__(-1, 10),
    "setitem_slice": lambda x: x.__setitem__(slice(0, 2), [4, 4, 4]),
    "setitem_extended_slice": lambda x: x.__setitem__(slice(None, None, 2), [0, 0]),
    "delitem": lambda x: x.__delitem__(0),
    "delitem_slice": lambda x: x.__delitem__(slice(1, None)),
    "iadd": lambda x: x.__iadd__([6]),
    "imul": lambda x: x.__imul__(2),
    "imul_zero": lambda x: x.__imul__(0),
}


@pytest.mark.parametrize("name", sorted(LIST_MUTATIONS))
def test_every_list_mutation_is_saved_at_depth(client: redis.Redis, name: str) -> None:
    """Each mutating list method, applied two levels deep, is seen by another memory."""
    mem, other = nested(client)
    expected = [3, 1, 2]
    mutate = LIST_MUTATIONS[name]
    result = mutate(mem.root["outer"][0]["inner"])
    assert result == mutate(expected) or name.startswith("i")
    assert mem.root["outer"][0]["inner"] == expected
    assert other.root["outer"][0]["inner"] == expected
    assert Memory("p", client=client).root["outer"][0]["inner"] == expected


DICT_MUTATIONS: dict[str, Callable[[Any], Any]] = {
    "setitem_new": lambda d: d.__setitem__("c", 3),
    "setitem_existing": lambda d: d.__setitem__("a", [1]),
    "delitem": lambda d: d.__delitem__("a"),
    "update": lambda d: d.update({"a": 0, "z": 26}, y=25),
    "setdefault_new": lambda d: d.setdefault("n", {"deep": 1}),
    "setdefault_existing": lambda d: d.setdefault("a", 100),
    "pop": lambda d: d.pop("b"),
    "pop_default": lambda d: d.pop("zz", "dflt"),
    "popitem": lambda d: d.popitem(),
    "clear": lambda d: d.clear(),
    "ior": lambda d: d.__ior__({"q": 1}),
}


@pytest.mark.parametrize("name", sorted(DICT_MUTATIONS))
def test_every_dict_mutation_is_saved_at_depth(client: redis.Redis, name: str) -> None:
    """Each mutating dict method, applied three levels deep, is seen by another memory, order included."""
    mem, other = nested(client)
    expected = {"a": 1, "b": 2}
    mutate = DICT_MUTATIONS[name]
    result = mutate(mem.root["outer"][0]["d"])
    assert result == mutate(expected) or name == "ior"
    for view in (mem, other, Memory("p", client=client)):
        got = view.root["outer"][0]["d"]
        assert got == expected
        assert list(got) == list(expected)


def test_missing_keys_and_indexes_raise_like_plain_containers(client: redis.Redis) -> None:
    """KeyError, IndexError and ValueError come as they would from list and dict."""
    mem, _ = nested(client)
    d, lst = mem.root["outer"][0]["d"], mem.root["outer"][0]["inner"]
    with pytest.raises(KeyError):
        del d["nope"]
    with pytest.raises(KeyError):
        d.pop("nope")
    with pytest.raises(IndexError):
        lst[10] = 1
    with pytest.raises(IndexError):
        lst.pop(10)
    with pytest.raises(ValueError):
        lst.remove(99)
    with pytest.raises(ValueError):
        lst[::2] = [1, 2, 3]
    assert mem.root == {"outer": [{"inner": [3, 1, 2], "d": {"a": 1, "b": 2}}]}
    d.clear()
    with pytest.raises(KeyError):
        d.popitem()
    lst.clear()
    with pytest.raises(IndexError):
        lst.pop()


def test_nothing_is_written_when_nothing_changes(client: redis.Redis) -> None:
    """Setting the same value, clearing an empty container or sorting a sorted list writes nothing."""
    mem = Memory("p", client=client)
    mem.d = {"a": 1}
    mem.l = [1, 2, 3]
    mem.e = []
    version = client.hget(mem.key, "v")
    mem.d["a"] = 1
    mem.l[0] = 1
    mem.l.sort()
    mem.e.clear()
    mem.e.extend([])
    mem.d.update({})
    mem.l[1:1] = []
    assert client.hget(mem.key, "v") == version


def test_repeated_containers_become_copies(client: redis.Redis) -> None:
    """Storing one container twice stores two independent copies (a memory is a tree)."""
    mem = Memory("p", client=client)
    shared: dict[str, int] = {"n": 0}
    mem.l = [shared, shared]
    mem.l[0]["n"] = 1
    assert mem.l == [{"n": 1}, {"n": 0}]
    mem.l *= 2
    mem.l[0]["n"] = 5
    assert Memory("p", client=client).l == [{"n": 5}, {"n": 0}, {"n": 1}, {"n": 0}]


def test_assigning_a_proxy_copies_it(client: redis.Redis) -> None:
    """mem.b = mem.a stores a copy; later changes to one leave the other alone."""
    mem = Memory("p", client=client)
    mem.a = {"x": [1]}
    mem.b = mem.a
    mem.b["x"].append(2)
    assert mem.a == {"x": [1]} and mem.b == {"x": [1, 2]}


def test_held_proxy_stays_live(client: redis.Redis, other_client: redis.Redis) -> None:
    """A proxy kept in a variable reflects other writers after any attribute read."""
    mem = Memory("p", client=client)
    mem.items = [1]
    held = mem.items
    other = Memory("p", client=other_client)
    other.items.append(2)
    other.items.insert(0, 0)
    mem.anything = True  # writes don't refresh; reads do
    assert mem.items is held
    assert held == [0, 1, 2]


def test_sort_retries_on_a_fresh_view(client: redis.Redis, other_client: redis.Redis) -> None:
    """A whole-list operation made on a stale view is recomputed, never losing others' writes."""
    mem = Memory("p", client=client)
    mem.items = [3, 1]
    stale = mem.items
    Memory("p", client=other_client).items.append(2)
    stale.sort()
    assert Memory("p", client=other_client).items == [1, 2, 3]


def test_augmented_assignment_is_one_operation(client: redis.Redis, other_client: redis.Redis) -> None:
    """`mem.l += [x]`, `d[k] += [x]`, `l[i] |= {...}` append or update in place: one change, identity kept."""
    mem = Memory("p", client=client)
    mem.log = [1]
    mem.d = {"k": [1]}
    mem.rows = [{"a": 1}]
    held_log, held_list, held_row = mem.log, mem.d["k"], mem.rows[0]
    version = version_number(client.hget(mem.key, "v"))
    mem.log += [2]
    mem.d["k"] += [2]
    mem.rows[0] |= {"b": 2}
    # The row, a list item's dict stored whole, first gets fields of its own: one more version.
    assert version_number(client.hget(mem.key, "v")) == version + 4
    mem.rows[0] |= {"c": 3}
    assert version_number(client.hget(mem.key, "v")) == version + 5
    assert mem.log is held_log and mem.d["k"] is held_list and mem.rows[0] is held_row
    expected = {"log": [1, 2], "d": {"k": [1, 2]}, "rows": [{"a": 1, "b": 2, "c": 3}]}
    assert Memory("p", client=other_client).to_dict() == expected
