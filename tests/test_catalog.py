"""The index of memories: listing, counting and idle clean-up, their errors, and entries never lost."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from conftest import Switch, all_keys

from redis_memory import ConnectionFailed, ConversationMemory, CorruptData, RedisMemoryError, ServerRefused
from redis_memory.store import Store


def test_listing_while_redis_is_down_raises_connection_failed(switch: Switch) -> None:
    """list_ids, count and delete_idle raise ConnectionFailed (a ConnectionError) when Redis is unreachable."""
    offline = switch.client()
    ConversationMemory("c", client=offline).messages = ["hi"]
    switch.cut()
    for call in (
        lambda: ConversationMemory.list_ids(client=offline),
        lambda: ConversationMemory.list_ids(idle_for=0, client=offline),
        lambda: ConversationMemory.count(client=offline),
        lambda: ConversationMemory.delete_idle(0, client=offline),
    ):
        with pytest.raises(ConnectionFailed) as raised:
            call()
        assert isinstance(raised.value, ConnectionError) and isinstance(raised.value, RedisMemoryError)


def test_an_index_key_of_another_type_is_corrupt_data_naming_it(client: redis.Redis) -> None:
    """An index key holding a string makes listing raise CorruptData naming that key; writes still work."""
    index = ConversationMemory._rm_catalog(client, "rm").part_of("c")  # type: ignore[union-attr]
    client.set(index, "someone else's")
    mem = ConversationMemory("c", client=client)
    mem.messages = ["written"]  # the index is secondary: the write goes through
    assert ConversationMemory("c", client=client).messages == ["written"]
    for call in (
        lambda: ConversationMemory.list_ids(client=client),
        lambda: ConversationMemory.count(client=client),
        lambda: ConversationMemory.delete_idle(0, client=client),
    ):
        with pytest.raises(CorruptData) as raised:
            call()
        assert raised.value.key == index and isinstance(raised.value, ValueError)
    assert client.get(index) == b"someone else's"


def test_a_listed_memory_key_of_another_type_is_corrupt_data_naming_it(client: redis.Redis) -> None:
    """An index entry whose memory key holds a string makes listing raise CorruptData naming the memory key."""
    mem = ConversationMemory("taken", client=client)
    mem.messages = ["x"]
    client.delete(mem.key)
    client.set(mem.key, "someone else's")
    with pytest.raises(CorruptData) as raised:
        ConversationMemory.list_ids(client=client)
    assert raised.value.key == mem.key


@pytest.mark.parametrize("backend", ["redis7", "valkey"])
def test_a_refused_index_command_is_server_refused(client: redis.Redis) -> None:
    """An ACL user who may not read the index gets ServerRefused (a RuntimeError), not redis-py's error."""
    ConversationMemory("c", client=client).messages = ["x"]
    client.acl_setuser("lister", enabled=True, passwords=["+pw"], keys=["rm:conversation:{*"], commands=["+@all"])
    try:
        pool = client.connection_pool
        options = dict(pool.connection_kwargs, username="lister", password="pw")
        restricted = redis.Redis(
            connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **options)
        )
        for call in (
            lambda: ConversationMemory.list_ids(client=restricted),
            lambda: ConversationMemory.count(client=restricted),
        ):
            with pytest.raises(ServerRefused) as raised:
                call()
            assert raised.value.key == "rm:conversation:index" and isinstance(raised.value, RuntimeError)
    finally:
        client.acl_deluser("lister")


def test_a_memory_deleted_idle_and_written_again_by_another_process_is_listed(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """delete_idle in one process, then a write in another within the index's lag: listed and counted again."""
    writer = ConversationMemory("c", client=client)
    writer.messages = ["first"]  # the writer's index entry is fresh now
    assert ConversationMemory.delete_idle(0, client=other_client) == 1
    assert ConversationMemory.list_ids(client=other_client) == []
    writer.messages = ["second"]  # creates the memory anew
    assert ConversationMemory.list_ids(client=other_client) == ["c"]
    assert ConversationMemory.count(client=other_client) == 1
    assert ConversationMemory.delete_idle(0, client=other_client) == 1
    assert all_keys(client, "*{c}*") == []


def test_a_write_landing_between_a_deletion_and_its_index_removal_keeps_the_memory_listed(
    client: redis.Redis, other_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If another process recreates the memory just after delete_idle's DEL, before its ZREM, it stays listed."""
    writer = ConversationMemory("c", client=client)
    writer.messages = ["first"]
    delete = Store.delete

    def delete_then_another_writes(store: Store, *args: Any, **kwargs: Any) -> bool:
        deleted = delete(store, *args, **kwargs)
        if store.client is other_client:
            writer.messages = ["written in between"]
        return deleted

    monkeypatch.setattr(Store, "delete", delete_then_another_writes)
    assert ConversationMemory.delete_idle(0, client=other_client) == 1
    assert ConversationMemory.list_ids(client=other_client) == ["c"]
    assert ConversationMemory("c", client=other_client).messages == ["written in between"]


@pytest.mark.parametrize("backend", ["redis7", "valkey"])
@pytest.mark.parametrize("reply", [b"*1\r\n:1\r\n", b"+OK\r\n", b"*2\r\n:7\r\n$1\r\n1\r\n"])
def test_a_listing_answered_with_a_reply_of_another_shape_is_a_connection_failure(
    switch: Switch, client: redis.Redis, reply: bytes
) -> None:
    """list_ids() over a connection whose next reply is none Redis sends to ZRANGEBYSCORE: ConnectionFailed."""
    ConversationMemory("listed", client=client).title = "here"
    through = switch.client()
    ConversationMemory.count(client=through)  # its connection is open
    switch.inject(reply)
    with pytest.raises(ConnectionFailed):
        ConversationMemory.list_ids(client=through)
    assert "listed" in ConversationMemory.list_ids(client=through)  # a new connection
