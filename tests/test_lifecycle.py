"""Closing memories: what close() does, what using a closed memory does, and that no library thread outlives them."""

from __future__ import annotations

import gc
import logging
import threading
import time
from pathlib import Path

import pytest
import redis
from conftest import Switch

from redis_memory import ConversationMemory, Memory, MemoryClosed, RedisMemoryError, Session

_BEFORE: set[threading.Thread] = set()


@pytest.fixture(autouse=True)
def threads_before() -> None:
    """What was running before the test: its own threads are the others."""
    _BEFORE.clear()
    _BEFORE.update(threading.enumerate())


def library_threads() -> list[str]:
    """The library threads (named "redis_memory...") started during this test and still alive."""
    return [t.name for t in threading.enumerate() if t.name.startswith("redis_memory") and t not in _BEFORE]


def wait_for_no_library_thread(grace: float = 3.0) -> list[str]:
    """The library threads of this test still alive after ``grace`` seconds (collecting garbage meanwhile)."""
    deadline = time.monotonic() + grace
    while library_threads() and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.02)
    return library_threads()


def test_closed_memory_refuses_use_with_a_clear_error(client: redis.Redis) -> None:
    """After close() (twice is fine), reads, writes, proxies and server calls raise MemoryClosed."""
    mem = Memory("closing", client=client)
    mem.items = [1]
    items = mem.items
    mem.close()
    mem.close()
    for use in (lambda: mem.items, lambda: setattr(mem, "x", 1), lambda: items.append(2), mem.ttl, mem.to_dict):
        with pytest.raises(MemoryClosed) as raised:
            use()
        assert isinstance(raised.value, RedisMemoryError) and isinstance(raised.value, ValueError)
        assert raised.value.key == mem.key
    assert Memory("closing", client=client).items == [1]


def test_with_block_closes_memories_and_sessions(client: redis.Redis) -> None:
    """``with`` closes a Memory, a ConversationMemory and a Session (with its agents' memories) at the block's end."""
    with Memory("m", client=client) as mem:
        mem.x = 1
    with ConversationMemory("c", client=client) as conv:
        conv.messages = []
    with Session("s", client=client) as session:
        session.shared.topic = "t"
        agent = session.agent("A")
        agent.note = "n"
    for closed in (mem, conv, session.shared, agent):
        with pytest.raises(MemoryClosed):
            closed.to_dict()
    assert Memory("m", client=client).x == 1


def test_no_library_thread_outlives_the_last_closed_memory(switch: Switch, client: redis.Redis) -> None:
    """Offline memories start the reconnect thread; once every one is closed, no library thread is left."""
    first = Memory("t1", client=switch.client())
    second = ConversationMemory("t2", client=switch.client())
    first.to_dict(), second.to_dict()
    feed = first.subscribe(lambda event: None)
    switch.cut()
    first.x = 1  # queued
    second.to_dict()  # offline, nothing queued
    assert library_threads()
    feed.close()
    first.close()
    second.close()
    assert wait_for_no_library_thread() == []


def test_a_memory_let_go_offline_with_nothing_queued_leaves_no_thread(switch: Switch, client: redis.Redis) -> None:
    """A memory dropped (not closed) while offline, nothing queued: the reconnect thread stops probing."""
    mem = Memory("dropped", client=switch.client())
    mem.to_dict()
    switch.cut()
    mem.to_dict()
    assert library_threads()
    del mem
    assert wait_for_no_library_thread() == []


def test_close_flushes_a_queue_when_redis_is_back(switch: Switch, client: redis.Redis) -> None:
    """Changes queued offline, Redis back, close() before the replay: they reach Redis."""
    mem = Memory("flushed", client=switch.client())
    mem.to_dict()
    switch.cut()
    mem.x = 1
    switch.restore()
    assert mem._rm.link.probe()  # found back, the replay not yet done: close() must not return before it is
    mem.close()
    assert Memory("flushed", client=client).x == 1


def test_close_tries_the_server_before_giving_a_queue_up(switch: Switch, client: redis.Redis) -> None:
    """Redis back, but the reconnect thread has not tried it yet (its wait has grown to a second): close() tries it
    once itself and replays the queue, instead of reporting it lost."""
    mem = Memory("flushed-early", client=switch.client())
    mem.to_dict()
    switch.cut()
    mem.x = 1
    time.sleep(2.5)  # the reconnect thread's waits double up to 1 s
    switch.restore()
    mem.close()
    assert Memory("flushed-early", client=client).x == 1


def test_flush_reports_a_drop_to_the_first_call_that_reaches_redis(switch: Switch, client: redis.Redis) -> None:
    """A drop during a background replay, then Redis away again: a flush that times out says False (not there
    yet) without using up the report; the one that reaches Redis says False for the drop; the next, True."""
    mem = Memory("told", client=switch.client())
    mem.items = [0]
    held = mem.items
    switch.cut()
    held.append(1)  # queued on a list the other process deletes meanwhile
    Memory("told", client=client).items = ["replaced"]
    switch.restore()
    deadline = time.monotonic() + 20
    while mem.status().dropped == 0:  # the reconnect thread's replay drops it
        assert time.monotonic() < deadline
        time.sleep(0.02)
    switch.cut()
    mem.x = 1
    assert mem.flush(timeout=0.5) is False
    switch.restore()
    assert mem.flush(timeout=20) is False
    assert mem.flush(timeout=20) is True
    assert Memory("told", client=client).to_dict() == {"items": ["replaced"], "x": 1}


def test_close_offline_keeps_the_queue_in_the_spool(switch: Switch, client: redis.Redis, tmp_path: Path) -> None:
    """Closed offline with a spool, the queue stays in the spool; the next memory opened on it replays it."""
    mem = Memory("spooled", client=switch.client(), spool=tmp_path)
    mem.to_dict()
    switch.cut()
    mem.x = 1
    mem.close()
    switch.restore()
    with Memory("spooled", client=client, spool=tmp_path) as heir:
        assert heir.flush(timeout=10)
    assert Memory("spooled", client=client).x == 1


def test_close_offline_without_a_spool_says_the_queue_is_lost(
    switch: Switch, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Closed offline without a spool: an error in the log says how many changes are lost, at once."""
    mem = Memory("lost", client=switch.client())
    mem.to_dict()
    switch.cut()
    mem.x, mem.y = 1, 2
    start = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="redis_memory"):
        mem.close()
    assert time.monotonic() - start < 0.5
    assert any("2 queued operations" in r.getMessage() and "lost" in r.getMessage() for r in caplog.records)
