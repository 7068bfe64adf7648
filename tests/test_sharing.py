"""Memories on the same server, key and options in one process share one core: replica, writer id, queue."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import Switch, twin
from servers import raw_client

from redis_memory import ConversationMemory, Memory, MemoryClosed, RedisMemoryError, connection, keep_memories
from redis_memory import memory as memory_module


class Commands:
    """The commands one core sends, by name."""

    def __init__(self, mem: Memory) -> None:
        self.names: list[bytes] = []
        store = mem._rm.store
        real = store._call_packed

        def counted(packed: bytes, *rest: Any) -> Any:
            self.names.append(packed.split(b"\r\n")[2])
            return real(packed, *rest)

        store._call_packed = counted  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def default_limit() -> Any:
    yield
    keep_memories(256)


def test_a_memory_built_per_request_starts_from_the_kept_replica(client: redis.Redis) -> None:
    """After a first request loaded a 1,000-message conversation, each later request's new memory and one
    append cost a version check and the append: no full load, no loading of server code."""
    first = ConversationMemory("busy", client=client)
    first.messages = [{"role": "user", "content": f"m{i}"} for i in range(1000)]
    del first
    commands = None
    for request in range(3):
        mem = ConversationMemory("busy", client=client)
        commands = commands or Commands(mem)
        mem.messages.append({"role": "assistant", "content": f"reply {request}"})
    assert commands is not None
    assert commands.names == [b"HMGET", b"FCALL"] * 3
    assert len(ConversationMemory("busy", client=client).messages) == 1003


def test_memory_objects_on_one_key_share_a_replica_and_a_writer(client: redis.Redis) -> None:
    """Two memory objects on the same key see each other's writes at once and write as one writer; other
    options (an author, an expiry) or another key get cores of their own."""
    a, b = Memory("same", client=client), Memory("same", client=client)
    a.x = [1]
    assert b.x is a.x
    assert a._rm is b._rm
    writers = [f for f in client.hkeys(a.key) if f.startswith(b"w")]
    b.y = 2
    assert [f for f in client.hkeys(a.key) if f.startswith(b"w")] == writers
    assert Memory("same", client=client, author="bot")._rm is not a._rm
    assert Memory("same", client=client, ttl=60)._rm is not a._rm
    assert Memory("other", client=client)._rm is not a._rm


def test_closing_one_memory_object_leaves_the_others_open(client: redis.Redis) -> None:
    """Closing a memory object closes it alone; once the last is closed its proxies raise MemoryClosed, and
    a memory built again works from the kept replica."""
    a, b = Memory("closing", client=client), Memory("closing", client=client)
    a.log = []
    held = a.log
    a.close()
    with pytest.raises(MemoryClosed):
        a.log.append(1)
    held.append(1)  # b still holds the core open
    assert b.log == [1]
    b.close()
    with pytest.raises(MemoryClosed):
        held.append(2)
    c = Memory("closing", client=client)
    commands = Commands(c)
    c.log.append(3)
    assert commands.names == [b"HMGET", b"FCALL"]
    assert Memory("closing", client=client).log == [1, 3]


def test_the_kept_memories_are_bounded(client: redis.Redis) -> None:
    """With keep_memories(2), memories let go of beyond the two most recently used are loaded again in full."""
    keep_memories(2)
    for name in ("m0", "m1", "m2", "m3"):
        Memory(name, client=client).x = name
    gc.collect()  # a memory let go of in a reference cycle is idle only once collected
    for name, reloaded in (("m3", False), ("m2", False), ("m0", True)):
        mem = Memory(name, client=client)
        commands = Commands(mem)
        assert mem.x == name
        assert (b"HGETALL" in commands.names) == reloaded, name
    with pytest.raises(ValueError):
        keep_memories(-1)


def test_a_kept_memory_does_not_keep_its_client_or_the_clients_connections(real_url: str) -> None:
    """A memory kept for reuse holds no client the program let go of: 30 requests, each with a client of
    its own that runs a command of its own, leave no client alive and no connection open on the server."""
    probe = raw_client(real_url)
    before = len(probe.client_list())
    gone = []
    for request in range(30):
        client = raw_client(real_url)
        mem = Memory(f"request-{request}", client=client)
        mem.x = request
        client.ping()
        gone.append(weakref.ref(client))
        del mem, client
    gc.collect()
    assert [ref for ref in gone if ref() is not None] == []
    assert len(probe.client_list()) <= before
    # The kept replicas of clients let go of are forgotten: a new client loads in full, and reads right.
    assert Memory("request-7", client=probe).x == 7


def open_files_under(folder: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(folder)):
                found.append(target)
    return found


def test_a_kept_memory_whose_client_is_gone_releases_its_spool(switch: Switch, tmp_path: Path) -> None:
    """Requests that each queued a change in a spool while Redis was away, then let go of their memory and
    client: once replayed, no spool file stays open (nor locked), and the emptied files are gone."""
    for request in range(3):
        mem = Memory(f"spooled-{request}", client=switch.client(), spool=tmp_path)
        mem.x = 0
        switch.cut()
        mem.x = 1
        switch.restore()
        assert mem.flush(timeout=10)
        del mem
    gc.collect()
    Memory("another request", client=switch.client())
    gc.collect()
    assert open_files_under(tmp_path) == []
    assert [path.name for path in tmp_path.rglob("*.spool")] == []
    assert [Memory(f"spooled-{n}", client=switch.client()).x for n in range(3)] == [1, 1, 1]


def test_a_memory_replayed_after_its_client_is_gone_is_forgotten(switch: Switch) -> None:
    """A change queued offline by a memory whose program let go of it and of its client (and pool) is
    replayed once; after that, the kept memory holds neither the client nor its pool."""
    client, other = switch.client(), switch.client()
    pool = getattr(client, "connection_pool", client)  # a cluster client has its own pools
    mem = Memory("queued", client=client)
    mem.x = 0
    switch.cut()
    mem.x = 1
    gone = weakref.ref(client), weakref.ref(pool)
    del mem, client, pool
    gc.collect()
    Memory("while queued", client=other)  # a memory built while the change is still queued
    switch.restore()
    reader = Memory("queued", client=switch.client())
    deadline = time.monotonic() + 10
    while reader.x != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reader.x == 1
    Memory("after the replay", client=switch.client())
    gc.collect()
    assert [ref() for ref in gone] == [None, None]


def test_a_client_on_a_pool_of_its_own_leaves_no_connection_behind(real_url: str) -> None:
    """A client built on a ConnectionPool the program made: once the program lets go of both (and of the
    memory), the pool is collected and its connection closes, with no further memory built."""
    probe = raw_client(real_url)
    if isinstance(probe, redis.RedisCluster):
        pytest.skip("a cluster client has no pool of its own to give")
    before = len(probe.client_list())

    def request() -> weakref.ref[Any]:
        pool = redis.ConnectionPool.from_url(real_url)
        client = redis.Redis(connection_pool=pool)
        Memory("pooled", client=client).x = 1
        client.set("plain", 1)  # the program's own command, over its own pool
        return weakref.ref(pool)

    gone = request()
    gc.collect()
    assert gone() is None
    assert len(probe.client_list()) == before


def test_raising_the_last_error_keeps_nothing_alive(switch: Switch, client: redis.Redis) -> None:
    """``raise mem.status().last_error`` raises a copy: the kept error gets no traceback holding the caller's
    memory and client."""
    Memory("dropped", client=client).log = []

    def request() -> tuple[weakref.ref[Any], weakref.ref[Any]]:
        own = switch.client()
        mem = Memory("dropped", client=own)
        assert mem.log == []
        switch.cut()
        mem.log.append(1)
        Memory("dropped", client=client).delete()  # the list is gone when Redis is back: the replay drops it
        switch.restore()
        refs = weakref.ref(own), weakref.ref(mem)
        assert not mem.flush(timeout=10)
        with pytest.raises(RedisMemoryError):
            raise mem.status().last_error  # type: ignore[misc]
        return refs

    refs = request()
    gc.collect()
    Memory("another request", client=client)
    gc.collect()
    assert [ref() for ref in refs] == [None, None]


def test_listing_with_clients_let_go_of_keeps_nothing(client: redis.Redis) -> None:
    """Counting and listing memories with a client per call leaves nothing behind for each client."""
    gc.collect()  # what earlier tests let go of is told first
    Memory("listed", client=client).x = 1
    before = len(connection.orphaned)
    for _ in range(50):
        assert Memory.count(client=twin(client)) == 1
    gc.collect()
    assert len(connection.orphaned) <= before  # what would grow by one per client


@pytest.mark.parametrize("tracking", [False, True])
def test_kept_memories_of_clients_let_go_of_are_forgotten(client: redis.Redis, tracking: bool) -> None:
    """A memory per request on a client per request: once the clients are gone, their kept memories are
    forgotten at the next memory built (tracked ones too: they were kept until the reuse limit)."""
    gc.collect()
    for i in range(20):
        Memory(f"request-{tracking}-{i}", client=twin(client), tracking=tracking).n = i
        gc.collect()
    Memory("next", client=client)
    kept = [key for key in list(memory_module._shared.cores) if f"request-{tracking}-" in key[1]]
    assert len(kept) <= 1  # at most the last request's


def test_threads_building_memories_per_request_lose_nothing(client: redis.Redis) -> None:
    """8 threads, each building a new memory per request and appending, on one conversation: all 800
    appends are there once, in each thread's order."""

    def worker(n: int) -> None:
        for i in range(100):
            ConversationMemory("threads", client=client).messages.append(f"{n}:{i}")

    ConversationMemory("threads", client=client).messages = []
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = ConversationMemory("threads", client=client).messages
    assert sorted(got) == sorted(f"{n}:{i}" for n in range(8) for i in range(100))
    for n in range(8):
        mine = [m for m in got if m.startswith(f"{n}:")]
        assert mine == [f"{n}:{i}" for i in range(100)]


def child_appends(url: str, done: Any) -> None:
    mem = ConversationMemory("forked", url=url)
    for i in range(50):
        ConversationMemory("forked", url=url).messages.append(f"child {i}")
    done.put(len(mem.messages))


def test_a_forked_child_writes_as_a_writer_of_its_own(real_url: str) -> None:
    """A child forked after the parent served a memory builds memories on it as its own writer: both
    processes' appends land once each."""
    parent = ConversationMemory("forked", url=real_url)
    parent.messages = []
    parent.messages.append("parent 0")
    context = multiprocessing.get_context("fork")
    done = context.Queue()
    child = context.Process(target=child_appends, args=(real_url, done))
    child.start()
    for i in range(1, 50):
        ConversationMemory("forked", url=real_url).messages.append(f"parent {i}")
    child.join(60)
    assert child.exitcode == 0
    assert done.get(timeout=5) >= 50
    got = ConversationMemory("forked", url=real_url).messages
    assert sorted(got) == sorted([f"parent {i}" for i in range(50)] + [f"child {i}" for i in range(50)])
    writers = [f for f in raw_client(real_url).hkeys(parent.key) if f.startswith(b"w")]
    assert len(writers) == 2
