"""Values a memory can be trusted with: nesting depth, canonical dict keys, tuples."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from typing import Any

import msgpack
import pytest
import redis
from conftest import Switch
from hypothesis import HealthCheck, given, settings
from strategies import near_depth_limit, same

from redis_memory import ConversationMemory, CorruptData, Memory, UnsupportedValue, codec
from redis_memory.store import version_number

REF = b"\xc1"

PERMISSIONS = frozenset({"read", "write", "admin", "audit", "billing", "export"})
# Run in a child process with its own hash seed, so its frozensets iterate in another order.
SET_PERMISSION = """
import sys
from redis_memory import Memory
mem = Memory("acl", url=sys.argv[1])
mem.perms[frozenset({"read", "write", "admin", "audit", "billing", "export"})] = sys.argv[2]
print(list(frozenset({"read", "write", "admin", "audit", "billing", "export"})))
"""


@pytest.mark.parametrize(
    "value",
    [(1, [2]), (1, {"a": 1}), (1, {2}), ((1, (2, [3])),), [(1, [2])], {"k": (1, {2: 3})}],
    ids=["list", "dict", "set", "deep-list", "in-a-list", "in-a-dict"],
)
def test_a_tuple_holding_a_list_dict_or_set_is_refused_and_nothing_written(client: redis.Redis, value: Any) -> None:
    """A tuple holding a list, dict or set at any depth raises UnsupportedValue; nothing is stored."""
    mem = Memory("m", client=client)
    mem.t = (1, 2)
    before = client.hgetall(mem.key)
    with pytest.raises(UnsupportedValue):
        mem.t = value
    with pytest.raises(UnsupportedValue):
        mem.other = value
    assert client.hgetall(mem.key) == before
    assert mem.t == (1, 2) and Memory("m", client=client).to_dict() == {"t": (1, 2)}


def test_a_message_holding_such_a_tuple_is_refused(client: redis.Redis) -> None:
    """A list item's dict (stored whole) whose tuple holds a list is refused too; the list is unchanged."""
    chat = ConversationMemory("c", client=client)
    chat.messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(UnsupportedValue):
        chat.messages.append({"role": "tool", "args": (1, [2])})
    with pytest.raises(UnsupportedValue):
        chat.messages[0]["args"] = ("x", {"y": 1})
    assert ConversationMemory("c", client=client).messages == [{"role": "user", "content": "hi"}]
    chat.messages.append({"role": "tool", "args": (1, (2, "three"))})
    assert ConversationMemory("c", client=client).messages[-1]["args"] == (1, (2, "three"))


def test_equal_frozenset_keys_from_processes_with_other_hash_seeds_are_one_entry(real_url: str) -> None:
    """Processes whose frozensets iterate in different orders store one entry, which del and clear remove."""
    Memory("acl", url=real_url).perms = {}
    orders = set()
    for seed in (1, 2, 3):
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        done = subprocess.run(
            [sys.executable, "-c", SET_PERMISSION, real_url, f"seed {seed}"],
            env=env, capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        orders.add(done.stdout)
    assert len(orders) > 1  # the seeds did give different iteration orders
    reader = Memory("acl", url=real_url)
    assert reader.perms == {PERMISSIONS: "seed 3"} and len(reader.perms) == 1
    del reader.perms[PERMISSIONS]
    assert Memory("acl", url=real_url).perms == {}
    reader.perms[PERMISSIONS] = "again"
    reader.perms.clear()
    assert Memory("acl", url=real_url).perms == {}


def test_storing_an_equal_frozenset_again_writes_nothing(client: redis.Redis) -> None:
    """Assigning a frozenset equal to the stored one, built in another order, changes nothing on the server."""
    first, second = frozenset([8, 16, "a"]), frozenset([16, 8, "a"])
    assert list(first) != list(second)
    mem = Memory("m", client=client)
    mem.f = first
    version = client.hget(mem.key, "v")
    mem.f = second
    assert client.hget(mem.key, "v") == version
    assert Memory("m", client=client).f == first


@pytest.mark.parametrize(
    "key",
    [(1.0,), (True,), ("a", (2, 1.5)), frozenset({1.5}), frozenset({False}), dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
     (dt.datetime(2024, 1, 1, tzinfo=dt.UTC),)],
    ids=["float-in-tuple", "bool-in-tuple", "nested-float", "float-in-frozenset", "bool-in-frozenset", "aware",
         "aware-in-tuple"],
)  # fmt: skip
def test_keys_that_equal_other_keys_in_another_encoding_are_refused(client: redis.Redis, key: Any) -> None:
    """A key holding a float or bool ((1.0,) == (1,)), or an aware datetime, raises UnsupportedValue; nothing stored."""
    mem = Memory("m", client=client)
    mem.d = {(1,): "one"}
    with pytest.raises(UnsupportedValue):
        mem.d[key] = 1
    with pytest.raises(UnsupportedValue):
        mem.other = {key: 1}
    with pytest.raises(UnsupportedValue):
        mem.messages = [{key: 1}]  # a list item's dict, stored whole
    assert Memory("m", client=client).to_dict() == {"d": {(1,): "one"}}


def test_naive_datetimes_equal_but_for_fold_are_one_key(client: redis.Redis) -> None:
    """A naive datetime key with fold=1 is the same key as with fold=0, as in Python: one del removes it."""
    mem = Memory("m", client=client)
    when = dt.datetime(2024, 11, 3, 1, 30)
    mem.d = {when: 1, (when, "x"): 1}
    mem.d[when.replace(fold=1)] = 2
    mem.d[(when.replace(fold=1), "x")] = 2
    assert Memory("m", client=client).d == {when: 2, (when, "x"): 2}
    del mem.d[when]
    del mem.d[(when, "x")]
    assert Memory("m", client=client).d == {}


def nested(kind: str, depth: int) -> Any:
    """A value ``depth`` containers deep around "x"; "mixed" puts lists and dicts around tuples and frozensets."""
    value: Any = "x"
    for level in range(depth):
        shape = kind if kind != "mixed" else ["tuple", "frozenset", "list", "dict"][level * 2 // depth * 2 + level % 2]
        value = {"list": lambda v: [v], "dict": lambda v: {"k": v}, "tuple": lambda v: (v,),
                 "frozenset": lambda v: frozenset({v})}[shape](value)  # fmt: skip
    return value


@pytest.mark.parametrize("kind", ["list", "dict", "tuple", "frozenset", "mixed"])
def test_values_nested_past_the_limit_are_refused_and_the_memory_stays_usable(client: redis.Redis, kind: str) -> None:
    """MAX_DEPTH containers deep is stored; one more (or 600) raises UnsupportedValue, writing nothing."""
    mem = Memory("m", client=client)
    mem.ok = "fine"
    before = client.hgetall(mem.key)
    for depth in (codec.MAX_DEPTH + 1, 600):
        with pytest.raises(UnsupportedValue):
            mem.deep = nested(kind, depth)
        with pytest.raises(UnsupportedValue):
            mem.wrapped = [{"role": "user", "content": nested(kind, depth)}]
    assert client.hgetall(mem.key) == before
    mem.deep = nested(kind, codec.MAX_DEPTH)
    fresh = Memory("m", client=client)
    assert fresh.ok == "fine" and fresh.deep == nested(kind, codec.MAX_DEPTH)
    del fresh.deep
    assert Memory("m", client=client).to_dict() == {"ok": "fine"}


def test_a_value_cannot_grow_past_the_limit_through_a_nested_proxy(client: redis.Redis) -> None:
    """Adding to a container at depth d a value nesting past MAX_DEPTH - d is refused, writing nothing."""
    mem = Memory("m", client=client)
    mem.deep = nested("list", codec.MAX_DEPTH - 1)

    def innermost(value: Any) -> Any:
        for _ in range(codec.MAX_DEPTH - 2):
            value = value[0]
        return value

    inner = innermost(mem.deep)  # at depth MAX_DEPTH - 1
    before = client.hgetall(mem.key)
    for change in (lambda: inner.append([[]]), lambda: inner.insert(0, {"k": ["x"]}),
                   lambda: inner.__setitem__(0, [("x",)]), lambda: inner.extend([1, ((1,),)]),
                   lambda: inner.__setitem__(slice(None), [[[1]]])):  # fmt: skip
        with pytest.raises(UnsupportedValue):
            change()
    assert client.hgetall(mem.key) == before
    inner.append((1,))
    inner.append([1])
    for refused in ([], (1,), {"k": 1}, frozenset({1})):
        with pytest.raises(UnsupportedValue):
            inner[-1].append(refused)
    inner[-1].append("y")
    assert innermost(Memory("m", client=client).deep) == ["x", (1,), [1, "y"]]


def test_values_too_deep_are_refused_offline_too_and_nothing_is_queued(switch: Switch, client: redis.Redis) -> None:
    """While Redis is unreachable, a value nesting past the limit is refused before it is queued."""
    mem = Memory("m", client=switch.client())
    mem.deep = nested("list", codec.MAX_DEPTH)
    switch.cut()
    try:
        with pytest.raises(UnsupportedValue):
            mem.other = nested("dict", codec.MAX_DEPTH + 1)
        inner = mem.deep
        for _ in range(codec.MAX_DEPTH - 1):
            inner = inner[0]
        with pytest.raises(UnsupportedValue):
            inner.append([])
        inner.append("queued")
        assert mem.status().pending == 1
    finally:
        switch.restore()
    assert mem.flush(timeout=10)
    assert Memory("m", client=client).to_dict().keys() == {"deep"}


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(near_depth_limit)
def test_values_near_the_limit_are_stored_or_refused_whole(client: redis.Redis, drawn: tuple[Any, int]) -> None:
    """A value at most MAX_DEPTH deep reads back the same in a fresh memory; a deeper one is refused unwritten."""
    value, depth = drawn
    client.flushall()
    mem = Memory("m", client=client)
    if depth > codec.MAX_DEPTH:
        with pytest.raises(UnsupportedValue):
            mem.value = value
        assert not client.exists(mem.key)
    else:
        mem.value = value
        assert same(Memory("m", client=client).value, value)


def entry_field(client: redis.Redis, mem: Memory, name: str) -> bytes:
    """The root's hash field holding attribute ``name``."""
    return next(f for f in client.hkeys(mem.key) if f == b"e0:" + codec.encode_key(name))


def plant(client: redis.Redis, mem: Memory, name: str, payload: bytes) -> bytes:
    """Store ``payload`` as attribute ``name``'s raw value (as corrupt data would), making replicas reload."""
    field = entry_field(client, mem, name)
    seq = client.hget(mem.key, field).partition(b":")[0]
    client.hset(mem.key, field, seq + b":" + payload)
    client.hset(mem.key, "v", b"999999 planted")  # a version no replica knows
    return field


def plant_chain(client: redis.Redis, mem: Memory, name: str, length: int) -> bytes:
    """Make attribute ``name`` a chain of ``length`` one-item lists, as no writer can."""
    nids = [b"%d" % (9000 + i) for i in range(length)]
    for nid, below in zip(nids, [*nids[1:], None], strict=True):
        client.hset(mem.key, mapping={b"h" + nid: b"l 0 1 0", b"e" + nid + b":0": REF + below if below else b"\x01"})
    return plant(client, mem, name, REF + nids[0])


def assert_only_this_attribute_is_corrupt(client: redis.Redis, mem: Memory, name: str, field: bytes) -> None:
    """Reading ``name`` raises CorruptData naming key and field; all else reads and writes; it can be replaced."""
    fresh = Memory("m", client=client)
    for reader in (fresh, mem):
        with pytest.raises(CorruptData) as raised:
            getattr(reader, name)
        assert raised.value.key == mem.key and raised.value.field == field
        assert reader.ok == "fine" and reader.messages == [{"role": "user", "content": "hi"}]
    fresh.messages.append("more")
    fresh.ok = "still fine"
    assert {"ok", "messages", name} <= set(dir(fresh))
    setattr(fresh, name, "repaired")
    assert Memory("m", client=client).to_dict() == {
        "ok": "still fine", "messages": [{"role": "user", "content": "hi"}, "more"], name: "repaired"
    }  # fmt: skip


def corruptible(client: redis.Redis) -> Memory:
    """A memory with good attributes and one, ``bad``, to damage; loaded before the damage."""
    mem = Memory("m", client=client)
    mem.ok = "fine"
    mem.messages = [{"role": "user", "content": "hi"}]
    mem.bad = [[1]]
    assert mem.to_dict()
    return mem


@pytest.mark.parametrize("length", [codec.MAX_DEPTH + 1, 600])
def test_a_stored_chain_deeper_than_the_limit_is_corrupt_data(client: redis.Redis, length: int) -> None:
    """Lists nested past MAX_DEPTH in storage raise CorruptData for that attribute only, which can be overwritten."""
    mem = corruptible(client)
    plant_chain(client, mem, "bad", length)
    assert_only_this_attribute_is_corrupt(client, mem, "bad", b"e9%03d:0" % (codec.MAX_DEPTH - 1))


def test_a_stored_chain_deeper_than_the_limit_can_be_deleted(client: redis.Redis) -> None:
    """del of an attribute stored too deep removes it (and its nodes)."""
    mem = corruptible(client)
    plant_chain(client, mem, "bad", 600)
    fresh = Memory("m", client=client)
    del fresh.bad
    assert Memory("m", client=client).to_dict() == {"ok": "fine", "messages": [{"role": "user", "content": "hi"}]}
    assert not any(f.startswith(b"h9") for f in client.hkeys(mem.key))


def plant_dicts(client: redis.Redis, mem: Memory, name: str, length: int, last: bytes) -> bytes:
    """Make attribute ``name`` a chain of ``length`` one-key dicts whose last value is the raw ``last``."""
    key = codec.encode_key("k")
    nids = [b"%d" % (9000 + i) for i in range(length)]
    for nid, below in zip(nids, [*nids[1:], None], strict=True):
        value = REF + below if below else last
        client.hset(mem.key, mapping={b"h" + nid: b"d 1 2 0", b"e" + nid + b":" + key: b"1:" + value})
    return plant(client, mem, name, REF + nids[0])


@pytest.mark.parametrize(
    ("length", "last"),
    [(codec.MAX_DEPTH + 1, b"\x01"), (3, b"\xc7\x01\x63\x00"), (3, REF + b"404")],
    ids=["too-deep", "undecodable", "dangling"],
)
@pytest.mark.parametrize("change", ["overwrite", "delete"])
def test_a_corrupt_attribute_holding_dicts_can_be_overwritten_or_deleted(
    client: redis.Redis, length: int, last: bytes, change: str
) -> None:
    """Dicts under a corrupt attribute are listed from the server's data, so replacing or deleting it removes them."""
    mem = corruptible(client)
    plant_dicts(client, mem, "bad", length, last)
    fresh = Memory("m", client=client)
    with pytest.raises(CorruptData):
        _ = fresh.bad
    if change == "overwrite":
        fresh.bad = "repaired"
    else:
        del fresh.bad
    expected: dict[str, Any] = {"ok": "fine", "messages": [{"role": "user", "content": "hi"}]}
    if change == "overwrite":
        expected["bad"] = "repaired"
    assert Memory("m", client=client).to_dict() == expected
    assert not any(f.startswith((b"h9", b"e9")) for f in client.hkeys(mem.key))


@pytest.mark.parametrize("target", ["itself", "its parent"])
def test_a_stored_self_reference_is_corrupt_data(client: redis.Redis, target: str) -> None:
    """A list whose entry references itself or its parent raises CorruptData for that attribute only."""
    mem = corruptible(client)
    outer = client.hget(mem.key, entry_field(client, mem, "bad")).partition(b":")[2][1:]
    inner = client.hget(mem.key, b"e" + outer + b":0")[1:]
    field = b"e" + inner + b":0"
    client.hset(mem.key, field, REF + (inner if target == "itself" else outer))
    client.hset(mem.key, "v", b"999999 planted")  # a version no replica knows
    fresh = Memory("m", client=client)
    for reader in (fresh, mem):
        with pytest.raises(CorruptData) as raised:
            _ = reader.bad
        assert raised.value.key == mem.key
        assert reader.ok == "fine" and reader.messages == [{"role": "user", "content": "hi"}]
    fresh.ok = "still fine"
    assert Memory("m", client=client).ok == "still fine"


@pytest.mark.parametrize("change", ["overwrite", "delete"])
def test_a_stored_self_reference_can_be_overwritten_or_deleted(client: redis.Redis, change: str) -> None:
    """An attribute whose stored list references its parent can be replaced or deleted, like any corrupt value."""
    mem = corruptible(client)
    outer = client.hget(mem.key, entry_field(client, mem, "bad")).partition(b":")[2][1:]
    inner = client.hget(mem.key, b"e" + outer + b":0")[1:]
    client.hset(mem.key, b"e" + inner + b":0", REF + outer)
    client.hset(mem.key, "v", b"999999 planted")  # a version no replica knows
    fresh = Memory("m", client=client)
    if change == "overwrite":
        fresh.bad = "repaired"
    else:
        del fresh.bad
    assert Memory("m", client=client).to_dict().get("bad", "repaired") == "repaired"


def test_a_self_reference_arriving_as_a_change_is_corrupt_data(client: redis.Redis) -> None:
    """A replica catching up by the journal on a self-reference raises CorruptData, never loops or recurses."""
    mem = corruptible(client)
    outer = client.hget(mem.key, entry_field(client, mem, "bad")).partition(b":")[2][1:]
    inner = client.hget(mem.key, b"e" + outer + b":0")[1:]
    field = b"e" + inner + b":0"
    version = version_number(client.hget(mem.key, "v")) + 1
    stamp = b"%d planted" % version
    journal = b"%s %d:%s" % (stamp, len(field), field)
    client.hset(mem.key, mapping={field: REF + outer, b"j%d" % (version % 128): journal, "v": stamp})
    with pytest.raises(CorruptData):
        _ = mem.bad
    assert mem.ok == "fine" and mem.messages == [{"role": "user", "content": "hi"}]
    with pytest.raises(CorruptData):
        mem.to_dict()


def deep_ext(depth: int) -> bytes:
    """msgpack of tuples nested ``depth`` deep, as the codec encodes tuples."""
    data = msgpack.packb("x")
    for _ in range(depth):
        data = msgpack.packb(msgpack.ExtType(codec.EXT_TUPLE, b"\x91" + data))
    return bytes(data)


@pytest.mark.parametrize(
    "payload",
    [b"\x91" * 500 + b"\xc0", b"\x91" * 5000 + b"\xc0", deep_ext(codec.MAX_DEPTH + 1), deep_ext(5000)],
    ids=["arrays-500", "arrays-5000", "tuples-past-limit", "tuples-5000"],
)
def test_deeply_nested_msgpack_in_a_scalar_is_corrupt_data(client: redis.Redis, payload: bytes) -> None:
    """A stored scalar of deeply nested msgpack raises CorruptData for that attribute only (never a crash)."""
    mem = corruptible(client)
    field = plant(client, mem, "bad", payload)
    assert_only_this_attribute_is_corrupt(client, mem, "bad", field)


def test_a_message_stored_whole_holding_nested_arrays_is_corrupt_data(client: redis.Redis) -> None:
    """A list item's dict stored whole whose value is a nested msgpack array is CorruptData, not an unobserved list."""
    mem = corruptible(client)
    mem.bad = [{"role": "user"}]
    node = client.hget(mem.key, entry_field(client, mem, "bad")).partition(b":")[2][1:]
    field = b"e" + node + b":0"
    nid = client.hget(mem.key, field)[1:].partition(b"=")[0]
    client.hset(mem.key, field, REF + nid + b"=\x81\xa4role" + b"\x91" * 300 + b"\xc0")
    client.hset(mem.key, "v", b"999999 planted")  # a version no replica knows
    assert_only_this_attribute_is_corrupt(client, mem, "bad", field)
