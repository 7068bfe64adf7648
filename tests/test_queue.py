"""The offline queue: writes while Redis is unreachable, replay, conflicts, bounds, status."""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import REAL_BACKENDS, Switch, all_keys, flush

from redis_memory import (
    ConnectionFailed,
    ContainerDeleted,
    Memory,
    OfflineQueueFull,
    RedisMemoryError,
)
from redis_memory.connection import Channel
from redis_memory.memory import MemoryCore


def offline_pair(switch: Switch, client: redis.Redis, **options: Any) -> tuple[Memory, Memory]:
    """A memory behind the switch, loaded, and one that stays online."""
    mem = Memory("q", client=switch.client(), **options)
    mem.to_dict()
    return mem, Memory("q", client=client)


def test_writes_while_offline_apply_locally_and_replay_in_order(switch: Switch, client: redis.Redis) -> None:
    """Offline changes (nested ones on containers made offline too) show locally, then reach Redis in order."""
    mem, other = offline_pair(switch, client)
    mem.log = ["start"]
    mem.profile = {"name": "A", "tags": ["x"]}
    switch.cut()
    mem.log.append({"step": 1, "items": []})
    mem.log[-1]["items"].append("made offline")
    mem.log[-1]["items"] += ["and more"]
    mem.profile["tags"].insert(0, "first")
    del mem.profile["name"]
    mem.profile.update(age=3)
    mem.log.reverse()
    mem.extra = {"deep": {"er": [1, 2]}}
    mem.extra["deep"]["er"].pop(0)
    expected = {
        "log": [{"step": 1, "items": ["made offline", "and more"]}, "start"],
        "profile": {"tags": ["first", "x"], "age": 3},
        "extra": {"deep": {"er": [2]}},
    }
    assert mem.to_dict() == expected
    status = mem.status()
    assert not status.online and status.pending == 9
    assert isinstance(status.last_error, ConnectionFailed)
    assert other.to_dict() == {"log": ["start"], "profile": {"name": "A", "tags": ["x"]}}
    switch.restore()
    assert mem.flush(timeout=10)
    assert other.to_dict() == expected
    assert mem.to_dict() == expected
    assert mem.status().pending == 0 and mem.status().dropped == 0
    held = mem.extra["deep"]["er"]
    held.append(3)  # a proxy made offline now addresses the server's node
    assert other.extra == {"deep": {"er": [2, 3]}}


def test_after_the_first_failure_writes_do_not_touch_the_network(
    switch: Switch, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One failed attempt, then 100 writes queue without a single command from the writing thread."""
    mem, _ = offline_pair(switch, client)
    mem.items = []
    calls: list[str] = []
    real = Channel.exchange

    def counting(self: Channel, packed: bytes, *args: Any) -> tuple[list[object], bool]:
        calls.append(threading.current_thread().name)
        return real(self, packed, *args)

    monkeypatch.setattr(Channel, "exchange", counting)
    switch.cut()
    mem.items.append(0)
    me = threading.current_thread().name
    assert calls.count(me) == 1
    for i in range(1, 101):
        mem.items.append(i)
    assert calls.count(me) == 1
    assert mem.status().pending == 101
    switch.restore()
    assert mem.flush(timeout=10)
    assert Memory("q", client=client).items == list(range(101))


def test_reads_offline_come_from_the_replica(switch: Switch, client: redis.Redis) -> None:
    """A loaded memory reads offline; a never-loaded one raises ConnectionFailed, which hasattr does not hide."""
    mem, _ = offline_pair(switch, client)
    mem.title = "t"
    fresh = Memory("q", client=switch.client())
    switch.cut()
    assert mem.title == "t" and "title" in dir(mem)
    with pytest.raises(AttributeError):
        _ = mem.never_set
    with pytest.raises(ConnectionFailed) as raised:
        hasattr(fresh, "title")
    assert not isinstance(raised.value, AttributeError)
    with pytest.raises(ConnectionFailed):
        fresh.title = "no replica to apply it to"


def test_a_full_queue_refuses_the_change_and_keeps_the_rest(switch: Switch, client: redis.Redis) -> None:
    """Past max_pending a write raises OfflineQueueFull and changes nothing; the queued ones still replay."""
    mem, other = offline_pair(switch, client, max_pending=3)
    mem.items = []
    switch.cut()
    for i in range(3):
        mem.items.append(i)
    with pytest.raises(OfflineQueueFull) as raised:
        mem.items.append(3)
    assert isinstance(raised.value, RedisMemoryError) and raised.value.key == mem.key
    assert mem.items == [0, 1, 2] and mem.status().pending == 3
    switch.restore()
    assert mem.flush(timeout=10)
    assert other.items == [0, 1, 2]
    with pytest.raises(ValueError):
        Memory("q", client=client, max_pending=0)


def test_change_to_a_container_deleted_meanwhile_is_dropped_and_reported(
    switch: Switch, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A queued write to a dict another writer deleted is dropped, logged and counted; nothing is corrupted."""
    mem, other = offline_pair(switch, client)
    mem.notes = {"a": 1}
    mem.kept = [1]
    notes = mem.notes
    switch.cut()
    notes["b"] = 2
    mem.kept.append(2)
    del other.notes
    other.added = "by other"
    switch.restore()
    with caplog.at_level(logging.WARNING, logger="redis_memory"):
        assert mem.flush(timeout=10) is False  # not every change reached Redis
    assert mem.flush(timeout=10) is True  # nothing more was dropped since
    status = mem.status()
    assert status.dropped == 1 and status.pending == 0
    assert isinstance(status.last_error, ContainerDeleted)
    assert any("dropped" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert other.to_dict() == mem.to_dict() == {"kept": [1, 2], "added": "by other"}
    with pytest.raises(ContainerDeleted):
        notes["c"] = 3


def test_server_that_comes_back_empty_is_not_resurrected(switch: Switch, client: redis.Redis) -> None:
    """If the memory vanished while offline (FLUSHALL, a server without persistence), the queue is discarded."""
    mem, other = offline_pair(switch, client)
    mem.messages = ["kept only if the server keeps it"]
    switch.cut()
    mem.messages.append("queued")
    mem.note = "queued too"
    client.flushall()
    switch.restore()
    assert mem.flush(timeout=10) is False
    assert mem.status().dropped == 2 and mem.flush(timeout=10) is True
    assert all_keys(client, "*") == []
    assert mem.to_dict() == {} and other.to_dict() == {}


def test_memory_first_written_offline_is_created_on_replay(switch: Switch, client: redis.Redis) -> None:
    """A memory that did not exist yet can be written offline; the replay creates it."""
    mem, other = offline_pair(switch, client)
    switch.cut()
    mem.messages = []
    mem.messages.append({"role": "user"})
    mem.messages[0]["content"] = "hi"
    switch.restore()
    assert mem.flush(timeout=10)
    assert other.messages == [{"role": "user", "content": "hi"}]


def test_two_writers_offline_both_keep_their_appends_and_keys(switch: Switch, client: redis.Redis) -> None:
    """Replays send operations, not snapshots: offline appends and sets of different keys by two writers all land."""
    first, _ = offline_pair(switch, client)
    first.log = []
    first.seen = {}
    second = Memory("q", client=switch.client())
    second.to_dict()
    switch.cut()
    for i in range(5):
        first.log.append(("first", i))
        second.log.append(("second", i))
        first.seen[f"first{i}"] = i
        second.seen[f"second{i}"] = i
    switch.restore()
    assert first.flush(timeout=10) and second.flush(timeout=10)
    log = Memory("q", client=client).log
    assert sorted(log) == sorted([("first", i) for i in range(5)] + [("second", i) for i in range(5)])
    assert [x for x in log if x[0] == "first"] == [("first", i) for i in range(5)]
    assert len(Memory("q", client=client).seen) == 10
    assert first.to_dict() == second.to_dict()


def test_flush_reports_whether_the_queue_drained(switch: Switch, client: redis.Redis) -> None:
    """flush(timeout) is False while Redis stays away and True once the queue has reached it."""
    mem, _ = offline_pair(switch, client)
    switch.cut()
    mem.x = 1
    assert mem.flush(timeout=0.3) is False
    assert mem.status().pending == 1
    switch.restore()
    assert mem.flush(timeout=10) is True


def test_going_offline_warns_once_and_draining_is_logged(
    switch: Switch, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """One warning per outage however many writes queue; info once the queue has drained."""
    mem, _ = offline_pair(switch, client)
    mem.items = []
    with caplog.at_level(logging.INFO, logger="redis_memory"):
        switch.cut()
        for i in range(20):
            mem.items.append(i)
        switch.restore()
        assert mem.flush(timeout=10)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()
    assert any("20 queued operations replayed" in r.getMessage() for r in caplog.records)


def test_the_background_reconnect_replays_without_being_asked(switch: Switch, client: redis.Redis) -> None:
    """With no further call on the memory, the queue reaches Redis once it is back."""
    mem, other = offline_pair(switch, client)
    switch.cut()
    mem.x = "queued"
    switch.restore()
    for _ in range(200):
        if client.exists(mem.key) and other.to_dict() == {"x": "queued"}:
            break
        threading.Event().wait(0.05)
    assert other.to_dict() == {"x": "queued"}
    assert mem.status().pending == 0


def test_a_change_queued_while_the_reconnect_thread_finishes_a_replay_is_still_replayed(
    switch: Switch, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The link breaks again just after the reconnect thread replayed the queue: the new change is replayed
    by itself too (the thread once stopped waiting for the memory after its replay, and the change sat)."""
    replayed, go_on = threading.Event(), threading.Event()
    drain = MemoryCore.drain

    def held_after_replay(core: MemoryCore) -> bool:
        done = drain(core)
        if done and threading.current_thread().name == "redis_memory-reconnect" and not replayed.is_set():
            replayed.set()
            go_on.wait(10)  # the thread is held between its replay and what it does next
        return done

    monkeypatch.setattr(MemoryCore, "drain", held_after_replay)
    mem = Memory("replayed", client=switch.client())
    mem.items = []
    switch.cut()
    mem.items.append(1)
    switch.restore()
    assert replayed.wait(20)
    switch.cut()
    mem.items.append(2)  # queued while the thread is held
    go_on.set()
    switch.restore()
    deadline = time.monotonic() + 20
    while Memory("replayed", client=client).items != [1, 2]:
        assert time.monotonic() < deadline, mem.status()
        time.sleep(0.05)
    assert mem.status().pending == 0


def test_delete_needs_the_server(switch: Switch, client: redis.Redis) -> None:
    """delete() while offline raises ConnectionFailed and keeps the queue; online it discards it."""
    mem, _ = offline_pair(switch, client)
    switch.cut()
    mem.x = 1
    with pytest.raises(ConnectionFailed):
        mem.delete()
    switch.restore()
    mem.delete()
    assert mem.status().pending == 0 and all_keys(client, "*") == []


def _child_writes_offline(mem: Memory, cut: Any, written: Any) -> None:
    cut.wait(10)
    for i in range(10):
        mem.items.append(i)
    assert mem.status().pending == 10
    written.set()
    assert mem.flush(timeout=20)


@pytest.mark.parametrize("backend", REAL_BACKENDS)  # a forked child shares no fakeredis server with its parent
def test_a_forked_child_queues_and_reconnects_on_its_own(switch: Switch, client: redis.Redis) -> None:
    """After fork the child has its own queue and reconnect thread; its offline writes land once."""
    mem, other = offline_pair(switch, client)
    mem.items = []
    ctx = multiprocessing.get_context("fork")
    cut, written = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_child_writes_offline, args=(mem, cut, written))
    child.start()
    switch.cut()
    cut.set()
    assert written.wait(20)
    switch.restore()
    child.join(30)
    assert child.exitcode == 0
    assert other.items == list(range(10))
    assert mem.status().pending == 0


EXIT_SCRIPT = """
import sys
import redis
from netproxy import TcpProxy
from redis_memory import Memory
proxy = TcpProxy(int(sys.argv[1]))
mem = Memory("exit", client=redis.Redis.from_url(proxy.url))
mem.x = 1
proxy.cut()
mem.y = 2
"""


def test_a_process_exiting_with_an_unsent_queue_says_so(servers: dict[str, Any]) -> None:
    """Without a spool, operations still queued at exit are reported as lost on stderr, not dropped silently."""
    tests = str(Path(__file__).resolve().parent)
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(servers["redis7"].port)],
                          capture_output=True, text=True, timeout=60, cwd=tests)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "1 queued operations never reached Redis and are lost" in done.stderr


SPOOLED_EXIT_SCRIPT = """
import sys
import redis
from netproxy import TcpProxy
from redis_memory import Memory
proxy = TcpProxy(int(sys.argv[1]))
mem = Memory("spooled-exit", client=redis.Redis.from_url(proxy.url, socket_connect_timeout=1), spool=sys.argv[2])
mem.items = []
proxy.cut()
for i in range(5):
    mem.items.append(i)
assert mem.status().pending == 5
proxy.restore()
mem.stats()  # a probe finds Redis back: online, the queue not replayed yet
print("pending", mem.status().pending)
"""


def test_a_spooled_queue_still_queued_at_exit_is_replayed_whole(servers: dict[str, Any], tmp_path: Path) -> None:
    """Online at exit with a spooled queue: the exit replays every operation, and the spool is left empty.

    (The spool's own cleanup at exit once ran first and closed its file, so the replay stopped after one
    operation and later records went to whatever reused the file's descriptor: the connection to Redis.)
    """
    flush(servers, "redis7")
    tests = str(Path(__file__).resolve().parent)
    done = subprocess.run([sys.executable, "-c", SPOOLED_EXIT_SCRIPT, str(servers["redis7"].port), str(tmp_path)],
                          capture_output=True, text=True, timeout=60, cwd=tests)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    direct = redis.Redis.from_url(servers["redis7"].url)
    assert Memory("spooled-exit", client=direct).items == [0, 1, 2, 3, 4]
    left = [path.stat().st_size for path in tmp_path.rglob("*.spool")]
    assert sum(left) == 0, left


def test_proxies_of_a_memory_created_offline_stay_live_after_the_replay(switch: Switch, client: redis.Redis) -> None:
    """A list made offline in a memory that did not exist yet is still the same live proxy once replayed."""
    mem, other = offline_pair(switch, client)
    switch.cut()
    mem.items = [1]
    held = mem.items
    held.append(2)
    switch.restore()
    assert mem.flush(timeout=10)
    held.append(3)
    assert other.items == [1, 2, 3] and held is mem.items


def test_old_proxy_of_a_memory_recreated_while_offline_raises(switch: Switch, client: redis.Redis) -> None:
    """The memory was deleted and recreated elsewhere while offline: an old proxy raises, the new data is untouched."""
    mem, other = offline_pair(switch, client)
    mem.items = ["mine"]
    held = mem.items
    switch.cut()
    mem.x = 1
    other.delete()
    other.unrelated = ["someone else's"]  # a new list, which may get the old one's node id
    switch.restore()
    assert mem.flush(timeout=10) is False  # x = 1 was made on the memory deleted since: dropped
    assert mem.status().dropped == 1
    with pytest.raises(ContainerDeleted):
        held.append("through the old proxy")
    assert other.to_dict() == {"unrelated": ["someone else's"]}


def test_a_memory_let_go_while_offline_still_replays(switch: Switch, client: redis.Redis) -> None:
    """Queued changes outlive the Memory object that made them: they reach Redis once it is back."""
    mem, other = offline_pair(switch, client)
    mem.log = ["start"]
    switch.cut()
    mem.log.append("offline")
    del mem
    gc.collect()
    switch.restore()
    deadline = time.monotonic() + 20
    while other.log != ["start", "offline"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_resent_operation_then_lost_link_is_applied_once(switch: Switch, client: redis.Redis) -> None:
    """A resend answered 'dup', then the link drops before the replica catches up: the change is not made twice."""
    mem, other = offline_pair(switch, client)
    other.log = []
    mem.to_dict()
    other.log.append("other")  # mem's replica is behind: it must catch up after its own write
    store = mem._rm.store
    real = store.apply

    def resend_then_cut(*args: Any) -> Any:
        real(*args)  # the first copy lands, its reply is lost
        reply = real(*args)
        switch.cut()
        return reply

    store.apply = resend_then_cut
    mem.log.append("once")
    store.apply = real
    switch.restore()
    assert mem.flush(timeout=10)
    assert other.log == ["other", "once"] and mem.log == ["other", "once"]


def test_spool_keeps_node_ids_learned_before_the_process_died(
    switch: Switch, client: redis.Redis, tmp_path: Path
) -> None:
    """The replay got half way (a list created, its append not yet sent) when the process died: nothing is lost."""
    mem = Memory("q", client=switch.client(), spool=tmp_path)
    mem.seed = 0
    switch.cut()
    mem.log = []
    mem.log.append("kept")
    core = mem._rm
    real = core.store.apply
    calls = []

    def cut_after_the_first(*args: Any) -> Any:
        calls.append(args)
        if len(calls) == 2:
            switch.cut()
        return real(*args)

    # The reconnect thread of the cut waits for the lock: this test plays the replay, and the death, itself.
    with core.lock:
        switch.restore()
        core.store.apply = cut_after_the_first
        assert core.link.probe() and not core.drain()
        spool = core.outbox.spool
        assert spool is not None and spool.fd is not None
        spool._release.detach()
        os.close(spool.fd)  # the process dies: its lock goes with it
        spool.fd = None
        core.outbox.entries.clear()
    switch.restore()
    assert client.hget(Memory("q", client=client).key, "v") is not None
    assert "log" in Memory("q", client=client).to_dict() and Memory("q", client=client).log == []
    heir = Memory("q", client=client, spool=tmp_path)  # adopts the queue (its thread may replay it at once)
    assert heir.flush(timeout=10) and heir.status().dropped == 0
    assert Memory("q", client=client).to_dict() == {"seed": 0, "log": ["kept"]}


def test_setdefault_offline_in_two_writers_keeps_both_appends(switch: Switch, client: redis.Redis) -> None:
    """Both writers setdefault the same list offline and append to it: the replay appends both to one list,
    once each (in the order the two queues happen to replay: each link reconnects on its own)."""
    base = Memory("q", client=client)
    base.data = {}
    first = Memory("q", client=switch.client())
    second = Memory("q", client=switch.client())
    first.to_dict(), second.to_dict()
    switch.cut()
    first.data.setdefault("log", []).append("from first")
    second.data.setdefault("log", []).append("from second")
    switch.restore()
    assert first.flush(timeout=10) and second.flush(timeout=10)
    assert sorted(base.data["log"]) == ["from first", "from second"]
    assert list(base.data) == ["log"]
    assert second.status().dropped == 0


def test_a_spooled_operation_keeps_its_author(switch: Switch, client: redis.Redis, tmp_path: Path) -> None:
    """Replayed by another process's memory, a spooled change is still announced as its author's."""
    mem = Memory("authored", client=switch.client(), spool=tmp_path, author="alice")
    mem.log = []
    switch.cut()
    mem.log.append("offline")
    assert mem._rm.outbox.spool is not None and mem._rm.outbox.spool.fd is not None
    os.close(mem._rm.outbox.spool.fd)  # the process dies: its lock goes with it
    mem._rm.outbox.spool.fd = None
    mem._rm.outbox.entries.clear()
    switch.restore()
    with Memory("authored", client=client).subscribe() as feed:
        heir = Memory("authored", client=client, spool=tmp_path, author="bob")
        assert heir.flush(timeout=10)
        event = feed.get(timeout=10)
    assert event is not None and (event.op, event.path, event.author) == ("append", ("log", 0), "alice")


def test_spool_keeps_changes_inside_a_container_made_offline(
    switch: Switch, client: redis.Redis, tmp_path: Path
) -> None:
    """A list made offline and appended to, then the process dies: the heir replays the list and the append."""
    mem = Memory("q", client=switch.client(), spool=tmp_path)
    mem.seed = 0
    switch.cut()
    mem.todo = []
    mem.todo.append("x")
    mem.box = {"items": []}
    mem.box["items"].append(1)
    spool = mem._rm.outbox.spool
    assert spool is not None and spool.fd is not None
    os.close(spool.fd)  # the process dies: its lock goes with it
    spool.fd = None
    mem._rm.outbox.entries.clear()
    switch.restore()
    heir = Memory("q", client=client, spool=tmp_path)
    assert heir.flush(timeout=10) and heir.status().dropped == 0
    assert Memory("q", client=client).to_dict() == {"seed": 0, "todo": ["x"], "box": {"items": [1]}}
