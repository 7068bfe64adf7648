"""Paths that used to lose, resurrect or hide data: stale decisions, end inserts, pops, replays."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import pytest
import redis
from conftest import Switch

from redis_memory import ContainerDeleted, Memory, MissingKey, ObservedSet


def pair(client: redis.Redis, other_client: redis.Redis, **values: Any) -> tuple[Memory, Memory]:
    mine, theirs = Memory("t", client=client), Memory("t", client=other_client)
    for name, value in values.items():
        setattr(mine, name, value)
    theirs.to_dict()
    return mine, theirs


# -- a decision that writes nothing is made on a fresh view (item 8) ----------


def test_clear_of_a_held_list_removes_what_others_added(client: redis.Redis, other_client: redis.Redis) -> None:
    """clear() on a held empty list still clears the item another process appended meanwhile."""
    mine, theirs = pair(client, other_client, items=[])
    held = mine.items
    theirs.items.append("late")
    held.clear()
    assert Memory("t", client=other_client).items == []
    assert held == []


def test_clear_of_a_held_dict_removes_what_others_added(client: redis.Redis, other_client: redis.Redis) -> None:
    """clear() on a held empty dict still clears the key another process set meanwhile."""
    mine, theirs = pair(client, other_client, d={})
    held = mine.d
    theirs.d["k"] = 1
    held.clear()
    assert Memory("t", client=other_client).d == {}


@pytest.mark.parametrize("method", ["sort", "reverse"])
def test_sort_and_reverse_of_a_held_list_see_what_others_added(
    client: redis.Redis, other_client: redis.Redis, method: str
) -> None:
    """sort() and reverse() on a held one-item list include the item another process appended."""
    mine, theirs = pair(client, other_client, items=[2])
    held = mine.items
    theirs.items.append(1)
    getattr(held, method)()
    assert Memory("t", client=other_client).items == [1, 2]


def test_setdefault_returns_what_the_server_holds(client: redis.Redis, other_client: redis.Redis) -> None:
    """setdefault() on a key another process deleted sets the default and returns it, as stored."""
    mine, theirs = pair(client, other_client, d={"k": "old"})
    held = mine.d
    del theirs.d["k"]
    assert held.setdefault("k", "new") == "new"
    assert Memory("t", client=other_client).d == {"k": "new"}


def test_pop_with_default_removes_what_others_added(client: redis.Redis, other_client: redis.Redis) -> None:
    """pop(k, default) on a key missing here but set by another process removes and returns it."""
    mine, theirs = pair(client, other_client, d={})
    held = mine.d
    theirs.d["k"] = "theirs"
    assert held.pop("k", None) == "theirs"
    assert Memory("t", client=other_client).d == {}


def test_errors_of_a_stale_view_are_checked_on_a_fresh_one(client: redis.Redis, other_client: redis.Redis) -> None:
    """pop() of an empty held list, remove(x) and popitem() see what others added before they raise."""
    mine, theirs = pair(client, other_client, items=[], d={})
    items, d = mine.items, mine.d
    theirs.items.extend(["x", "y"])
    theirs.d["k"] = 1
    assert items.pop() == "y"
    items.remove("x")
    assert d.popitem() == ("k", 1)
    assert Memory("t", client=other_client).to_dict() == {"items": [], "d": {}}
    with pytest.raises(IndexError):
        items.pop()
    with pytest.raises(MissingKey):
        d.popitem()


# -- inserts at either end are end operations (item 9) -------------------------


def test_front_inserts_from_a_stale_view_keep_each_writers_order(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """Two writers' insert(0, x) from stale views land at the front, each writer's order kept."""
    mine, theirs = pair(client, other_client, items=["base"])
    a, b = mine.items, theirs.items
    b.insert(0, "b1")
    a.insert(0, "a1")
    b.insert(0, "b2")
    a.insert(0, "a2")
    stored = Memory("t", client=other_client).items
    assert stored == ["a2", "b2", "a1", "b1", "base"]
    assert a.pop(0) == "a2"


def test_end_inserts_from_a_stale_view_land_at_the_end(client: redis.Redis, other_client: redis.Redis) -> None:
    """insert(len(l), x) from a stale view appends after what others appended."""
    mine, theirs = pair(client, other_client, items=["base"])
    held = mine.items
    theirs.items.append("theirs")
    held.insert(len(held), "mine")
    assert Memory("t", client=other_client).items == ["base", "theirs", "mine"]


# -- pop() of a container returns what the server removed (item 10) -----------


def test_popped_dict_is_what_the_server_held(client: redis.Redis, other_client: redis.Redis) -> None:
    """A held dict's pop(k) of a nested dict another process changed returns the changed dict."""
    mine, theirs = pair(client, other_client, d={"inner": {"a": 1}})
    held = mine.d
    theirs.d["inner"]["b"] = 2
    assert held.pop("inner") == {"a": 1, "b": 2}
    assert Memory("t", client=other_client).d == {}


def test_popped_list_item_is_what_the_server_held(client: redis.Redis, other_client: redis.Redis) -> None:
    """A held list's pop() of a nested list another process appended to returns it whole."""
    mine, theirs = pair(client, other_client, rows=[["a"]])
    held = mine.rows
    theirs.rows[0].append("b")
    assert held.pop() == ["a", "b"]
    assert Memory("t", client=other_client).rows == []


# -- sets are observed (item 1) -------------------------------------------------

SET_MUTATIONS: dict[str, Any] = {
    "add": lambda s: s.add("z"),
    "discard": lambda s: s.discard("a"),
    "remove": lambda s: s.remove("a"),
    "pop": lambda s: s.pop(),
    "clear": lambda s: s.clear(),
    "update": lambda s: s.update({"y"}, ["z"]),
    "ior": lambda s: s.__ior__({"y"}),
    "iand": lambda s: s.__iand__({"a", "q"}),
    "isub": lambda s: s.__isub__({"a"}),
    "ixor": lambda s: s.__ixor__({"a", "q"}),
    "difference_update": lambda s: s.difference_update({"a"}, {"b"}),
    "intersection_update": lambda s: s.intersection_update({"a", "b"}, {"b"}),
    "symmetric_difference_update": lambda s: s.symmetric_difference_update({"b", "w"}),
}


@pytest.mark.parametrize("name", sorted(SET_MUTATIONS))
def test_every_set_mutation_is_saved_at_depth(client: redis.Redis, other_client: redis.Redis, name: str) -> None:
    """Each mutating set method, on an attribute and nested in a dict and a list, reaches other processes."""
    mine = Memory("s", client=client)
    mine.tags = {"a", "b"}
    mine.nested = {"d": {"a", "b"}, "l": [{"a", "b"}]}
    models = [{"a", "b"}, {"a", "b"}, {"a", "b"}]
    proxies = [mine.tags, mine.nested["d"], mine.nested["l"][0]]
    for proxy, model in zip(proxies, models, strict=True):
        assert isinstance(proxy, set) and isinstance(proxy, ObservedSet)
        result = SET_MUTATIONS[name](proxy)
        expected = SET_MUTATIONS[name](model)
        if name == "pop":
            assert result in {"a", "b"}
            model.clear()
            model.update({"a", "b"} - {result})
        else:
            assert result is None or result is proxy
            del expected
        assert proxy == model
    fresh = Memory("s", client=other_client)
    assert fresh.tags == models[0] and type(fresh.tags) is ObservedSet
    assert fresh.nested == {"d": models[1], "l": [models[2]]}
    assert mine.to_dict() == fresh.to_dict()


def test_set_methods_on_a_stale_view_apply_to_what_the_server_holds(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """clear, &=, ^= and remove of a held set see elements another process added or removed first."""
    mine, theirs = pair(client, other_client, s={"a"}, t={"a", "b"}, u={"a"})
    s, t, u = mine.s, mine.t, mine.u
    theirs.s.add("late")
    theirs.t.add("late")
    theirs.u.discard("a")
    s.clear()
    t &= {"a"}
    with pytest.raises(KeyError):
        u.remove("a")
    fresh = Memory("t", client=other_client)
    assert fresh.s == set() and fresh.t == {"a"} and fresh.u == set()


def test_set_copies_are_plain_and_unchanged_sets_write_nothing(client: redis.Redis) -> None:
    """copies and operators give plain sets; adding a present element or discarding an absent one writes nothing."""
    import copy

    mem = Memory("s", client=client)
    mem.tags = {1, 2}
    tags = mem.tags
    assert type(tags | {3}) is set and type(copy.deepcopy(tags)) is set and type(tags.copy()) is set
    assert repr(tags) == repr({1, 2})
    assert type(mem.to_dict()["tags"]) is set
    version = client.hget(mem.key, "v")
    tags.add(1)
    tags.discard(3)
    tags |= {2}
    tags -= {5}
    assert client.hget(mem.key, "v") == version


def test_a_set_inside_a_message_is_observed(client: redis.Redis, other_client: redis.Redis) -> None:
    """A list item's dict that holds a set keeps it as a live set, saved when changed."""
    mem = Memory("s", client=client)
    mem.messages = [{"role": "user", "tags": {"x"}}]
    mem.messages[0]["tags"].add("y")
    assert Memory("s", client=other_client).messages == [{"role": "user", "tags": {"x", "y"}}]


# -- a server that comes back with older data is detected (item 4) --------------


def snapshot(client: redis.Redis, mem: Memory) -> dict[bytes, dict[bytes, bytes]]:
    """The memory's hash as it is now, as a snapshot of the server would keep it."""
    return {mem.key.encode(): client.hgetall(mem.key)}


def roll_back(client: redis.Redis, saved: dict[bytes, dict[bytes, bytes]]) -> None:
    """Put the memory's hash back as it was in ``saved``: a restart from an older snapshot."""
    for key, fields in saved.items():
        client.delete(key)
        client.hset(key, mapping=fields)


def test_a_rolled_back_server_is_never_trusted(client: redis.Redis, other_client: redis.Redis) -> None:
    """After a rollback and later writes by others, a replica reloads and a vanished dict's proxy is deleted."""
    mine = Memory("t", client=client)
    mine.profile = {"name": "A"}
    saved = snapshot(client, mine)
    mine.old = {"a": 1}
    held = mine.old
    mine.n = 1
    mine.n = 2
    roll_back(client, saved)
    theirs = Memory("t", client=other_client)
    theirs.payroll = {}  # its node id is the one the vanished dict had
    for i in range(4):
        theirs.n = i
    assert mine.to_dict() == Memory("t", client=other_client).to_dict()
    assert "old" not in mine.to_dict()
    with pytest.raises(ContainerDeleted):
        held["salary"] = 100
    assert Memory("t", client=other_client).payroll == {}


def test_a_rollback_to_the_same_version_number_is_detected(client: redis.Redis, other_client: redis.Redis) -> None:
    """Others' writes after a rollback that reach this replica's version number still make it reload."""
    mine = Memory("t", client=client)
    mine.a = 1
    saved = snapshot(client, mine)
    mine.b = 2
    mine.c = 3
    roll_back(client, saved)
    theirs = Memory("t", client=other_client)
    theirs.x = 1
    theirs.y = 2
    assert mine.to_dict() == {"a": 1, "x": 1, "y": 2}


# -- queued changes replay like online ones (item 7) ----------------------------

WHOLE_LIST_CHANGES: dict[str, tuple[list[Any], Any, list[Any]]] = {
    # the list, what the offline writer does to it, what it is after another writer appended 2
    "clear": ([3, 1], lambda xs: xs.clear(), []),
    "sort": ([3, 1], lambda xs: xs.sort(), [1, 2, 3]),
    "sort_reverse": ([1, 3], lambda xs: xs.sort(reverse=True), [3, 2, 1]),
    "sort_key": ([1, 3], lambda xs: xs.sort(key=lambda x: -x), [3, 2, 1]),
    "reverse": ([3, 1], lambda xs: xs.reverse(), [2, 1, 3]),
    "slice_set": ([3, 1], lambda xs: xs.__setitem__(slice(0, 1), ["x"]), ["x", 1, 2]),
    "slice_del": ([3, 1], lambda xs: xs.__delitem__(slice(0, 1)), [1, 2]),
}


@pytest.mark.parametrize("name", sorted(WHOLE_LIST_CHANGES))
def test_a_queued_whole_list_change_applies_to_what_the_server_holds(
    switch: Switch, client: redis.Redis, name: str
) -> None:
    """clear, sort, reverse and slice changes queued offline apply on replay to the list as others left it."""
    start, change, expected = WHOLE_LIST_CHANGES[name]
    mem = Memory("t", client=switch.client())
    mem.items = start
    other = Memory("t", client=client)
    switch.cut()
    change(mem.items)
    other.items.append(2)
    switch.restore()
    assert mem.flush(timeout=20)
    assert mem.status().dropped == 0
    assert Memory("t", client=client).items == expected
    assert mem.items == expected


def test_a_queued_dict_change_survives_a_busy_container(switch: Switch, client: redis.Redis) -> None:
    """A queued d[k] = v replacing a nested dict that another process keeps changing lands on replay."""
    mem = Memory("t", client=switch.client())
    mem.d = {"k": {"n": 0}}
    other = Memory("t", client=client)
    inner = other.d["k"]
    switch.cut()
    mem.d["k"] = "mine"
    stop = threading.Event()

    def churn() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                inner[f"x{n % 50}"] = n
            except ContainerDeleted:
                return

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        time.sleep(0.2)
        switch.restore()
        assert mem.flush(timeout=30)
    finally:
        stop.set()
        worker.join(10)
    assert mem.status().dropped == 0
    assert Memory("t", client=client).d == {"k": "mine"}


# -- max_messages holds for every way a list grows (item 17) ---------------------


@pytest.mark.parametrize(
    "grow",
    [
        lambda m: m.insert(len(m), {"n": 99}),
        lambda m: m.insert(0, {"n": 99}),
        lambda m: m.insert(1, {"n": 99}),
        lambda m: m.__setitem__(slice(1, 2), [{"n": 97}, {"n": 98}, {"n": 99}]),
        lambda m: m.__imul__(2),
    ],
    ids=["insert_end", "insert_front", "insert_middle", "slice_set", "imul"],
)
def test_max_messages_holds_for_inserts_and_slices(client: redis.Redis, grow: Any) -> None:
    """insert, slice assignment and *= on a bounded history keep only its newest max_messages items."""
    from redis_memory import ConversationMemory

    chat = ConversationMemory("bounded", client=client, max_messages=3)
    chat.messages = [{"n": i} for i in range(3)]
    model = [{"n": i} for i in range(3)]
    grow(chat.messages)
    grow(model)
    stored = ConversationMemory("bounded", client=client).messages
    assert stored == model[-3:] and chat.messages == stored


def test_max_messages_holds_when_the_history_is_assigned_whole(client: redis.Redis) -> None:
    """Assigning a longer list to a bounded history stores only its newest max_messages items."""
    from redis_memory import ConversationMemory

    chat = ConversationMemory("bounded", client=client, max_messages=3)
    chat.messages = list(range(5))
    assert ConversationMemory("bounded", client=client).messages == [2, 3, 4]


# -- a full reload never tears a held proxy (item 11) ----------------------------


def test_a_full_reload_never_hides_a_key_that_did_not_change(client: redis.Redis, other_client: redis.Redis) -> None:
    """While the replica reloads in full, another thread reading a held dict, set and list never misses an item."""
    mem = Memory("t", client=client)
    mem.d = {**{f"filler{i}": i for i in range(500)}, "busy": 0, "stable": 1}  # refilled last, if refilled
    mem.s = {"stable", *(f"filler{i}" for i in range(500))}
    mem.rows = [{"stable": 1}, {"n": 0}]
    d, s, rows = mem.d, mem.s, mem.rows
    theirs = Memory("t", client=other_client)
    misses: list[str] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            if d.get("stable") != 1:
                misses.append("dict")
            if "stable" not in s:
                misses.append("set")
            if rows[0].get("stable") != 1:
                misses.append("message")

    reader = threading.Thread(target=read)
    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads take turns often, as on a busy machine
    reader.start()
    try:
        for round_ in range(4):
            for i in range(140):  # more than the journal holds: the next read reloads in full
                theirs.d["busy"] = i
            theirs.d[f"new{round_}"] = round_
            theirs.s.add(f"new{round_}")
            theirs.rows.append({"n": round_})
            assert mem.to_dict() == theirs.to_dict()
    finally:
        stop.set()
        reader.join(10)
        sys.setswitchinterval(switching)
    assert misses == []
    assert mem.d is d and mem.s is s and mem.rows is rows


def test_positional_writes_on_items_made_offline_replay(switch: Switch, client: redis.Redis) -> None:
    """Items created offline, then deleted or replaced by position offline, replay as made (nothing dropped)."""
    mem = Memory("t", client=switch.client())
    mem.to_dict()
    switch.cut()
    mem.a = [[], {"role": "user"}, [1]]
    del mem.a[0]
    mem.a[0] = "replaced"
    mem.a.remove([1])
    switch.restore()
    assert mem.flush(timeout=20)
    assert mem.status().dropped == 0
    assert Memory("t", client=client).a == ["replaced"] == mem.a
