"""Real failures on real servers: killed servers, killed connections, lost replies, dead processes."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from netproxy import TcpProxy
from servers import RedisServer, debian_redis, durable_redis, raw_client
from workers import (
    append_while_down,
    open_containers_spool_and_flush,
    open_spool_and_flush,
    spool_and_hang,
    spool_new_containers_and_hang,
    stream_appends,
)

from redis_memory import ConnectionFailed, ContainerDeleted, ConversationMemory, Memory

spawn = multiprocessing.get_context("spawn")


@pytest.fixture
def durable(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, fsyncing every write, so that SIGKILL loses nothing."""
    server = durable_redis(tmp_path / "server")
    yield server
    server.stop()


def check_exactly_once(messages: list[Any], writers: int, count: int) -> None:
    pairs = [(m["writer"], m["i"]) for m in messages]
    assert len(pairs) == writers * count, "lost or duplicated"
    for w in range(writers):
        assert [i for (writer, i) in pairs if writer == w] == list(range(count)), f"writer {w} out of order"


def test_server_killed_and_restarted_during_writes_from_several_processes(durable: RedisServer) -> None:
    """4 processes append while the server is SIGKILLed and restarted: every write once, in each writer's order."""
    writers, count = 4, 150
    setup = ConversationMemory("faults", url=durable.url)
    setup.messages = []
    barrier = spawn.Barrier(writers + 1)
    procs = [spawn.Process(target=stream_appends, args=(durable.url, w, count, barrier)) for w in range(writers)]
    for p in procs:
        p.start()
    barrier.wait()
    admin = redis.Redis(port=durable.port)
    while admin.hlen(setup.key) < 150:  # writes are flowing
        time.sleep(0.01)
    durable.kill()
    time.sleep(0.5)  # writes pile up in the queues
    durable.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    check_exactly_once(ConversationMemory("faults", url=durable.url).messages, writers, count)


def kill_clients(admin: redis.Redis, name: str) -> int:
    """CLIENT KILL of every connection named ``name``; how many there were."""
    killed = 0
    for found in admin.client_list():
        if found["name"] == name:
            killed += bool(admin.client_kill_filter(_id=found["id"]))
    return killed


def test_client_kill_every_few_operations_loses_and_repeats_nothing(real_url: str) -> None:
    """CLIENT KILL of the library's connections, over and over, during 300 appends: exactly the 300 remain."""
    mem = Memory("killed", client=raw_client(real_url, client_name="victim"))
    mem.items = []
    items = mem.items
    done = threading.Event()
    kills = 0

    def killer() -> None:
        nonlocal kills
        admin = raw_client(real_url)
        while not done.is_set():
            kills += kill_clients(admin, "victim")
            time.sleep(random.uniform(0.0005, 0.004))

    thread = threading.Thread(target=killer)
    thread.start()
    admin = raw_client(real_url)
    try:
        for i in range(300):
            items.append(i)
            if i % 3 == 2:
                kills += kill_clients(admin, "victim")
            time.sleep(0.002)  # long enough for reconnects in between
    finally:
        done.set()
        thread.join()
    assert mem.flush(timeout=30), mem.status()
    assert kills > 30
    assert Memory("killed", url=real_url).items == list(range(300))
    assert mem.items == list(range(300))


@pytest.fixture
def lossy(servers: dict[str, Any], real_url: str) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the Redis 7 server, able to lose replies."""
    proxy = TcpProxy(servers["redis7"].port)
    yield proxy
    proxy.close()


def test_reply_lost_after_the_server_applied_the_operation(lossy: TcpProxy, servers: dict[str, Any]) -> None:
    """The link drops after the server applied an operation, before the reply arrives: applied once."""
    direct = Memory("lossy", url=servers["redis7"].url)
    direct.delete()
    mem = Memory("lossy", client=redis.Redis.from_url(lossy.url))
    mem.items = ["a"]
    mem.meta = {}
    lossy.lose_next_replies(1)
    mem.items.append("once")
    lossy.lose_next_replies(1)
    mem.meta["k"] = "v"
    lossy.lose_next_replies(1)
    assert mem.items.pop(0) == "a"
    assert lossy.replies_lost == 3
    assert direct.to_dict() == {"items": ["once"], "meta": {"k": "v"}}
    # Both the command and its resend lose their replies: the operation is
    # queued with its id, and its replay is recognised as already applied.
    lossy.lose_next_replies(2)
    mem.items.append("still once")
    assert mem.flush(timeout=10)
    assert lossy.replies_lost == 5
    assert direct.items == ["once", "still once"]
    assert mem.items == ["once", "still once"]


def test_two_processes_append_while_offline(durable: RedisServer) -> None:
    """Two processes append while the server is down; after it is back both sets are present, in order."""
    setup = ConversationMemory("offline", url=durable.url)
    setup.messages = []
    events = [spawn.Event() for _ in range(6)]
    loaded, written = events[0:2], events[2:4]
    down, up = events[4], events[5]
    procs = [
        spawn.Process(target=append_while_down, args=(durable.url, w, loaded[w], down, written[w], up))
        for w in range(2)
    ]
    for p in procs:
        p.start()
    assert all(e.wait(60) for e in loaded)
    durable.kill()
    down.set()
    assert all(e.wait(60) for e in written)
    durable.start()
    up.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    check_exactly_once(ConversationMemory("offline", url=durable.url).messages, 2, 20)


def test_spooled_queue_survives_sigkill_of_its_process(durable: RedisServer, tmp_path: Path) -> None:
    """With a spool, a process SIGKILLed while offline loses nothing: the next process on the spool replays it."""
    spool = str(tmp_path / "spool")
    setup = ConversationMemory("spooled", url=durable.url)
    setup.messages = []
    loaded, down, written = spawn.Event(), spawn.Event(), spawn.Event()
    doomed = spawn.Process(target=spool_and_hang, args=(durable.url, spool, loaded, down, written))
    doomed.start()
    assert loaded.wait(60)
    durable.kill()
    down.set()
    assert written.wait(60)
    assert doomed.pid is not None
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.join(10)
    durable.start()
    assert ConversationMemory("spooled", url=durable.url).messages == []
    heir = spawn.Process(target=open_spool_and_flush, args=(durable.url, spool))
    heir.start()
    heir.join(120)
    assert heir.exitcode == 0
    assert ConversationMemory("spooled", url=durable.url).messages == list(range(50))
    assert all(f.stat().st_size == 0 for f in Path(spool).rglob("*.spool"))


def test_spooled_changes_inside_containers_made_offline_survive_sigkill(durable: RedisServer, tmp_path: Path) -> None:
    """A list and a dict created offline, then changed inside, by a process SIGKILLed: the heir replays all of it."""
    spool = str(tmp_path / "spool")
    loaded, down, written = spawn.Event(), spawn.Event(), spawn.Event()
    doomed = spawn.Process(target=spool_new_containers_and_hang, args=(durable.url, spool, loaded, down, written))
    doomed.start()
    assert loaded.wait(60)
    durable.kill()
    down.set()
    assert written.wait(60)
    assert doomed.pid is not None
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.join(10)
    durable.start()
    heir = spawn.Process(target=open_containers_spool_and_flush, args=(durable.url, spool))
    heir.start()
    heir.join(120)
    assert heir.exitcode == 0
    assert Memory("containers", url=durable.url).to_dict() == {"todo": ["x"], "box": {"items": list(range(20))}}


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, free to be reconfigured."""
    server = debian_redis(tmp_path / "own")
    yield server
    server.stop()


def test_reconnect_survives_error_replies_to_its_probe(own_server: RedisServer) -> None:
    """The server refuses the reconnect probe (NOPERM) for a while: once it accepts again the queue replays."""
    proxy = TcpProxy(own_server.port)
    admin = redis.Redis(port=own_server.port)
    try:
        mem = Memory("probed", client=redis.Redis.from_url(proxy.url))
        mem.items = []
        proxy.cut()
        mem.items.append("queued")
        admin.execute_command("ACL", "SETUSER", "default", "-ping")
        proxy.restore()
        deadline = time.monotonic() + 5
        while "NOPERM" not in str(mem.status().last_error) and time.monotonic() < deadline:
            time.sleep(0.02)
        refused = mem.status().last_error
        admin.execute_command("ACL", "SETUSER", "default", "+ping")
        deadline = time.monotonic() + 5
        while mem.status().pending and time.monotonic() < deadline:  # no flush(): the background thread alone
            time.sleep(0.02)
        assert mem.status().pending == 0, mem.status()
        assert "NOPERM" in str(refused)
        assert Memory("probed", url=own_server.url).items == ["queued"]
    finally:
        proxy.close()


@pytest.fixture
def link(servers: dict[str, Any]) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the flushed Redis 7 server, able to go silent."""
    redis.Redis.from_url(servers["redis7"].url).flushall()
    proxy = TcpProxy(servers["redis7"].port)
    yield proxy
    proxy.close()


def test_first_command_on_a_silent_link_waits_one_command_timeout(link: TcpProxy) -> None:
    """The server stops answering without closing anything: the first write gives up after one command timeout."""
    mem = Memory("silent", client=redis.Redis.from_url(link.url, socket_timeout=1.0, socket_connect_timeout=1.0))
    mem.items = []
    link.silence()
    start = time.monotonic()
    mem.items.append("a")
    first = time.monotonic() - start
    start = time.monotonic()
    mem.items.append("b")
    second = time.monotonic() - start
    assert first < 1.5, f"the first write blocked {first:.1f} s; the command timeout is 1 s"
    assert second < 0.1 and mem.status().pending == 2
    link.silence(False)
    assert mem.flush(timeout=10), mem.status()
    assert Memory("silent", client=redis.Redis(port=link.target)).items == ["a", "b"]  # type: ignore[arg-type]


def test_flush_on_a_silent_link_returns_within_its_timeout(link: TcpProxy) -> None:
    """Changes are queued and the server accepts connections but never answers: flush(0.5) says False in time."""
    mem = Memory("silent", client=redis.Redis.from_url(link.url, socket_timeout=3, socket_connect_timeout=3))
    mem.items = []
    link.cut()
    mem.items.append("a")  # the link is cut: offline at once
    link.restore()
    link.silence()
    start = time.monotonic()
    assert not mem.flush(timeout=0.5)
    elapsed = time.monotonic() - start
    assert elapsed < 1.0, f"flush(timeout=0.5) took {elapsed:.1f} s"
    link.silence(False)
    assert mem.flush(timeout=15), mem.status()


def test_calls_that_need_redis_do_not_wait_again_once_offline(link: TcpProxy) -> None:
    """ttl() on a silent link waits one command timeout; while offline, later calls wait at most the connect timeout."""
    mem = Memory("silent", client=redis.Redis.from_url(link.url, socket_timeout=2, socket_connect_timeout=0.3))
    mem.x = 1
    link.silence()
    times = []
    for _ in range(2):
        start = time.monotonic()
        with pytest.raises(ConnectionFailed):
            mem.ttl()
        times.append(time.monotonic() - start)
    assert times[0] < 3.0, f"the first ttl() blocked {times[0]:.1f} s; the command timeout is 2 s"
    assert times[1] < 1.0, f"ttl() while offline blocked {times[1]:.1f} s; the connect timeout is 0.3 s"
    link.silence(False)
    assert mem.flush(timeout=15) and mem.ttl() is None


def test_a_change_whose_reply_timed_out_is_never_reported_refused(own_server: RedisServer) -> None:
    """A list rewrite outlasts the command timeout and the server answers BUSY meanwhile: no error, applied once."""
    admin = redis.Redis(port=own_server.port)
    admin.config_set("busy-reply-threshold", 50)  # milliseconds; 5 s by default
    count = 40_000
    Memory("rewrite", client=admin).big = list(range(count))
    mem = Memory("rewrite", client=redis.Redis(port=own_server.port, socket_timeout=0.2))
    big = mem.big
    big.reverse()  # about 0.7 s on the server
    assert mem.flush(timeout=20), mem.status()
    expected = list(range(count))[::-1]
    assert Memory("rewrite", client=admin).big == expected
    assert mem.big == expected


def test_nothing_listening_fails_the_first_read_within_the_connect_timeout() -> None:
    """With a plain redis.Redis() (which itself retries connecting ten times), one attempt: the connect timeout."""
    from servers import free_port

    mem = Memory("nowhere", client=redis.Redis(port=free_port(), socket_connect_timeout=0.2))
    start = time.monotonic()
    with pytest.raises(ConnectionFailed):
        mem.to_dict()
    elapsed = time.monotonic() - start
    assert elapsed < 1.0, f"the first read took {elapsed:.1f} s; the connect timeout is 0.2 s"
    mem.close()


def test_a_server_restarted_from_an_older_snapshot_is_never_trusted(own_server: RedisServer) -> None:
    """Redis restarted from an older RDB snapshot, then written by others: replicas reload, lost nodes raise."""
    client = redis.Redis.from_url(own_server.url)
    mine = Memory("rolled", url=own_server.url)
    mine.profile = {"name": "A"}
    client.save()  # the snapshot the server will come back with
    mine.old = {"a": 1}
    held = mine.old
    mine.n = 1
    own_server.kill()  # SIGKILL: what was written since the snapshot is lost
    own_server.start()
    theirs = Memory("rolled", client=redis.Redis.from_url(own_server.url))
    theirs.payroll = {}  # handed the node id the lost dict had
    for i in range(3):
        theirs.n = i
    assert mine.to_dict() == {"profile": {"name": "A"}, "payroll": {}, "n": 2}
    with pytest.raises(ContainerDeleted):
        held["salary"] = 100
    assert Memory("rolled", client=redis.Redis.from_url(own_server.url)).payroll == {}
    mine.close()
    theirs.close()
