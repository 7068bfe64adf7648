"""Corrupt stored data: CorruptData naming key and field, other fields readable, always overwritable or deletable."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import redis
from conftest import flush, make_client

from redis_memory import CorruptData, Memory, RedisMemoryError


def stored(client: redis.Redis, mem: Memory) -> dict[bytes, bytes]:
    return dict(client.hgetall(mem.key))


def entry(name: str) -> bytes:
    """The root entry field of attribute ``name``."""
    return b"e0:" + msgpack.packb(name)


def child(client: redis.Redis, mem: Memory, name: str) -> bytes:
    """The node id attribute ``name`` refers to."""
    return stored(client, mem)[entry(name)].partition(b":")[2][1:]


def force_reload(client: redis.Redis, mem: Memory) -> None:
    client.hset(mem.key, "v", b"999 forced")


def assert_corrupt(info: pytest.ExceptionInfo[CorruptData], key: str, field: bytes) -> None:
    assert isinstance(info.value, RedisMemoryError) and isinstance(info.value, ValueError)
    assert info.value.key == key and info.value.field == field and key in str(info.value)


# -- 1. a dict entry without its '<seq>:' prefix -------------------------------


@pytest.mark.parametrize("bad", [b"junk", b"", b"ab:\x01"])
def test_a_root_entry_without_its_sequence_is_corrupt_and_replaceable(client: redis.Redis, bad: bytes) -> None:
    """An entry lacking '<n>:' is CorruptData (hasattr raises), can be set again and deleted."""
    mem = Memory("seq", client=client)
    mem.x, mem.y = 1, 2
    client.hset(mem.key, entry("x"), bad)
    force_reload(client, mem)
    fresh = Memory("seq", client=client)
    with pytest.raises(CorruptData) as info:
        hasattr(fresh, "x")
    assert_corrupt(info, mem.key, entry("x"))
    assert fresh.y == 2
    fresh.z = 3
    fresh.x = "again"  # placed last, as a new key: here as in a fresh load
    assert list(fresh.to_dict()) == list(Memory("seq", client=client).to_dict()) == ["y", "z", "x"]
    assert Memory("seq", client=client).x == "again"
    client.hset(mem.key, entry("x"), bad)
    force_reload(client, mem)
    again = Memory("seq", client=client)
    del again.x
    assert not hasattr(Memory("seq", client=client), "x")
    assert Memory("seq", client=client).to_dict() == {"y": 2, "z": 3}


# -- 2. a list or map in a scalar slot ------------------------------------------


@pytest.mark.parametrize("value", [[1, 2], {"a": 1}])
def test_a_msgpack_list_or_map_in_a_scalar_slot_is_corrupt(client: redis.Redis, value: object) -> None:
    """A list or dict packed into a scalar slot is never returned as a plain (unsaved) value."""
    mem = Memory("slot", client=client)
    mem.x, mem.y = "scalar", 2
    client.hset(mem.key, entry("x"), b"1:" + msgpack.packb(value))
    force_reload(client, mem)
    with pytest.raises(CorruptData) as info:
        _ = Memory("slot", client=client).x
    assert_corrupt(info, mem.key, entry("x"))
    assert Memory("slot", client=client).y == 2


# -- 3. corrupt version and activity fields ---------------------------------


@pytest.mark.parametrize("name", ["ta", "tc"])
def test_corrupt_activity_times_are_corrupt_data(client: redis.Redis, name: str) -> None:
    """metadata() on a memory whose activity time is not a number raises CorruptData naming it."""
    mem = Memory("times", client=client)
    mem.x = 1
    client.hset(mem.key, name, b"yesterday")
    with pytest.raises(CorruptData) as info:
        Memory("times", client=client).metadata()
    assert_corrupt(info, mem.key, name.encode())
    assert Memory("times", client=client).x == 1


@pytest.mark.parametrize("bad", [b"x", b"-3 tok", b"", b"1.5 tok"])
def test_a_corrupt_version_never_bricks_the_memory_and_a_write_repairs_it(client: redis.Redis, bad: bytes) -> None:
    """A memory whose version is no stamp still reads (in full) in every replica, and any write repairs it."""
    mem = Memory("ver", client=client)
    mem.x = 1
    held = Memory("ver", client=client)
    assert held.x == 1
    client.hset(mem.key, "v", bad)
    for reader in (held, Memory("ver", client=client)):
        assert reader.x == 1
    Memory("ver", client=client).y = 2
    assert client.hget(mem.key, "v") != bad
    assert Memory("ver", client=client).to_dict() == {"x": 1, "y": 2}
    assert held.to_dict() == {"x": 1, "y": 2}


#: A write of one item, and what it changes.
WRITES: dict[str, tuple[Callable[[Memory], object], dict[str, object]]] = {
    "an append": (lambda m: m.log.append("two"), {"log": ["one", "two"]}),
    "an append to a held list": (lambda m: m.held_log.append("two"), {"log": ["one", "two"]}),
    "a set of a key there": (lambda m: setattr(m, "x", 5), {"x": 5}),
    "a set of a new key": (lambda m: setattr(m, "y", 2), {"y": 2}),
    "a set in a nested dict": (lambda m: m.profile.__setitem__("name", "Bo"), {"profile": {"name": "Bo"}}),
}


@pytest.mark.parametrize("write", WRITES)
@pytest.mark.parametrize("bad", [b"x", b"-3 tok", b"1.5 tok", b"99999999999999999999 tok"])
def test_a_write_of_one_item_repairs_a_corrupt_version(
    client: redis.Redis, other_client: redis.Redis, bad: bytes, write: str
) -> None:
    """The writes that send what they write along (from a fresh view) do not trust a version that is no stamp."""
    mem = Memory("ver1", client=client)
    mem.x, mem.log, mem.profile = 1, ["one"], {"name": "Ada"}
    client.hset(mem.key, "v", bad)
    reader = Memory("ver1", client=other_client)
    assert reader.log == ["one"]
    object.__setattr__(reader, "held_log", reader.log)
    operation, change = WRITES[write]
    operation(reader)
    assert client.hget(mem.key, "v") != bad
    expected = {"x": 1, "log": ["one"], "profile": {"name": "Ada"}, **change}
    assert Memory("ver1", client=client).to_dict() == reader.to_dict() == expected


# -- 4. a corrupt journal entry -----------------------------------------------


@pytest.mark.parametrize("bad", [b"2 tok x", b"2 tok 9", b"2 tok 99:e0:", b"2 tok 2:h0junk", b"garbage"])
def test_a_corrupt_journal_entry_makes_a_replica_reload(client: redis.Redis, bad: bytes) -> None:
    """A replica behind an unparseable journal entry reloads everything instead of failing."""
    mem = Memory("journal", client=client)
    mem.x = 1
    behind = Memory("journal", client=client)
    assert behind.x == 1
    mem.x = 2
    client.hset(mem.key, "j2", bad)
    assert behind.x == 2


# -- 5. corrupt nested data can be replaced and deleted --------------------------


def nested(client: redis.Redis) -> Memory:
    mem = Memory("nested", client=client)
    mem.d = {"inner": {"x": 1, "l": [1, 2]}, "b": 2}
    mem.other = 5
    return mem


@pytest.mark.parametrize(
    "field, bad",
    [
        ("inner-header", b"d 9 3 0 x"),  # a count that is not the dict's
        ("inner-header", b"d x y z"),
        ("inner-header", b"garbage"),
        ("list-header", b"junk"),
        ("inner-key", b"1:\x01"),  # an entry whose key is undecodable
        ("inner-x", b"junk"),
    ],
)
@pytest.mark.parametrize("action", ["replace", "delete"])
def test_corrupt_nested_data_is_replaced_or_deleted_whole(
    client: redis.Redis, field: str, bad: bytes, action: str
) -> None:
    """An attribute holding a corrupt nested node or entry reads as CorruptData, and can be set or deleted."""
    mem = nested(client)
    d = child(client, mem, "d")
    inner = stored(client, mem)[b"e" + d + b":" + msgpack.packb("inner")].partition(b":")[2][1:]
    lst = stored(client, mem)[b"e" + inner + b":" + msgpack.packb("l")].partition(b":")[2][1:]
    target = {
        "inner-header": b"h" + inner,
        "list-header": b"h" + lst,
        "inner-key": b"e" + inner + b":\xc1",
        "inner-x": b"e" + inner + b":" + msgpack.packb("x"),
    }[field]
    client.hset(mem.key, target, bad)
    force_reload(client, mem)
    fresh = Memory("nested", client=client)
    with pytest.raises(CorruptData) as info:
        _ = fresh.d
    assert_corrupt(info, mem.key, target)
    assert fresh.other == 5
    if action == "replace":
        fresh.d = {"new": 1}
        assert Memory("nested", client=client).to_dict() == {"d": {"new": 1}, "other": 5}
    else:
        del fresh.d
        assert Memory("nested", client=client).to_dict() == {"other": 5}
    old = {d, inner, lst}
    nodes = {f[1:].partition(b":")[0] for f in stored(client, mem) if f[:1] in b"eh"}
    assert not nodes & old  # every field of the replaced subtree is gone


# -- 6. an undecodable attribute name -------------------------------------------


def test_an_undecodable_attribute_name_is_corrupt_data_and_deletable(client: redis.Redis) -> None:
    """A root entry whose name is undecodable makes to_dict() and dir() raise; other names read; delete() works."""
    mem = Memory("names", client=client)
    mem.x = 1
    client.hset(mem.key, b"e0:\xc1", b"5:\x01")
    force_reload(client, mem)
    fresh = Memory("names", client=client)
    assert fresh.x == 1
    for listing in (fresh.to_dict, lambda: dir(fresh)):
        with pytest.raises(CorruptData) as info:
            listing()
        assert_corrupt(info, mem.key, b"e0:\xc1")
    fresh.y = 2
    assert Memory("names", client=client).y == 2
    fresh.delete()
    assert client.exists(mem.key) == 0 and Memory("names", client=client).to_dict() == {}


# -- 7. a memory without its incarnation ----------------------------------------


def test_a_memory_without_its_incarnation_is_never_created_over(client: redis.Redis) -> None:
    """A hash with fields but no 'i' is CorruptData naming 'i' on read and write; nothing is written over it."""
    mem = Memory("inc", client=client)
    mem.a = [1, 2]
    client.hdel(mem.key, "i")
    before = stored(client, mem)
    fresh = Memory("inc", client=client)
    with pytest.raises(CorruptData) as info:
        fresh.b = ["new"]
    assert_corrupt(info, mem.key, b"i")
    for reader in (mem, Memory("inc", client=client)):
        with pytest.raises(CorruptData) as info:
            _ = reader.a
        assert_corrupt(info, mem.key, b"i")
    assert stored(client, mem) == before
    fresh.delete()
    fresh.b = ["new"]
    assert Memory("inc", client=client).to_dict() == {"b": ["new"]}


# -- 8. the writer index of another type ----------------------------------------


def test_a_writer_index_of_another_type_is_reported_under_its_own_name(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """A ':w' key holding a string is CorruptData naming that key to a writer that indexes itself (another
    process), and the write changed nothing."""
    mem = Memory("windex", client=client)
    mem.d = {"k": 1}
    client.set(mem.key + ":w", "not a sorted set")
    before = stored(client, mem)
    with pytest.raises(CorruptData) as info:
        Memory("windex", client=other_client).d["k"] = 2
    assert info.value.key == mem.key + ":w"
    assert stored(client, mem) == before


# -- 9. no partial writes ---------------------------------------------------------


def test_a_corrupt_node_counter_is_found_before_anything_is_written(client: redis.Redis) -> None:
    """An update creating a node on a memory whose node counter is not a number is CorruptData; nothing written."""
    mem = Memory("partial", client=client)
    mem.d = {"a": 1, "b": 2}
    client.hset(mem.key, "c", b"many")
    before = stored(client, mem)
    with pytest.raises(CorruptData) as info:
        Memory("partial", client=client).d.update({"a": 10, "b": [2]})
    assert_corrupt(info, mem.key, b"c")
    assert stored(client, mem) == before
    fresh = Memory("partial", client=client)
    fresh.d["a"] = 10  # creates no node: the counter is not needed
    del fresh.d["b"]
    assert Memory("partial", client=client).d == {"a": 10}


def test_an_entry_found_corrupt_mid_update_is_overwritten(client: redis.Redis) -> None:
    """update() through a held dict over an entry corrupted since (no '<n>:') sets every key."""
    mem = Memory("partial", client=client)
    mem.d = {"a": 1, "b": 2}
    held = mem.d
    client.hset(mem.key, b"e" + child(client, mem, "d") + b":" + msgpack.packb("b"), b"junk")
    held.update({"a": 10, "b": 20})
    assert Memory("partial", client=client).d == {"a": 10, "b": 20}


def test_a_missing_list_slot_found_mid_delete_writes_nothing(client: redis.Redis) -> None:
    """Deleting from a held list whose slots are damaged since is CorruptData naming the slot; nothing written."""
    mem = Memory("partial", client=client)
    mem.l = [0, 1, 2, 3, 4, 5, 6]
    held = mem.l
    target = b"e" + child(client, mem, "l") + b":5"
    client.hdel(mem.key, target)
    before = stored(client, mem)
    with pytest.raises(CorruptData) as info:
        del held[3]
    assert_corrupt(info, mem.key, target)
    assert stored(client, mem) == before


@pytest.mark.parametrize("action", ["replace", "delete"])
def test_a_held_dict_over_a_nested_node_found_corrupt_sets_and_deletes(client: redis.Redis, action: str) -> None:
    """d[k] = v and del d[k] on a held dict whose child's header was corrupted since both work."""
    mem = nested(client)
    held = mem.d
    inner = stored(client, mem)[b"e" + child(client, mem, "d") + b":" + msgpack.packb("inner")].partition(b":")[2][1:]
    client.hset(mem.key, b"h" + inner, b"d 9 3 0 x")
    force_reload(client, mem)
    if action == "replace":
        held["inner"] = "new"
        expected = {"inner": "new", "b": 2}
    else:
        del held["inner"]
        expected = {"b": 2}
    assert Memory("nested", client=client).d == expected
    assert mem.d == expected and held == expected
    assert not [f for f in stored(client, mem) if f.startswith((b"h" + inner, b"e" + inner + b":"))]


def test_deleting_refused_for_corrupt_data_says_so(client: redis.Redis) -> None:
    """del of an attribute refused because the root's header is corrupt raises CorruptData; nothing is deleted."""
    mem = Memory("refused", client=client)
    mem.x = 1
    client.hset(mem.key, "h0", b"junk")  # the version stays: mem's replica is not reloaded
    with pytest.raises(CorruptData) as info:
        del mem.x
    assert_corrupt(info, mem.key, b"h0")
    assert client.hexists(mem.key, entry("x"))


def test_a_corrupt_item_of_a_held_dict_is_deleted_quietly(client: redis.Redis) -> None:
    """del d[k] on a held dict whose item was corrupted since deletes it; pop() of it returns None (it is gone)."""
    mem = Memory("quiet", client=client)
    mem.d = {"a": 1, "b": 2, "c": 3}
    held = mem.d
    for key in ("a", "b"):
        client.hset(mem.key, b"e" + child(client, mem, "d") + b":" + msgpack.packb(key), b"1:\xc7\x01\x63\x00")
    del held["a"]
    assert held.pop("b") is None
    assert Memory("quiet", client=client).d == {"c": 3} == held


def test_a_plan_the_script_reads_from_the_hash_removes_a_node_with_a_corrupt_header(client: redis.Redis) -> None:
    """With the plan left to the script (count -1), replacing an attribute drops its corrupt-headed node whole."""
    from redis_memory import ops
    from redis_memory.store import Step, Store

    mem = nested(client)
    d = child(client, mem, "d")
    inner = stored(client, mem)[b"e" + d + b":" + msgpack.packb("inner")].partition(b":")[2][1:]
    client.hset(mem.key, b"h" + inner, b"garbage")
    store = Store(client, mem.key)
    op = ops.DictSet(b"0", [("d", 1)])
    incarnation = stored(client, mem)[b"i"]
    reply = store.apply([b"w", incarnation, b"0", b""], [Step(1, b"tok", op.name, op.nid, b"", [], None, op.args())])
    assert reply.status == "ok"
    nodes = {f[1:].partition(b":")[0] for f in stored(client, mem) if f[:1] in b"eh"}
    assert not nodes & {d, inner}
    assert Memory("nested", client=client).to_dict() == {"d": 1, "other": 5}


# -- counts past what a header may hold ----------------------------------------


@pytest.mark.parametrize("writer", ["the last writer (fast path)", "a new writer (general path)"])
@pytest.mark.parametrize("huge", [b"9007199254740993", b"99999999999999999999", b"-1000000000000000"])
def test_list_counts_past_15_digits_are_corrupt_data(client: redis.Redis, huge: bytes, writer: str) -> None:
    """Counts a double cannot hold exactly (2^53 and past) are refused, never used: nothing is written or lost."""
    mem = Memory("huge-counts", client=client)
    mem.messages = ["x", "y"]
    mem.messages.append("z")  # this writer is indexed now: its next append may take the fast path
    user = mem if writer.startswith("the last") else Memory("huge-counts", client=client, max_pending=7)
    held = user.messages  # held from before: its append reaches the server, which must refuse it
    field = b"h" + child(client, mem, "messages")
    kind, first, _last, changes, birth = stored(client, mem)[field].split(b" ")
    last = first if huge.startswith(b"-") else huge
    client.hset(mem.key, field, b" ".join([kind, huge, last, changes, birth]))
    before = stored(client, mem)
    with pytest.raises(CorruptData) as info:
        held.extend(["p", "q", "r", "s"])
    assert_corrupt(info, mem.key, field)
    assert stored(client, mem) == before  # nothing written
    with pytest.raises(CorruptData):
        _ = Memory("huge-counts", client=client, max_pending=9).messages
    user.messages = ["new"]  # replacing the attribute repairs it
    assert Memory("huge-counts", client=client, max_pending=11).messages == ["new"]


# -- what a corrupt value keeps ------------------------------------------------


@pytest.mark.parametrize("read", ["the attribute", "a list item", "the names", "the whole memory"])
def test_reading_corrupt_data_keeps_nothing_of_the_reader_alive(servers: Any, backend: str, read: str) -> None:
    """The error a corrupt value raises is made anew for each read: the kept memory holds no traceback,
    so neither the reading function's frame nor the client and memory objects it had."""
    setup = make_client(servers, backend)
    flush(servers, backend)
    mem = Memory("kept-corrupt", client=setup)
    mem.x, mem.log = 1, ["a", "b"]
    if read == "a list item":
        setup.hset(mem.key, b"e" + child(setup, mem, "log") + b":1", b"\xc1")
    elif read == "the names":
        setup.hset(mem.key, b"e0:\xc1", b"1:" + msgpack.packb(1))
    else:
        setup.hset(mem.key, entry("x"), b"1:\xc1")

    def reader() -> weakref.ref[Any]:
        client = make_client(servers, backend)
        reading = Memory("kept-corrupt", client=client)
        for _ in range(2):  # the second read raises what the first kept, if anything is kept
            with pytest.raises(CorruptData) as info:
                if read == "the attribute":
                    _ = reading.x
                elif read == "a list item":
                    _ = reading.log
                elif read == "the names":
                    dir(reading)
                else:
                    reading.to_dict()
            assert info.value.key == reading.key
        del info
        return weakref.ref(client)

    gone = reader()
    gc.collect()
    assert gone() is None
