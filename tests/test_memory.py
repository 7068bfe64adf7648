"""The attribute contract of Memory and ConversationMemory (SPEC section 2)."""

from __future__ import annotations

import datetime as dt
import os
import threading
from typing import Any

import pytest
import redis
from strategies import same

from redis_memory import (
    ConnectionFailed,
    ContainerDeleted,
    ConversationMemory,
    CorruptData,
    Memory,
    MissingAttribute,
    MissingKey,
    RedisMemoryError,
    ReservedName,
    ServerRefused,
    UnsupportedValue,
)


def test_set_get_delete_hasattr(client: redis.Redis) -> None:
    """Attributes store, read back, delete; hasattr is False for a name never set."""
    mem = Memory("m", client=client)
    assert not hasattr(mem, "title")
    mem.title = "hello"
    assert mem.title == "hello"
    assert hasattr(mem, "title")
    del mem.title
    assert not hasattr(mem, "title")
    with pytest.raises(AttributeError):
        del mem.title


def test_another_memory_sees_writes_at_once(client: redis.Redis, other_client: redis.Redis) -> None:
    """A write is in Redis when the statement returns: another connection reads it."""
    writer = ConversationMemory("c1", client=client)
    reader = ConversationMemory("c1", client=other_client)
    writer.messages = []
    assert reader.messages == []
    writer.messages.append({"role": "user", "content": "hi"})
    assert reader.messages == [{"role": "user", "content": "hi"}]
    writer.user_profile = {"name": "Alice", "preferences": {"tone": "casual"}}
    writer.user_profile["preferences"]["tone"] = "formal"
    assert reader.user_profile == {"name": "Alice", "preferences": {"tone": "formal"}}
    del writer.user_profile
    assert not hasattr(reader, "user_profile")


def test_item_access_reaches_any_name(client: redis.Redis) -> None:
    """mem["x"] is mem.x, and reaches names with dots, spaces or a method's name."""
    mem = Memory("m", client=client)
    mem["x"] = 1
    assert mem.x == 1
    for name in ["a.b", "with space", "flush", "to_dict", "delete", "ü", ""]:
        mem[name] = name
        assert mem[name] == name
    assert mem.to_dict()["flush"] == "flush"
    del mem["a.b"]
    assert "a.b" not in mem
    with pytest.raises(KeyError):
        mem["a.b"]
    with pytest.raises(MissingKey):
        del mem["a.b"]
    with pytest.raises(TypeError):
        mem[1] = 2  # type: ignore[index]


def test_method_names_are_refused_as_attributes(client: redis.Redis) -> None:
    """Assigning an attribute that is a method raises ReservedName and writes nothing."""
    mem = ConversationMemory("m", client=client)
    for name in ["flush", "to_dict", "delete", "conversation_id", "key"]:
        with pytest.raises(ReservedName):
            setattr(mem, name, 1)
    assert mem.to_dict() == {}
    assert isinstance(ReservedName("x"), ValueError)


def test_underscore_names_are_never_stored(client: redis.Redis) -> None:
    """Names starting with _ belong to the object."""
    mem = Memory("m", client=client)
    mem._scratch = 5
    assert mem._scratch == 5
    assert mem.to_dict() == {}
    assert Memory("m", client=client).to_dict() == {}
    with pytest.raises(AttributeError):
        _ = mem._never


def test_dir_lists_stored_names(client: redis.Redis) -> None:
    """dir(mem) includes every stored name, as well as the methods."""
    mem = Memory("m", client=client)
    mem.alpha = 1
    mem["with space"] = 2
    names = dir(Memory("m", client=client))
    assert {"alpha", "with space", "to_dict", "flush"} <= set(names)


def test_to_dict_is_a_plain_snapshot(client: redis.Redis) -> None:
    """to_dict() returns plain lists and dicts, detached from the memory."""
    mem = Memory("m", client=client)
    mem.a = {"b": [1, {"c": 2}]}
    snap = mem.to_dict()
    assert type(snap["a"]) is dict and type(snap["a"]["b"]) is list and type(snap["a"]["b"][1]) is dict
    snap["a"]["b"].append(3)
    assert mem.a == {"b": [1, {"c": 2}]}


def test_delete_removes_the_whole_memory(client: redis.Redis, other_client: redis.Redis) -> None:
    """delete() removes the hash; other processes then read an empty memory."""
    mem = Memory("m", client=client)
    other = Memory("m", client=other_client)
    mem.a = [1, 2]
    assert other.a == [1, 2]
    mem.delete()
    assert client.exists(mem.key) == 0
    assert not hasattr(other, "a")
    assert other.to_dict() == {}
    mem.b = 1
    assert other.b == 1


ALL_TYPES: dict[str, Any] = {
    "none": None,
    "bool": True,
    "int": -(2**63),
    "big": 2**200,
    "negbig": -(2**100),
    "float": 1.5,
    "str": "héllo",
    "bytes": b"\x00\xff",
    "list": [1, [2]],
    "dict": {"k": {1: "int key"}, (1, 2): "tuple key", None: "none key", b"b": "bytes key"},
    "tuple": (1, "a", (2.5, None)),
    "set": {1, 2, 3},
    "frozenset": frozenset({"a"}),
    "date": dt.date(2024, 2, 29),
    "naive": dt.datetime(2024, 1, 2, 3, 4, 5, 6),
    "aware": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
}


def test_values_round_trip_with_their_types(client: redis.Redis) -> None:
    """Every supported type reads back, in another Memory, with its type."""
    mem = Memory("m", client=client)
    for name, value in ALL_TYPES.items():
        setattr(mem, name, value)
    fresh = Memory("m", client=client)
    for name, value in ALL_TYPES.items():
        assert same(getattr(fresh, name), value), name
    assert fresh.aware.utcoffset() == dt.timedelta(hours=-5)


@pytest.mark.parametrize("bad", [object(), dt.timedelta(1), [1, object()], {"k": {"n": 1j}}, (1, object())])
def test_unsupported_value_raises_type_error_and_writes_nothing(client: redis.Redis, bad: Any) -> None:
    """An unsupported value, even deep inside, raises TypeError with nothing written or changed."""
    mem = Memory("m", client=client)
    mem.keep = {"items": [1]}
    before = client.hgetall(mem.key)
    with pytest.raises(TypeError):
        mem.new = bad
    with pytest.raises(TypeError):
        mem.keep["items"].append(bad)
    with pytest.raises(UnsupportedValue):
        mem.keep["x"] = bad
    assert client.hgetall(mem.key) == before
    assert mem.to_dict() == {"keep": {"items": [1]}}


@pytest.mark.parametrize("key", [1.5, True, [1], object()])
def test_unsupported_dict_key_raises_type_error(client: redis.Redis, key: Any) -> None:
    """Dict keys that cannot be stored unambiguously raise TypeError, writing nothing."""
    mem = Memory("m", client=client)
    mem.d = {}
    with pytest.raises(TypeError):
        mem.d[key] = 1
    with pytest.raises(TypeError):
        mem.other = {key: 1}
    assert mem.to_dict() == {"d": {}}


def test_self_containing_value_is_refused(client: redis.Redis) -> None:
    """A list that contains itself cannot be stored."""
    loop: list[Any] = [1]
    loop.append(loop)
    mem = Memory("m", client=client)
    with pytest.raises(TypeError):
        mem.loop = loop


@pytest.mark.parametrize("ids", [["a:b", "a", "b", "a%3Ab"], ["*", "?", "[a]"], ["{x}", "x", "{x", "x}"],
                                 ["ü", "u", "%C3%BC"], ["with space", "with_space", "with%20space"]])  # fmt: skip
def test_ids_never_collide(client: redis.Redis, ids: list[str]) -> None:
    """Memories with tricky ids keep separate keys, each with one hash tag."""
    mems = [Memory(i, client=client) for i in ids]
    for i, mem in enumerate(mems):
        mem.value = i
    assert len({mem.key for mem in mems}) == len(ids)
    for i, id_ in enumerate(ids):
        assert Memory(id_, client=client).value == i
        key = Memory(id_, client=client).key
        assert key.count("{") == 1 and key.count("}") == 1 and key.endswith("}")
    conv = ConversationMemory(ids[0], client=client)
    assert conv.key != mems[0].key and not hasattr(conv, "value")


def test_corrupt_field_gives_clear_error_and_others_still_read(client: redis.Redis) -> None:
    """Undecodable stored data raises CorruptData naming key and field; other fields read."""
    mem = Memory("m", client=client)
    mem.good = {"x": 1}
    mem.bad = [1, 2]
    mem.alsobad = "text"
    layout = client.hgetall(mem.key)
    bad_list_item = next(f for f, v in layout.items() if f.startswith(b"e") and v == b"\x02")
    client.hset(mem.key, bad_list_item, b"\xc7\x01\x63\x00")  # an unknown extension type
    attr_field = next(f for f in layout if f.startswith(b"e0:") and f.endswith(b"alsobad"))
    client.hset(mem.key, attr_field, b"99:\xd9")  # a truncated string
    client.hset(mem.key, "v", b"999 forced")  # make every replica reload
    fresh = Memory("m", client=client)
    assert fresh.good == {"x": 1}
    for name, field in [("bad", bad_list_item), ("alsobad", attr_field)]:
        with pytest.raises(CorruptData) as info:
            getattr(fresh, name)
        assert info.value.key == mem.key and info.value.field == field
        assert not isinstance(info.value, AttributeError)
        assert mem.key in str(info.value)
    assert hasattr(fresh, "good")
    with pytest.raises(CorruptData):
        hasattr(fresh, "bad")
    fresh.bad = "repaired"
    assert Memory("m", client=client).bad == "repaired"


def test_connection_trouble_is_never_attribute_error() -> None:
    """With no server, reads raise ConnectionFailed (a ConnectionError), so hasattr cannot hide it."""
    from servers import free_port

    mem = Memory("m", client=redis.Redis(port=free_port(), socket_connect_timeout=0.5))
    with pytest.raises(ConnectionFailed) as info:
        hasattr(mem, "x")
    assert isinstance(info.value, ConnectionError) and isinstance(info.value, RedisMemoryError)
    assert not isinstance(info.value, AttributeError)
    with pytest.raises(ConnectionFailed):
        mem.x = 1
    assert MissingAttribute.__mro__[1:3] == (RedisMemoryError, AttributeError)


def test_stable_identity_survives_shifts_by_others(client: redis.Redis, other_client: redis.Redis) -> None:
    """A nested proxy writes to the dict it was read from, even after others shift positions."""
    mine = ConversationMemory("c", client=client)
    theirs = ConversationMemory("c", client=other_client)
    mine.messages = [{"n": 0}, {"n": 1}, {"n": 2}]
    held = mine.messages[1]
    theirs.messages.insert(0, {"n": -1})
    del theirs.messages[1]
    held["seen"] = True
    assert theirs.messages == [{"n": -1}, {"n": 1, "seen": True}, {"n": 2}]


def test_container_deleted_elsewhere_raises_and_writes_nothing(client: redis.Redis, other_client: redis.Redis) -> None:
    """Mutating a proxy whose container another process deleted raises ContainerDeleted."""
    mine = Memory("m", client=client)
    theirs = Memory("m", client=other_client)
    mine.profile = {"prefs": {"tone": "casual"}, "name": "A"}
    prefs = mine.profile["prefs"]
    del theirs.profile["prefs"]
    before = client.hgetall(mine.key)
    with pytest.raises(ContainerDeleted) as info:
        prefs["tone"] = "formal"
    assert isinstance(info.value, LookupError)
    assert client.hgetall(mine.key) == before
    assert mine.profile == {"name": "A"}
    with pytest.raises(ContainerDeleted):
        prefs.clear()
    theirs.delete()
    name_list = mine.to_dict()
    assert name_list == {}


def test_threads_share_one_memory_safely(client: redis.Redis) -> None:
    """Eight threads appending through one Memory lose nothing and duplicate nothing."""
    mem = Memory("m", client=client)
    mem.items = []

    def work(t: int) -> None:
        for i in range(40):
            mem.items.append((t, i))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    items = Memory("m", client=client).items
    assert sorted(items) == sorted((t, i) for t in range(8) for i in range(40))
    for t in range(8):
        assert [i for (w, i) in items if w == t] == list(range(40))


def test_flush_reports_that_everything_reached_redis(client: redis.Redis) -> None:
    """flush() returns True once writes are in Redis (they are sent before returning)."""
    mem = Memory("m", client=client)
    mem.a = 1
    assert mem.flush() is True
    assert mem.flush(timeout=0.5) is True


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_works_in_a_forked_child(real_url: str) -> None:
    """After fork the child writes with its own writer id, and the parent sees it."""
    mem = ConversationMemory("forked", url=real_url)
    mem.log = ["parent"]
    parent_writer = mem._rm.writer
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            assert mem._rm.writer != parent_writer
            mem.log.append("child")
            mem.child_done = True
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    mem.log.append("parent again")
    assert ConversationMemory("forked", url=real_url).log == ["parent", "child", "parent again"]
    assert mem.child_done is True


def test_a_write_that_changes_nothing_does_not_hide_another_writers_change(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """Rewriting an unchanged value right after another process wrote leaves the replica exact."""
    mine, theirs = Memory("same", client=client), Memory("same", client=other_client)
    mine.b = 2
    assert theirs.b == 2
    mine.a = 1  # one change theirs has not seen
    theirs.b = 2  # changes nothing on the server
    assert theirs.a == 1
    mine.l = [2, 1]
    held = theirs.l
    mine.x = 1
    held[0] = 2  # again a write that changes nothing
    held.sort()
    assert Memory("same", client=client).l == [1, 2]


def test_updating_a_dict_with_itself_stores_what_it_was(client: redis.Redis) -> None:
    """d.update(b=1, a=d) stores the old d under 'a', locally as on the server."""
    mem = Memory("self", client=client)
    mem.d = {"b": 0}
    d = mem.d
    d.update(b=1, a=d)
    assert mem.to_dict() == {"d": {"b": 1, "a": {"b": 0}}}
    assert Memory("self", client=client).to_dict() == mem.to_dict()


def test_huge_ints_and_bad_strings(client: redis.Redis) -> None:
    """Ints beyond str()'s digit limit round-trip; a lone surrogate raises UnsupportedValue."""
    mem = Memory("ints", client=client)
    mem.big = -(10**5000)
    assert Memory("ints", client=client).big == -(10**5000)
    with pytest.raises(UnsupportedValue):
        mem.s = "\ud800"
    mem.s = "fine"
    assert mem.s == "fine"


def test_a_failed_operation_does_not_create_the_memory(client: redis.Redis) -> None:
    """An operation the server refuses on a memory that does not exist leaves no key behind."""
    from redis_memory import ops
    from redis_memory.store import Step, Store

    store = Store(client, Memory("absent", client=client).key)
    op = ops.DictDelete(b"0", ["x"])
    reply = store.apply([b"w", b"", b"0", b""], [Step(1, b"tok", op.name, op.nid, b"", [], {}, op.args())])
    assert reply.status == "missing"
    assert client.exists(store.key) == 0


def test_deleting_a_corrupt_attribute_works(client: redis.Redis) -> None:
    """del on an attribute whose stored value is undecodable removes it without an error."""
    mem = Memory("corrupt-del", client=client)
    mem.bad = "x"
    field = next(f for f in client.hgetall(mem.key) if f.startswith(b"e0:"))
    client.hset(mem.key, field, b"1:\xc7\x01\x63\x00")
    client.hset(mem.key, "v", b"999 forced")
    fresh = Memory("corrupt-del", client=client)
    with pytest.raises(CorruptData):
        _ = fresh.bad
    del fresh.bad
    assert not hasattr(fresh, "bad")
    assert not client.hexists(mem.key, field)


def test_a_key_holding_another_type_is_a_clear_error_and_is_left_alone(client: redis.Redis) -> None:
    """A memory's key taken by a string (WRONGTYPE) raises CorruptData naming the key; nothing is overwritten."""
    mem = Memory("taken", client=client)
    client.set(mem.key, "someone else's")
    with pytest.raises(CorruptData) as raised:
        mem.title = "x"
    assert raised.value.key == mem.key and "another kind of Redis value" in str(raised.value)
    with pytest.raises(CorruptData):
        _ = Memory("taken", client=client).title
    assert client.get(mem.key) == b"someone else's"


@pytest.mark.parametrize("backend", ["redis7", "valkey"])
def test_a_server_out_of_memory_refuses_the_write_clearly(client: redis.Redis) -> None:
    """With maxmemory reached (noeviction), a write raises ServerRefused and the replica keeps the stored state."""
    mem = ConversationMemory("oom", client=client)
    mem.messages = ["kept"]
    client.config_set("maxmemory", 1)
    try:
        with pytest.raises(ServerRefused) as raised:
            mem.messages.append("refused")
        assert isinstance(raised.value, RuntimeError) and "OOM" in str(raised.value)
        assert mem.messages == ["kept"]
    finally:
        client.config_set("maxmemory", 0)
    mem.messages.append("after")
    assert ConversationMemory("oom", client=client).messages == ["kept", "after"]
