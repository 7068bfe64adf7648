"""Conversation features: expiry, bounded histories, metadata, listing and clean-up."""

from __future__ import annotations

import datetime as dt
import time

import pytest
import redis
from conftest import Switch, all_keys

from redis_memory import ConnectionFailed, ConversationMemory, Memory, health_check, message_tokens


def test_ttl_expires_every_key_of_the_memory(client: redis.Redis) -> None:
    """With ttl=, a write gives the hash and the writer index the expiry; ttl() reports what is left."""
    mem = Memory("ttl", client=client, ttl=30)
    assert mem.ttl() is None  # nothing stored yet
    mem.messages = [{"role": "user"}]
    for key in (mem.key, mem.key + ":w"):
        assert 0 < client.pttl(key) <= 30_000
    left = mem.ttl()
    assert left is not None and 25 < left <= 30


def test_ttl_slides_with_every_write_and_an_expired_memory_reads_empty(client: redis.Redis) -> None:
    """Each write restarts the clock; once it runs out the memory reads as empty, not as an error."""
    mem = Memory("sliding", client=client, ttl=0.6)
    mem.log = []
    for i in range(4):
        time.sleep(0.3)
        mem.log.append(i)  # 1.2 s in all, never 0.6 s without a write
    assert Memory("sliding", client=client).log == [0, 1, 2, 3]
    time.sleep(1.0)
    assert client.exists(mem.key, mem.key + ":w") == 0
    assert mem.to_dict() == {} and not hasattr(mem, "log") and "log" not in dir(mem)
    mem.log = ["again"]
    assert Memory("sliding", client=client).log == ["again"]


def test_expire_and_persist(client: redis.Redis) -> None:
    """expire(seconds) sets an expiry on every key, persist() removes it; bad values are refused."""
    mem = Memory("manual", client=client)
    mem.x = 1
    assert mem.ttl() is None
    mem.expire(100)
    left = mem.ttl()
    assert left is not None and 95 < left <= 100
    assert 0 < client.pttl(mem.key + ":w") <= 100_000
    mem.persist()
    assert mem.ttl() is None and client.pttl(mem.key + ":w") == -1
    for bad in (0, -1, "10", True):
        with pytest.raises(ValueError):
            mem.expire(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            Memory("manual", client=client, ttl=bad)  # type: ignore[arg-type]
    assert mem.x == 1 and mem.ttl() is None


def test_max_messages_keeps_the_newest(client: redis.Redis) -> None:
    """Every append keeps messages at the newest N; the dropped messages leave no field behind."""
    mem = ConversationMemory("bounded", client=client, max_messages=3)
    mem.messages = []
    for i in range(10):
        mem.messages.append({"role": "user", "content": f"m{i}"})
    expected = [{"role": "user", "content": f"m{i}"} for i in (7, 8, 9)]
    assert mem.messages == expected
    assert ConversationMemory("bounded", client=client).messages == expected

    def data_fields() -> int:  # the journal ring grows to its 128 entries, nothing else may grow
        return sum(1 for f in client.hkeys(mem.key) if not f.startswith(b"j"))

    fields = data_fields()
    for i in range(10, 40):
        mem.messages.append({"role": "user", "content": f"m{i}"})
    assert data_fields() == fields
    mem.messages.extend([{"n": n} for n in range(5)])
    assert mem.messages == [{"n": 2}, {"n": 3}, {"n": 4}]
    mem.notes = []
    for i in range(5):
        mem.notes.append(i)  # only messages is bounded
    assert mem.notes == [0, 1, 2, 3, 4]


def test_max_messages_under_concurrent_writers(client: redis.Redis, other_client: redis.Redis) -> None:
    """Two writers appending in turn: the list is the newest N of all their appends, and both replicas agree."""
    first = ConversationMemory("bounded2", client=client, max_messages=4)
    second = ConversationMemory("bounded2", client=other_client, max_messages=4)
    first.messages = []
    for i in range(12):
        (first if i % 2 else second).messages.append(i)
    assert first.messages == second.messages == [8, 9, 10, 11]
    assert ConversationMemory("bounded2", client=client).messages == [8, 9, 10, 11]


def test_max_messages_trims_an_assigned_list_at_once(client: redis.Redis) -> None:
    """Assigning a longer list stores only its newest N; appends keep it at N."""
    mem = ConversationMemory("bounded3", client=client, max_messages=2)
    mem.messages = [1, 2, 3, 4]
    assert mem.messages == [3, 4] == ConversationMemory("bounded3", client=client).messages
    mem.messages.append(5)
    assert mem.messages == [4, 5] == ConversationMemory("bounded3", client=client).messages
    with pytest.raises(ValueError):
        ConversationMemory("bounded3", client=client, max_messages=0)


def test_max_messages_holds_for_appends_made_offline(switch: Switch, client: redis.Redis) -> None:
    """Appends queued while offline are bounded locally and again when they replay."""
    mem = ConversationMemory("bounded4", client=switch.client(), max_messages=3)
    mem.messages = [{"i": 0}]
    switch.cut()
    for i in range(1, 6):
        mem.messages.append({"i": i})
    assert mem.messages == [{"i": 3}, {"i": 4}, {"i": 5}]
    switch.restore()
    assert mem.flush(timeout=10)
    assert ConversationMemory("bounded4", client=client).messages == [{"i": 3}, {"i": 4}, {"i": 5}]


def test_metadata_is_kept_by_the_library_outside_the_attributes(client: redis.Redis) -> None:
    """Created-at, last activity and message count are readable, and are not stored attributes."""
    mem = ConversationMemory("meta", client=client)
    empty = mem.metadata()
    assert empty.created_at is None and empty.last_activity is None and empty.message_count == 0
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    mem.messages = [{"role": "user"}]
    mem.messages.append({"role": "assistant"})
    first = mem.metadata()
    assert first.created_at is not None and first.last_activity is not None
    assert before < first.created_at <= first.last_activity
    assert first.message_count == 2
    time.sleep(0.05)
    ConversationMemory("meta", client=client).messages.append({"role": "user"})
    second = mem.metadata()
    assert second.created_at == first.created_at and second.last_activity > first.last_activity
    assert second.message_count == 3
    assert dir(mem) == sorted(set(dir(mem))) and set(mem.to_dict()) == {"messages"}
    assert Memory("plain-meta", client=client).metadata().message_count is None


def test_listing_and_deleting_idle_conversations(client: redis.Redis) -> None:
    """list_ids finds stored conversations, idle_for keeps the idle ones, delete_idle removes them whole."""
    for name in ("old-1", "old-2", "fresh"):
        ConversationMemory(name, client=client).messages = [name]
    Memory("not-a-conversation", client=client).x = 1
    assert sorted(ConversationMemory.list_ids(client=client)) == ["fresh", "old-1", "old-2"]
    time.sleep(1.1)
    ConversationMemory("fresh", client=client).messages.append("again")  # within the index's lag
    assert sorted(ConversationMemory.list_ids(idle_for=1, client=client)) == ["old-1", "old-2"]
    assert len(ConversationMemory.list_ids(idle_for=1, limit=1, client=client)) == 1
    assert ConversationMemory.delete_idle(1, batch=1, client=client) == 2
    assert ConversationMemory.list_ids(client=client) == ["fresh"]
    remaining = {k for k in all_keys(client, "*") if b"{old" in k}
    assert remaining == set()
    assert Memory.list_ids(client=client) == ["not-a-conversation"]


def test_listing_forgets_deleted_and_expired_memories(client: redis.Redis) -> None:
    """A memory deleted elsewhere or expired is not listed, and its index entry goes."""
    ConversationMemory("gone", client=client).messages = [1]
    ConversationMemory("kept", client=client).messages = [1]
    client.delete(ConversationMemory("gone", client=client).key)  # as an expiry would
    assert ConversationMemory.list_ids(client=client) == ["kept"]
    parts = ConversationMemory._rm_catalog(client, "rm").parts()  # type: ignore[union-attr]
    assert sum(client.zcard(part) for part in parts) == 1
    with pytest.raises(ValueError):
        ConversationMemory.list_ids(idle_for=-1, client=client)


def test_health_check_and_stats(client: redis.Redis, backend: str) -> None:
    """health_check reports a round trip, server and mode; stats report bytes, fields and pending operations."""
    health = health_check(client)
    assert health.round_trip_ms > 0 and health.server == {"redis7": "redis", "valkey": "valkey"}.get(backend, "redis")
    assert health.version.startswith({"redis7": "7.", "valkey": "9.", "cluster": "7."}.get(backend, "unknown"))
    assert health.mode == ("cluster" if backend == "cluster" else "standalone")
    mem = ConversationMemory("stats", client=client)
    assert mem.health_check().server == health.server
    mem.messages = [{"role": "user", "content": "x" * 100}]
    small = mem.stats()
    for _ in range(20):
        mem.messages.append({"role": "user", "content": "x" * 100})
    large = mem.stats()
    assert 0 < small.bytes_used < large.bytes_used and small.fields < large.fields
    assert large.pending == 0
    ConversationMemory("stats-2", client=client).messages = []
    assert ConversationMemory.count(client=client) == 2
    with pytest.raises(ConnectionFailed):
        health_check(url="redis://127.0.0.1:1/0")


def test_window_gives_the_newest_messages_within_a_token_budget(client: redis.Redis) -> None:
    """window() reads the stored messages fresh and fits them, system message first, as plain dicts."""
    mem = ConversationMemory("window", client=client)
    assert mem.window(100) == []
    mem.messages = [{"role": "system", "content": "be brief"}]
    other = ConversationMemory("window", client=client)
    for i in range(30):
        other.messages.append({"role": "user", "content": f"question {i}"})

    def words(text: str) -> int:
        return len(text.split())

    cost = message_tokens({"role": "user", "content": "question 1"}, words)
    system_cost = message_tokens(mem.messages[0], words)
    window = mem.window(system_cost + 5 * cost, counter=words)
    assert window == [{"role": "system", "content": "be brief"}] + [
        {"role": "user", "content": f"question {i}"} for i in range(25, 30)
    ]
    assert all(type(m) is dict for m in window)
    summarized = mem.window(system_cost + 5 * cost, counter=words, summarize=lambda dropped: f"{len(dropped)} earlier")
    assert summarized[1] == {"role": "system", "content": "26 earlier"}
    assert summarized[2:] == window[2:]
    assert len(mem.messages) == 31  # nothing stored changed
