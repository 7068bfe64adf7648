"""``tracking=True``: replicas kept coherent by server-assisted invalidation (CLIENT TRACKING).

On Redis 7.0 and Valkey a tracked read of unchanged data makes no round
trip, and a read made after an invalidation arrived is fresh. fakeredis and
a Redis Cluster cannot track: there every read checks the version, and the
answers are the same.
"""

from __future__ import annotations

import multiprocessing
import os
import selectors
import sys
import threading
import time
from typing import Any

import pytest
import redis
from conftest import Switch
from servers import raw_client

from redis_memory import ConversationMemory, Memory
from redis_memory.tracking import Tracker

TRACKING_BACKENDS = ("redis7", "valkey")


def channel_of(mem: Memory) -> Any:
    return mem._rm.store.channel


def trips(mem: Memory) -> int:
    """Round trips made so far on the memory's connection (0 on a cluster, which counts per node)."""
    return int(getattr(channel_of(mem), "round_trips", 0))


def tracks(mem: Memory, backend: str) -> bool:
    tracker = mem._rm.store.tracker
    tracking = tracker is not None and bool(tracker.enabled)
    assert tracking == (backend in TRACKING_BACKENDS)
    return tracking


def wait_for_invalidation(mem: Memory, timeout: float = 5.0) -> None:
    """Until bytes wait on the memory's tracked connection: the server's invalidation has arrived."""
    with selectors.DefaultSelector() as waiting:  # not select(), which fails on a descriptor past 1023
        waiting.register(channel_of(mem).conn._sock, selectors.EVENT_READ)
        assert waiting.select(timeout), "no invalidation arrived"


def warm(mem: Memory, name: str) -> None:
    """Two reads: the first opens the connection (a new one voids every mark), the second makes a mark."""
    getattr(mem, name)
    getattr(mem, name)


def test_tracked_reads_of_unchanged_data_make_no_round_trip(client: Any, backend: str) -> None:
    mem = ConversationMemory("t1", client=client, tracking=True)
    mem.title = "weather"
    mem.messages = [{"role": "user", "content": "hi"}]
    warm(mem, "title")
    before = trips(mem)
    for _ in range(50):
        assert mem.title == "weather"
        assert len(mem.messages) == 1
    if tracks(mem, backend):
        assert trips(mem) == before
    elif backend != "cluster":
        assert trips(mem) == before + 100  # the version check, once per read


def test_a_read_after_the_invalidation_arrived_is_fresh(client: Any, other_client: Any, backend: str) -> None:
    mem = Memory("t2", client=client, tracking=True)
    writer = Memory("t2", client=other_client)
    writer.n = 0
    writer.items = []
    warm(mem, "n")
    for i in range(1, 60):
        writer.n = i
        if i % 3 == 0:
            writer.items.append(i)
        if tracks(mem, backend):
            wait_for_invalidation(mem)
        assert mem.n == i
        assert list(mem.items) == list(range(3, i + 1, 3))
        if tracks(mem, backend):
            # Caught up by the delta: the next read is free again.
            before = trips(mem)
            assert mem.n == i
            assert trips(mem) == before


def test_read_your_writes_with_no_extra_round_trip(client: Any, backend: str) -> None:
    mem = ConversationMemory("t3", client=client, tracking=True)
    mem.messages = []
    warm(mem, "messages")
    for i in range(30):
        before = trips(mem)
        mem.messages.append({"n": i})
        mem.turns = i
        assert mem.turns == i
        assert mem.messages[-1] == {"n": i}
        assert len(mem.messages) == i + 1
        if tracks(mem, backend):
            assert trips(mem) == before + 2  # the two writes, and no read


def test_two_tracked_memories_on_one_key_in_one_process_see_each_others_writes(client: Any, backend: str) -> None:
    # Different options, so two cores (two replicas) over the one tracked
    # connection, whose own writes the server does not report back (NOLOOP).
    first = Memory("t4", client=client, tracking=True)
    second = Memory("t4", client=client, tracking=True, max_pending=7)
    assert first._rm is not second._rm
    first.n = 0
    first.d = {}
    warm(second, "n")
    for i in range(1, 20):
        first.n = i
        first.d[str(i)] = i
        assert second.n == i
        assert dict(second.d) == {str(k): k for k in range(1, i + 1)}
        second.n = -i
        assert first.n == -i
    tracks(first, backend)


def test_a_tracked_and_an_untracked_memory_in_one_process(client: Any, backend: str) -> None:
    tracked = Memory("t5", client=client, tracking=True)
    plain = Memory("t5", client=client)
    assert tracked._rm is not plain._rm
    plain.n = 0
    warm(tracked, "n")
    for i in range(1, 20):
        plain.n = i
        if tracks(tracked, backend):
            wait_for_invalidation(tracked)
        assert tracked.n == i
        tracked.n = -i
        assert plain.n == -i


def test_an_untracked_write_of_the_process_is_read_at_once_by_a_tracked_memory(
    client: Any, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server's invalidations are held back (as on a slow link): the
    # process knows of its own writes without them, whichever connection
    # carried them.
    held: list[tuple[Tracker, list[Any]]] = []
    monkeypatch.setattr(Tracker, "push", lambda self, message: held.append((self, message)))
    tracked = ConversationMemory("t5b", client=client, tracking=True)
    plain = ConversationMemory("t5b", client=client)
    plain.title = "first"
    plain.messages = []
    warm(tracked, "title")
    for i in range(10):
        plain.title = f"title {i}"
        assert tracked.title == f"title {i}"
        plain.messages.append({"n": i})
        assert tracked.messages[-1] == {"n": i}
    plain.expire(60)
    assert 0 < tracked.ttl() <= 60
    plain.delete()
    assert "title" not in tracked and "messages" not in tracked
    tracks(tracked, backend)
    monkeypatch.undo()
    for tracker, message in held:
        tracker.push(message)


def test_a_killed_tracked_connection_falls_back_to_the_version_check(
    client: Any, other_client: Any, backend: str
) -> None:
    if backend not in TRACKING_BACKENDS:
        pytest.skip("only a tracked connection can be killed under a tracked memory")
    mem = Memory("t6", client=client, tracking=True)
    writer = Memory("t6", client=other_client)
    writer.n = 0
    warm(mem, "n")
    assert tracks(mem, backend)
    for i in range(1, 6):
        tracked_id = channel_of(mem).call(b"CLIENT", b"ID")
        # Killed, then written while nobody is told: the read finds the connection closed.
        assert other_client.client_kill_filter(_id=tracked_id)
        writer.n = i
        assert mem.n == i
        warm(mem, "n")
        before = trips(mem)
        assert mem.n == i
        assert trips(mem) == before


def test_a_cut_link_then_a_write_elsewhere_is_seen_after_the_reconnect(switch: Any, client: Any, backend: str) -> None:
    cut_client = switch.client()
    mem = Memory("t7", client=cut_client, tracking=True)
    mem.n = 0
    warm(mem, "n")
    writer = Memory("t7", client=client)
    switch.cut()
    writer.n = 1  # the server cannot tell the tracked connection: it is cut
    switch.restore()
    deadline = time.monotonic() + 10
    while mem.n != 1:  # offline, the replica is served as it is until the link is back
        assert time.monotonic() < deadline, "the tracked memory never saw the write made during the cut"
        time.sleep(0.05)
    writer.n = 2
    if tracks(mem, backend):
        wait_for_invalidation(mem)
    assert mem.n == 2
    mem.close()


def test_tracking_table_overflow_evicts_into_invalidations(client: Any, other_client: Any, backend: str) -> None:
    if backend not in TRACKING_BACKENDS:
        pytest.skip("fakeredis and a cluster do not track")
    old = other_client.config_get("tracking-table-max-keys")["tracking-table-max-keys"]
    other_client.config_set("tracking-table-max-keys", 1)
    try:
        mems = [Memory(f"t8-{n}", client=client, tracking=True) for n in range(5)]
        writers = [Memory(f"t8-{n}", client=other_client) for n in range(5)]
        for round_ in range(10):
            for writer in writers:
                writer.n = round_
            for mem in mems:
                # Reading one key evicts another from the one-key table: the
                # server invalidates it, so no replica is trusted past its eviction.
                assert mem.n == round_
                assert mem.n == round_
    finally:
        other_client.config_set("tracking-table-max-keys", old)


def test_flushall_invalidates_everything(client: Any, other_client: Any, backend: str) -> None:
    mem = Memory("t9", client=client, tracking=True)
    mem.n = 1
    warm(mem, "n")
    other_client.flushall()
    if tracks(mem, backend):
        wait_for_invalidation(mem)
    with pytest.raises(AttributeError):
        _ = mem.n


def test_own_expiry_and_delete_keep_later_invalidations(client: Any, other_client: Any, backend: str) -> None:
    mem = Memory("t10", client=client, tracking=True)
    writer = Memory("t10", client=other_client)
    mem.n = 0
    warm(mem, "n")
    mem.expire(60)  # a write the server stops tracking the key after
    assert mem.n == 0
    writer.n = 1
    if tracks(mem, backend):
        wait_for_invalidation(mem)
    assert mem.n == 1
    mem.delete()
    with pytest.raises(AttributeError):
        _ = mem.n
    writer.n = 2
    if tracks(mem, backend):
        wait_for_invalidation(mem)
    assert mem.n == 2


def _tracked_reader(url: str, rounds: int, results: Any) -> None:
    client = redis.Redis.from_url(url)
    mem = Memory("t11", client=client, tracking=True)
    stale = 0
    for i in range(rounds):
        while client.get("t11-round") != str(i).encode():  # the writer's round i is done
            pass
        stale += mem.n != i  # demanded at once, without a sleep
        client.set("t11-ack", i)
    results.put((stale, mem._rm.store.channel.round_trips))
    mem.close()


def test_a_reader_in_another_process_never_serves_a_copy_older_than_a_write_before_its_read(real_url: str) -> None:
    # The writer's write completes, then it announces the round by a plain
    # SET; the reader sees the round, then reads. The server sent the
    # invalidation when it applied the write, before the SET, down the
    # reader's own connection: so it has arrived before the reader asks.
    client = raw_client(real_url)
    if isinstance(client, redis.RedisCluster):
        pytest.skip("a cluster does not track")
    writer = Memory("t11", client=client)
    writer.n = -1
    client.set("t11-round", -1)
    rounds = 200
    context = multiprocessing.get_context("spawn")
    results: Any = context.Queue()
    reader = context.Process(target=_tracked_reader, args=(real_url, rounds, results))
    reader.start()
    try:
        for i in range(rounds):
            writer.n = i
            client.set("t11-round", i)
            deadline = time.monotonic() + 30
            while client.get("t11-ack") != str(i).encode():
                assert time.monotonic() < deadline and reader.is_alive(), "the reader stopped answering"
        stale, round_trips = results.get(timeout=60)
        assert stale == 0
        # One version check per round at most, and one sync after each write: far from a check per poll.
        assert round_trips <= 3 * rounds + 10
    finally:
        reader.join(30)
        if reader.is_alive():
            reader.kill()
    assert reader.exitcode == 0


def test_a_forked_child_reads_fresh_with_tracking(client: Any, other_client: Any, backend: str) -> None:
    if backend in ("fakeredis", "cluster") or not hasattr(os, "fork"):
        pytest.skip("a forked child here needs a single real server")
    mem = Memory("t12", client=client, tracking=True)
    writer = Memory("t12", client=other_client)
    writer.n = 0
    warm(mem, "n")
    pid = os.fork()
    if pid == 0:  # the child: its own connection, its own marks
        code = 1
        try:
            writer_child = Memory("t12", client=other_client, max_pending=3)  # a core of its own
            ok = mem.n == 0
            writer_child.n = 5
            ok = ok and mem.n == 5
            code = 0 if ok else 1
        except BaseException as exc:
            print("child failed:", repr(exc), flush=True)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    if tracks(mem, backend):
        wait_for_invalidation(mem)
    assert mem.n == 5


def test_an_invalidation_taken_in_by_another_thread_during_a_write_is_not_lost(
    client: Any, other_client: Any, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two cores on one tracked connection. While the writer's thread settles
    # its write, another process writes and a reader's thread takes that
    # invalidation in: the writer's replica must not keep a mark that hides it.
    from redis_memory import tracking

    writer = Memory("t13", client=client, tracking=True, author="writer")
    reader = Memory("t13", client=client, tracking=True, author="reader")
    other = Memory("t13", client=other_client)
    writer.x = 0
    warm(writer, "x")
    warm(reader, "x")
    original, slow = tracking.Tracker.changed, threading.Event()

    def changed(self: Any, key: bytes) -> None:
        original(self, key)
        if threading.current_thread().name == "t13-writer" and slow.is_set():
            time.sleep(0.5)  # a thread switch here, as the interpreter may make at any bytecode

    monkeypatch.setattr(tracking.Tracker, "changed", changed)
    slow.set()
    thread = threading.Thread(target=lambda: setattr(writer, "x", 1), name="t13-writer")
    thread.start()
    time.sleep(0.15)  # the write has its reply; the writer's thread is settling it
    other.z = "foreign"
    time.sleep(0.1)  # its invalidation has reached the tracked connection
    assert reader.z == "foreign"
    thread.join()
    slow.clear()
    assert writer.z == "foreign"


def test_closing_the_last_tracked_memory_closes_its_connections(servers: Any, backend: str, client: Any) -> None:
    if backend not in TRACKING_BACKENDS:
        pytest.skip("counted on a single real server")
    pool = client.connection_pool
    own = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class,
                                                           **pool.connection_kwargs))  # fmt: skip
    before = {entry["id"] for entry in client.client_list()}
    mem = Memory("t14", client=own, tracking=True)
    mem.x = 1
    assert mem.x == 1
    mem.close()
    own.close()
    deadline = time.monotonic() + 5
    while True:
        left = [(e["id"], e["cmd"]) for e in client.client_list() if e["id"] not in before]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert left == []


def test_a_silent_link_is_not_trusted_past_the_trust_period(switch: Any, client: Any, backend: str) -> None:
    # A partition that drops everything without closing: no invalidation can
    # come. A tracked read trusts a quiet connection for a bounded time only,
    # then checks the version, and so finds out that Redis is unreachable.
    if backend not in TRACKING_BACKENDS:
        pytest.skip("a partition of a tracked connection")
    from redis_memory.tracking import TRUST_SECONDS

    assert switch.proxy is not None
    cut_client = redis.Redis.from_url(switch.proxy.url, socket_connect_timeout=1, socket_timeout=1)
    mem = Memory("t15", client=cut_client, tracking=True)
    mem.n = 0
    warm(mem, "n")
    switch.silence()
    Memory("t15", client=client).n = 1
    time.sleep(TRUST_SECONDS + 0.2)
    assert mem.n == 0  # served as it is, offline: the replica of an unreachable memory
    assert not mem.status().online
    switch.silence(False)
    deadline = time.monotonic() + 10
    while mem.n != 1:
        assert time.monotonic() < deadline, "the tracked memory never caught up after the partition"
        time.sleep(0.05)
    mem.close()


def test_what_sends_no_invalidation_is_seen_within_the_trust_period(
    client: Any, other_client: Any, backend: str
) -> None:
    # SWAPDB sends no invalidation: a tracked replica is trusted for a bounded time only.
    if backend not in TRACKING_BACKENDS:
        pytest.skip("SWAPDB on a single real server")
    from redis_memory.tracking import TRUST_SECONDS

    mem = Memory("t16", client=client, tracking=True)
    mem.x = "db0"
    warm(mem, "x")
    pool = client.connection_pool
    settings = {**pool.connection_kwargs, "db": 1}
    elsewhere = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **settings))
    elsewhere.flushdb()
    Memory("t16", client=elsewhere).x = "db1"
    other_client.swapdb(0, 1)
    try:
        time.sleep(TRUST_SECONDS + 0.1)
        assert mem.x == "db1"
    finally:
        other_client.swapdb(0, 1)
        elsewhere.flushdb()


def test_trackers_made_in_threads_while_another_thread_writes() -> None:
    # Every write's settling walks the process's trackers while other threads
    # may be opening tracked connections: the walk must not fail a write that
    # Redis has applied.
    from redis_memory import tracking

    failures: list[BaseException] = []
    made: list[Tracker] = []
    stop = threading.Event()

    def write() -> None:
        try:
            while not stop.is_set():
                tracking.wrote_elsewhere(b"rm:{t-threads}")
        except BaseException as error:  # the test reports it
            failures.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # thread switches as often as the interpreter allows
    writers = [threading.Thread(target=write) for _ in range(2)]
    for thread in writers:
        thread.start()
    try:
        for _ in range(20_000):
            made.append(Tracker())
            if len(made) > 2_000:
                del made[:1_000]  # dropped trackers leave the weak set as others join it
    finally:
        stop.set()
        for thread in writers:
            thread.join()
        sys.setswitchinterval(interval)
    assert failures == []


@pytest.mark.parametrize("held", ["a tracker's lock", "the tracker registry's lock"])
def test_a_fork_while_another_thread_holds_a_tracking_lock_leaves_the_child_working(
    client: Any, other_client: Any, backend: str, held: str
) -> None:
    # A lock another thread holds at the fork stays held in the child, where
    # nobody can release it: the library's at-fork handler must not wait for it.
    from redis_memory import tracking

    if backend in ("fakeredis", "cluster") or not hasattr(os, "fork"):
        pytest.skip("a forked child here needs a single real server")
    mem = Memory("t-fork-lock", client=client, tracking=True)
    mem.n = 1
    warm(mem, "n")
    lock = mem._rm.store.tracker.lock if held == "a tracker's lock" else tracking._TRACKERS_LOCK
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            taken.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    assert taken.wait(5)
    pid = os.fork()
    if pid == 0:  # the child: reads, writes, and a new tracked memory on a new client
        code = 1
        try:
            mem.n = 2
            pool = other_client.connection_pool
            fresh = redis.Redis(connection_pool=redis.ConnectionPool(pool.connection_class, **pool.connection_kwargs))
            other = Memory("t-fork-lock", client=fresh, tracking=True)
            code = 0 if (mem.n, other.n) == (2, 2) else 1
        except BaseException as exc:
            print("child failed:", repr(exc), flush=True)
        finally:
            os._exit(code)
    release.set()
    holder.join()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail(f"the forked child hung: {held} was held at the fork")


def test_tracked_memories_let_go_leave_no_tracker_behind(real_url: str) -> None:
    # Every write of the process tells each live tracker: trackers of closed
    # memories on clients let go of must be collected, or writes slow down
    # with every tracked memory ever opened.
    import gc
    import weakref

    from redis_memory import keep_memories
    from redis_memory.memory import _shared

    limit = _shared.limit
    keep_memories(0)
    try:
        made = []
        for _ in range(30):
            with Memory("t-let-go", client=raw_client(real_url), tracking=True) as mem:
                mem.n = 1
                assert mem.n == 1
                if mem._rm.store.tracker is not None:
                    made.append(weakref.ref(mem._rm.store.tracker))
        del mem
        deadline = time.monotonic() + 5  # a closed memory's link thread may take a moment to end
        while gc.collect() >= 0 and any(ref() is not None for ref in made) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [ref for ref in made if ref() is not None] == []
    finally:
        keep_memories(limit)


@pytest.mark.parametrize("backend", ["redis7", "valkey"])
def test_a_malformed_invalidation_is_a_broken_link_and_a_write_lands_once(switch: Switch, client: redis.Redis) -> None:
    """A push Redis never sends (keys that are a number) before a tracked write's reply: not an error of the
    user's statement, the link is dropped, the write (applied or not) lands exactly once, reads check again."""
    with ConversationMemory("pushed", client=switch.client(), tracking=True) as mem:
        mem.messages = [{"role": "user", "content": "kept"}]
        switch.inject(b">2\r\n$10\r\ninvalidate\r\n:5\r\n")
        mem.messages.append({"role": "user", "content": "once"})
        assert mem.flush(timeout=10)
        ConversationMemory("pushed", client=client).title = "elsewhere"
        assert mem.title == "elsewhere"
    contents = [m["content"] for m in ConversationMemory("pushed", client=client).messages]
    assert contents == ["kept", "once"]
