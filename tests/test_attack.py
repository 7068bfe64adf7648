"""Adversarial reproductions of bugs in the latest changes (each test fails until its bug is fixed)."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from conftest import Switch

from redis_memory import Memory, RedisMemoryError


def test_a_queued_sort_that_no_longer_fits_the_servers_list_does_not_brick_the_memory(
    switch: Switch, client: redis.Redis
) -> None:
    """A sort queued offline is re-made on replay from the server's list. If another process
    meanwhile added an item that cannot be compared (a str among ints), the sort cannot be
    re-made: it should be refused (dropped and counted, or a RedisMemoryError), and the
    change queued after it should still reach Redis. Today the replay raises a bare
    TypeError from every read, write and flush, forever, and the later change is lost."""
    mem = Memory("t", client=switch.client())
    mem.items = [3, 1, 2]
    other = Memory("t", client=client)
    switch.cut()
    mem.items.sort()
    mem.after = "queued behind the sort"
    other.items.append("a str")
    switch.restore()
    try:
        mem.flush(timeout=10)
    except RedisMemoryError:
        pass
    except TypeError as exc:  # the bug
        pytest.fail(f"replay raised a bare {exc!r}")
    # The memory still works, and the change queued after the sort reached Redis.
    assert Memory("t", client=client).to_dict().get("after") == "queued behind the sort"
    assert mem.to_dict()["items"] == [3, 1, 2, "a str"]
    mem.close()


@pytest.mark.parametrize("index", [0, 1])
def test_max_messages_holds_for_an_insert_from_a_stale_view(
    client: redis.Redis, other_client: redis.Redis, index: int
) -> None:
    """max_messages=3: one process holds the history [1, 2] while another appends a third
    message. An insert (at the front or in the middle) from the first must still leave at most
    3 messages on the server (the oldest dropped). Today the bound is decided on the stale
    local length (2 < 3), so the server keeps 4 messages."""
    from redis_memory import ConversationMemory

    mine = ConversationMemory("c", client=client, max_messages=3)
    theirs = ConversationMemory("c", client=other_client, max_messages=3)
    mine.messages = [1, 2]
    held = mine.messages
    theirs.messages.append(3)
    held.insert(index, "new")
    stored = ConversationMemory("c", client=other_client, max_messages=3).messages
    assert len(stored) <= 3, stored
    assert len(mine.messages) <= 3


def test_a_corrupt_list_header_does_not_lock_up_the_server(real_url: str) -> None:
    """A list header whose range claims three million slots (corruption: the list holds two) must
    not make a removal of that list run for minutes inside Redis: the overwrite should be
    refused as CorruptData, or done, in a few seconds, and the server must stay usable.
    Today the apply script walks every claimed slot: the server answers BUSY to every client
    (all memories, all keys) for minutes, and the write is left queued with an unknown outcome."""
    import time

    raw = redis.Redis.from_url(real_url)
    mem = Memory("t", url=real_url)
    mem.items = [1, 2]
    mem.other = "kept"
    field = next(f for f, v in raw.hgetall(mem.key).items() if f.startswith(b"h") and v.startswith(b"l "))
    kind, lo, _hi, rest = raw.hget(mem.key, field).split(b" ", 3)
    raw.hset(mem.key, field, b" ".join([kind, lo, b"3000000", rest]))
    try:
        started = time.monotonic()
        writer = Memory("t", url=real_url)
        try:
            writer.items = 5
        except RedisMemoryError:
            pass
        elapsed = time.monotonic() - started
        probe = redis.Redis.from_url(real_url, socket_timeout=5)
        assert probe.ping()  # not BUSY
        assert elapsed < 5, elapsed
    finally:
        mem.close(timeout=0)
        writer.close(timeout=0)
        for _ in range(100):  # leave the shared server usable for the next tests
            try:
                redis.Redis.from_url(real_url, socket_timeout=5).script_kill()
            except redis.ResponseError:
                break
            time.sleep(0.1)
