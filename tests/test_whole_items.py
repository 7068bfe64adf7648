"""A list item's dict of scalars (a chat message) is stored whole, in its list slot.

It costs one field to add, read and drop, and it is still a container with
a stable identity: its first change gives it fields of its own, wherever
others have moved it meanwhile.
"""

from __future__ import annotations

import msgpack
import pytest
import redis
from conftest import Switch

from redis_memory import ContainerDeleted, ConversationMemory, CorruptData, Memory, ObservedSet, OfflineQueueFull, ops


def message(i: int) -> dict[str, object]:
    return {"role": "user" if i % 2 else "assistant", "content": f"message {i}"}


def test_a_message_takes_one_field(client: redis.Redis) -> None:
    """1,000 messages are about 1,000 fields, and read back equal, in order, with their types."""
    mem = ConversationMemory("c", client=client)
    mem.messages = [message(i) for i in range(500)]
    mem.messages.extend(message(i) for i in range(500, 1000))
    assert client.hlen(mem.key) < 1000 + 20
    assert ConversationMemory("c", client=client).messages == [message(i) for i in range(1000)]
    odd = {"n": 2**70, "t": (1, "a"), "s": {1}, "b": b"\x00", "f": 1.5, "none": None, 3: "int key"}
    mem.messages.append(odd)
    got = ConversationMemory("c", client=client).messages[-1]
    assert got == odd and list(got) == list(odd) and type(got["t"]) is tuple and isinstance(got["s"], ObservedSet)


def test_dicts_holding_containers_or_many_keys_and_attribute_dicts_are_nodes(client: redis.Redis) -> None:
    """Only small dicts of scalars inside lists are stored whole; the rest keep one field per key."""
    mem = Memory("m", client=client)
    mem.profile = {"a": 1}
    mem.rows = [{"tool_calls": [{"id": 1}]}, {f"k{i}": i for i in range(ops.WHOLE_MAX_KEYS + 1)}, {"a": 1}]
    stored = client.hgetall(mem.key)
    whole = sorted(v.partition(b"=")[2] for v in stored.values() if v[:1] == b"\xc1" and b"=" in v)
    assert whole == sorted([msgpack.packb({"id": 1}), msgpack.packb({"a": 1})])
    assert Memory("m", client=client).to_dict() == mem.to_dict()


def test_first_change_of_a_message_is_saved_and_identity_kept(client: redis.Redis, other_client: redis.Redis) -> None:
    """Changing a stored-whole message works like any dict: seen elsewhere, same proxy, later changes O(1)."""
    mem = ConversationMemory("c", client=client)
    mem.messages = [message(0), message(1)]
    held = mem.messages[1]
    other = ConversationMemory("c", client=other_client)
    other_held = other.messages[1]
    held["content"] = "edited"
    held["tokens"] = 7
    del held["role"]
    assert mem.messages[1] is held and held == {"content": "edited", "tokens": 7}
    assert other.messages[1] is other_held and other_held == {"content": "edited", "tokens": 7}
    other_held.update(role="tool")  # the other replica learnt the message has fields of its own
    edited = {"content": "edited", "tokens": 7, "role": "tool"}
    assert ConversationMemory("c", client=client).messages == [message(0), edited]


def test_concurrent_first_changes_both_survive(client: redis.Redis, other_client: redis.Redis) -> None:
    """Two writers each make the first change to the same message from stale views: nothing is lost."""
    mem = ConversationMemory("c", client=client)
    mem.messages = [message(0)]
    other = ConversationMemory("c", client=other_client)
    mine, theirs = mem.messages[0], other.messages[0]
    mine["a"] = 1
    theirs["b"] = 2  # its replica still holds the message whole
    assert ConversationMemory("c", client=client).messages == [{**message(0), "a": 1, "b": 2}]
    assert mem.messages[0] is mine and mine == theirs == {**message(0), "a": 1, "b": 2}


def test_a_message_moved_by_others_is_changed_where_it_now_is(client: redis.Redis, other_client: redis.Redis) -> None:
    """Inserts in the middle shift slots; a held message still gets its change, not its neighbour."""
    mem = ConversationMemory("c", client=client)
    mem.messages = [message(i) for i in range(10)]
    held = mem.messages[6]
    other = ConversationMemory("c", client=other_client)
    other.messages.insert(7, "x")
    other.messages.insert(3, "y")
    other.messages.pop(1)
    other.messages.reverse()
    held["content"] = "edited"
    expected = [message(i) for i in range(10)]
    expected.insert(7, "x")
    expected.insert(3, "y")
    expected.pop(1)
    expected.reverse()
    expected[expected.index(message(6))] = {"role": "assistant", "content": "edited"}
    assert ConversationMemory("c", client=client).messages == expected
    assert held in mem.messages and sum(v is held for v in mem.messages) == 1


def test_a_message_deleted_elsewhere_refuses_changes(client: redis.Redis, other_client: redis.Redis) -> None:
    """A held message deleted (or trimmed) by another process raises ContainerDeleted and writes nothing."""
    mem = ConversationMemory("c", client=client, max_messages=3)
    mem.messages = [message(i) for i in range(3)]
    deleted, trimmed = mem.messages[1], mem.messages[0]
    other = ConversationMemory("c", client=other_client, max_messages=3)
    del other.messages[1]
    other.messages.extend([message(3), message(4)])  # trims message 0
    before = client.hgetall(mem.key)
    for held in (deleted, trimmed):
        with pytest.raises(ContainerDeleted):
            held["content"] = "edited"
    assert client.hgetall(mem.key) == before
    assert mem.messages == [message(2), message(3), message(4)]


def test_a_reader_forgets_trimmed_messages(client: redis.Redis, other_client: redis.Redis) -> None:
    """A replica following a bounded history does not keep the messages trimmed away."""
    mem = ConversationMemory("c", client=client, max_messages=5)
    mem.messages = []
    reader = ConversationMemory("c", client=other_client)
    for i in range(200):
        mem.messages.append(message(i))
        assert len(reader.messages) == min(i + 1, 5)
    assert reader.messages == [message(i) for i in range(195, 200)]
    assert len(reader._rm.replica.nodes) <= 1 + 1 + 5  # root, the list, its messages


def test_reordering_keeps_messages_stored_whole_and_held(client: redis.Redis, other_client: redis.Redis) -> None:
    """sort, reverse and slices keep the message proxies, which can still be changed after."""
    mem = ConversationMemory("c", client=client)
    mem.messages = [message(i) for i in range(4)]
    held = mem.messages[0]

    def elements() -> int:
        return sum(f[:1] in (b"e", b"h") for f in client.hkeys(mem.key))

    size = elements()
    mem.messages.sort(key=lambda m: m["content"], reverse=True)
    mem.messages[1:3] = mem.messages[2:0:-1]
    assert elements() == size and mem.messages[-1] is held
    held["content"] = "edited"
    assert ConversationMemory("c", client=other_client).messages[-1] == {"role": "assistant", "content": "edited"}


def test_offline_changes_to_messages_replay(switch: Switch, client: redis.Redis) -> None:
    """Offline: a change to a stored message, and to one appended offline, reach Redis on reconnect."""
    mem = ConversationMemory("c", client=switch.client())
    mem.messages = [message(0)]
    other = ConversationMemory("c", client=client)
    switch.cut()
    mem.messages[0]["content"] = "edited offline"
    mem.messages.append(message(1))
    mem.messages[-1]["extra"] = True
    other.messages.insert(0, "from another writer")
    switch.restore()
    assert mem.flush(timeout=10)
    edited = {"role": "assistant", "content": "edited offline"}
    expected = ["from another writer", edited, {**message(1), "extra": True}]
    assert other.messages == expected and mem.messages == expected
    assert mem.status().dropped == 0


def test_an_undecodable_stored_message_is_corrupt_data(client: redis.Redis, other_client: redis.Redis) -> None:
    """A damaged message raises CorruptData naming its field in a process that loads it; other attributes
    stay readable."""
    mem = ConversationMemory("c", client=client)
    mem.messages = [message(0)]
    mem.title = "t"
    field = next(f for f, v in client.hgetall(mem.key).items() if b"=" in v and v[:1] == b"\xc1")
    nid = client.hget(mem.key, field).partition(b"=")[0]
    client.hset(mem.key, field, nid + b"=\xc1")
    fresh = ConversationMemory("c", client=other_client)
    with pytest.raises(CorruptData) as caught:
        _ = fresh.messages
    assert caught.value.field == field
    assert fresh.title == "t"


def test_an_offline_bounded_append_survives_an_edit_of_the_oldest_message(switch: Switch, client: redis.Redis) -> None:
    """The replay plans the trim from the server's data when others changed the message it drops."""
    mem = ConversationMemory("c", client=switch.client(), max_messages=3)
    mem.messages = [message(i) for i in range(3)]
    ConversationMemory("c", client=client).messages[0]["content"] = "edited"  # gives it fields of its own
    switch.cut()
    mem.messages.append(message(3))  # queued; will drop the oldest
    switch.restore()
    assert mem.flush(timeout=10)
    assert mem.status().dropped == 0
    assert ConversationMemory("c", client=client).messages == [message(1), message(2), message(3)]


def test_an_offline_edit_of_a_message_is_refused_whole_when_the_queue_is_nearly_full(
    switch: Switch, client: redis.Redis
) -> None:
    """A message's first change queues two operations: with room for one, nothing is queued or changed."""
    mem = ConversationMemory("c", client=switch.client(), max_pending=2)
    mem.messages = [message(0), message(1)]
    switch.cut()
    mem.title = "t"
    with pytest.raises(OfflineQueueFull):
        mem.messages[0]["content"] = "edited"
    assert mem.status().pending == 1 and mem.messages[0] == message(0)
    switch.restore()
    assert mem.flush(timeout=10)
    mem.messages[0]["content"] = "edited"
    assert ConversationMemory("c", client=client).messages == [{"role": "assistant", "content": "edited"}, message(1)]
