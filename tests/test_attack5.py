"""Adversarial pass on shared cores (one MemoryCore per server, key and options in a process)."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest
import redis
from conftest import Switch

from redis_memory import ConnectionFailed, Memory, MemoryClosed, keep_memories


@pytest.fixture(autouse=True)
def default_limit() -> Any:
    yield
    keep_memories(256)


def fresh(client: redis.Redis, name: str) -> dict[str, Any]:
    """What another process reading the memory now sees."""
    other = redis.Redis(connection_pool=redis.ConnectionPool(**client.connection_pool.connection_kwargs))
    mem = Memory(name, client=other)
    try:
        return mem.to_dict()
    finally:
        mem.close()


# -- fork --------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_a_child_forked_after_a_close_writes_as_its_parent_and_one_write_is_lost(real_url: str) -> None:
    """A web server (pre-fork model) served a request on "f" and closed the memory, so its core
    sits in the reuse cache, closed. It forks a worker. Parent and child each build Memory("f")
    again and each write one field. The cached closed core is not among the live cores, so the
    child keeps the parent's writer id and sequence number: both send the same (writer, seq), the
    second is answered 'dup' and silently dropped. The user sees one of the two fields missing."""
    mem = Memory("f", url=real_url)
    mem.seed = 0
    mem.close()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            child = Memory("f", url=real_url)
            child.child = "written"
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    parent = Memory("f", url=real_url)
    parent.parent = "written"
    parent.close()
    stored = redis.Redis.from_url(real_url)
    reader = Memory("f", client=stored)
    assert reader.to_dict() == {"seed": 0, "child": "written", "parent": "written"}
    reader.close()


# -- the server changing under a cached replica --------------------------------


def test_a_cached_replica_after_flushall_and_a_rebuild_by_another_process(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """A closed memory's replica sits in the cache; the server is flushed and another process
    writes the memory anew. The next memory built here must show what Redis holds."""
    mem = Memory("fl", client=client)
    mem.a = 1
    mem.b = [1, 2]
    mem.close()
    client.flushall()
    other = Memory("fl", client=other_client)
    other.c = 3
    other.close()
    again = Memory("fl", client=client)
    assert again.to_dict() == {"c": 3}
    again.close()


def test_a_cached_replica_after_a_rollback_of_its_hash(client: redis.Redis, other_client: redis.Redis) -> None:
    """The hash is put back to an earlier state of itself (RESTORE of a DUMP taken before the last
    writes, as a restore from backup does) while this process's replica sits in the cache. The
    next memory built here must serve the restored data, not the writes Redis no longer holds."""
    mem = Memory("rb", client=client)
    mem.a = 1
    dumped = client.dump(mem.key)
    mem.b = 2
    mem.a = 10
    mem.close()
    client.restore(mem.key, 0, dumped, replace=True)
    again = Memory("rb", client=client)
    assert again.to_dict() == {"a": 1}
    again.close()


def test_a_cached_replica_after_its_key_expired_and_another_process_wrote(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """A memory with a ttl is cached closed; its key is removed (expired) and another process
    writes the same number of changes afresh. The next memory built here shows the new data."""
    mem = Memory("ex", client=client, ttl=60)
    mem.a = 1
    mem.close()
    client.delete(mem.key)
    other = Memory("ex", client=other_client, ttl=60)
    other.z = 9
    other.close()
    again = Memory("ex", client=client, ttl=60)
    assert again.to_dict() == {"z": 9}
    again.close()


# -- the reuse cache evicting what is being taken --------------------------------


def test_a_memory_built_while_another_thread_builds_one_is_not_closed_under_it(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With keep_memories(0), thread A builds Memory("a") on a core kept idle; before A's object
    registers as its holder, the main thread builds Memory("b"), whose take() trims every idle
    core but its own, and closes A's. A web app building memories per request in several threads
    then gets MemoryClosed ("was closed here") from a memory it just built and never closed
    (keep_memories() called meanwhile trims it the same way)."""
    from redis_memory import memory as memory_module

    first = Memory("a", client=client)
    first.x = 1
    first.close()  # its core is idle now, kept for reuse
    keep_memories(1)
    real_adopt = memory_module.MemoryCore.adopt
    in_take, go = threading.Event(), threading.Event()

    def slow_adopt(self: Any) -> None:
        if self.store.key.endswith("{a}") and threading.current_thread().name == "builder":
            in_take.set()
            go.wait(10)
        real_adopt(self)

    monkeypatch.setattr(memory_module.MemoryCore, "adopt", slow_adopt)
    built: list[Memory] = []
    t = threading.Thread(target=lambda: built.append(Memory("a", client=client)), name="builder")
    t.start()
    assert in_take.wait(10)
    keep_memories(0)
    b = Memory("b", client=client)
    go.set()
    t.join(10)
    a = built[0]
    try:
        a.y = 2  # MemoryClosed: "rm:memory:{a} was closed here; open a new memory to use it"
        assert a.x == 1
    finally:
        a.close()
        b.close()


# -- closing while offline -------------------------------------------------------


def test_a_memory_built_after_a_close_that_lost_offline_writes_serves_them(switch: Switch, client: redis.Redis) -> None:
    """Offline, without a spool: mem.balance = 0 is queued, then mem.close() logs that it never
    reached Redis and is lost. The core is kept closed for reuse with that write still in its
    replica. A memory built again on the same key (still offline) serves balance == 0 as if it
    were stored, although Redis never held it and never will; before cores were shared it raised
    ConnectionFailed (never loaded here), and another process sees no balance at all."""
    behind = switch.client()
    mem = Memory("lost", client=behind)
    mem.seed = 1
    switch.cut()
    mem.balance = 0  # queued
    mem.close(timeout=0.2)  # logged: closed with 1 queued operations ... lost
    again = Memory("lost", client=behind)
    try:
        try:
            seen = again.to_dict()
        except ConnectionFailed:  # never loaded here: what a memory built offline said before
            seen = {}
        assert "balance" not in seen
    finally:
        again.close(timeout=0)
        switch.restore()
    assert Memory("lost", client=client).to_dict() == {"seed": 1}


def test_offline_writes_through_a_closed_and_rebuilt_spooled_memory_replay_exactly_once(
    switch: Switch, client: redis.Redis, tmp_path: Any
) -> None:
    """Offline with a spool: an append is queued, the memory closed (left in the spool), built again
    (the spool adopted), closed and built again; back online the append reaches Redis exactly once."""
    behind = switch.client()
    mem = Memory("sp", client=behind, spool=tmp_path)
    mem.log = ["start"]
    switch.cut()
    mem.log.append("one")
    mem.close(timeout=0.2)
    mem = Memory("sp", client=behind, spool=tmp_path)
    assert mem.status().pending == 1
    mem.close(timeout=0.2)
    mem = Memory("sp", client=behind, spool=tmp_path)
    assert mem.status().pending == 1
    switch.restore()
    try:
        assert mem.flush(timeout=10)
    finally:
        mem.close()
    assert Memory("sp", client=client).to_dict() == {"log": ["start", "one"]}
    assert Memory("sp", client=behind, spool=tmp_path).to_dict() == {"log": ["start", "one"]}


# -- threads building and closing memories on one key -------------------------------


def _pause_core_close(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make the next MemoryCore.close (from a thread named "closer") wait, as a busy machine may, between
    Memory.close finding no other holder and the core's close taking its lock."""
    from redis_memory import memory as memory_module

    real_close = memory_module.MemoryCore.close
    entered, go = threading.Event(), threading.Event()

    def slow_close(self: Any, timeout: float) -> None:
        if threading.current_thread().name == "closer":
            entered.set()
            go.wait(10)
        real_close(self, timeout)

    monkeypatch.setattr(memory_module.MemoryCore, "close", slow_close)
    return entered, go


def test_a_memory_built_while_another_thread_closes_one_on_its_key_stays_open(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A threaded web app: request 1 ends (`with Memory("k") as m:` closes it) while request 2 builds
    Memory("k"). Request 1's close saw no other holder and goes on to close the shared core, which
    request 2 has just taken: request 2's fresh memory raises MemoryClosed on its next use."""
    entered, go = _pause_core_close(monkeypatch)
    first = Memory("k", client=client)
    first.seed = 1
    closer = threading.Thread(target=first.close, name="closer")
    closer.start()
    assert entered.wait(10)
    second = Memory("k", client=client)
    go.set()
    closer.join(10)
    try:
        second.x = 2  # MemoryClosed: rm:memory:{k} was closed here; open a new memory to use it
        assert Memory("k", client=client).to_dict() == {"seed": 1, "x": 2}
    finally:
        second.close()


def test_an_offline_write_through_an_open_memory_is_lost_to_another_objects_close(
    switch: Switch, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline, no spool. Thread "closer" closes its memory on key "k" (it had queued nothing); the main
    thread has just built its own memory on "k" and writes `mem.x = 2`, which is queued and returns.
    The closer's core close then runs on the shared core: it logged "closed with 1 queued operations
    ... lost" and cleared the queue: the main thread never closed its memory, yet its write never
    reached Redis. Now a core being closed is not taken: the new memory gets a core of its own,
    which (never loaded, offline) refuses the write with ConnectionFailed, or queues it for good."""
    behind = switch.client()
    entered, go = _pause_core_close(monkeypatch)
    first = Memory("k", client=behind)
    first.seed = 1
    switch.cut()
    closer = threading.Thread(target=lambda: first.close(timeout=0.2), name="closer")
    closer.start()
    assert entered.wait(10)
    mine = Memory("k", client=behind)
    try:
        mine.x = 2  # queued offline (returns), or refused: a new core, never loaded, offline
        wrote = True
    except ConnectionFailed:
        wrote = False
    go.set()
    closer.join(10)
    switch.restore()
    try:
        mine.flush(timeout=10)
    except MemoryClosed:
        pass
    finally:
        mine.close()
    assert Memory("k", client=client).to_dict() == ({"seed": 1, "x": 2} if wrote else {"seed": 1})


# -- memories let go of while offline -------------------------------------------------


def test_a_memory_let_go_of_while_offline_still_replays_its_queue(switch: Switch, client: redis.Redis) -> None:
    """Offline, a request appends to a log through a memory it then lets go of (no close), and a
    second request builds and lets go of another on the same key. Back online the queue replays
    once, and no reconnect thread is left behind."""
    behind = switch.client()
    mem = Memory("lg", client=behind)
    mem.log = []
    switch.cut()
    mem.log.append("offline")
    del mem
    again = Memory("lg", client=behind)
    again.log.append("again")
    del again
    import gc

    gc.collect()
    switch.restore()
    reader = Memory("lg", client=client)
    import time

    deadline = time.monotonic() + 10
    while reader.to_dict() != {"log": ["offline", "again"]} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reader.to_dict() == {"log": ["offline", "again"]}


def test_a_memory_let_go_of_while_offline_with_nothing_queued_ends_the_reconnect_thread(
    switch: Switch, client: redis.Redis
) -> None:
    """Offline, a memory is read (served from its replica) and let go of; another on another key is
    closed. Nothing is queued, so nothing keeps the reconnect thread (the fixture checks)."""
    behind = switch.client()
    mem = Memory("t1", client=behind)
    mem.a = 1
    other = Memory("t2", client=behind)
    other.b = 2
    switch.cut()
    assert mem.a == 1
    assert other.b == 2
    del mem
    other.close(timeout=0)
    import gc
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(t.name == "redis_memory-reconnect" for t in threading.enumerate()):
        gc.collect()
        time.sleep(0.05)
    left = [t.name for t in threading.enumerate() if t.name.startswith("redis_memory")]
    switch.restore()
    assert left == []


# -- the reuse cache evicting a core whose proxies are still held ----------------------


def test_a_proxy_kept_from_a_memory_let_go_of_survives_other_memories_being_built(client: redis.Redis) -> None:
    """`log = Memory("k", client=c).log` keeps a live list while the memory object is let go of (it
    never closed). Building memories on other keys evicts the idle core from the reuse cache
    (keep_memories(1) here, 256 by default), which closes it: the user's next append raises
    MemoryClosed, though nothing was closed by the user."""
    keep_memories(1)
    Memory("k", client=client).log = []
    log = Memory("k", client=client).log
    import gc

    gc.collect()
    for i in range(3):
        Memory(f"other{i}", client=client).n = i
    log.append("still here")  # MemoryClosed: rm:memory:{k} was closed here; open a new memory to use it
    assert Memory("k", client=client).log == ["still here"]


def test_threads_building_and_closing_memories_on_one_key_lose_nothing(real_url: str) -> None:
    """A threaded web app: each request does `with Memory("hits", url=...) as m: m.log.append(id)`.
    Every request's append must be stored, and no request may meet MemoryClosed. With no hook at
    all, some requests get MemoryClosed("rm:memory:{hits} was closed here; ...") from the memory
    they just built: another request's close closed the core they had just taken."""
    Memory("hits", url=real_url).log = []
    errors: list[BaseException] = []

    def requests(worker: int) -> None:
        for i in range(400):
            try:
                with Memory("hits", url=real_url) as m:
                    m.log.append(f"{worker}-{i}")
            except BaseException as exc:
                errors.append(exc)

    import sys

    threads = [threading.Thread(target=requests, args=(w,)) for w in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as on a busy many-core machine
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        sys.setswitchinterval(interval)
    stored = Memory("hits", client=redis.Redis.from_url(real_url)).log
    missing = {f"{w}-{i}" for w in range(4) for i in range(400)} - set(stored)
    assert (len(errors), [repr(e) for e in errors[:2]], len(missing)) == (0, [], 0)
    assert sorted(stored) == sorted(f"{w}-{i}" for w in range(4) for i in range(400))


# -- sessions on cached cores -------------------------------------------------------------


def test_a_session_deleted_by_another_process_and_reopened_here_is_listed_again(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """A session used and closed here (its cores cached), deleted whole by another process, then
    reopened here: agent A writes again. The session is listed, A is a participant, and both
    memories show only what was written after the delete."""
    from redis_memory import Session

    s = Session("s1", client=client)
    s.shared.topic = "old"
    s.agent("A").note = "old"
    s.close()
    Session("s1", client=other_client).delete()
    s = Session("s1", client=client)
    s.agent("A").fresh = 1
    s.shared.fresh = 2
    try:
        assert Session.list_ids(client=other_client) == ["s1"]
        assert Session("s1", client=other_client).agents() == ["A"]
        assert s.agent("A").to_dict() == {"fresh": 1}
        assert s.shared.to_dict() == {"fresh": 2}
    finally:
        s.close()


# -- a spool left behind, adopted by a core already loaded ---------------------------------


def test_a_spool_adopted_by_a_loaded_shared_core_replays_and_shows(
    switch: Switch, client: redis.Redis, tmp_path: Any
) -> None:
    """A memory here is open and loaded on key "d" with a spool. Another writer on the same key and
    spool (as a process that then ended) queued an append offline and left it in the spool. The
    next Memory("d") built here adopts it into the loaded core: it must reach Redis once, and the
    replica must show it."""
    mine = Memory("d", client=client, spool=tmp_path)
    mine.log = ["start"]
    behind = switch.client()
    gone = Memory("d", client=behind, spool=tmp_path, author="ended")
    assert gone.log == ["start"]
    switch.cut()
    gone.log.append("left behind")
    gone.close(timeout=0)  # stays in the spool for the next memory on it
    switch.restore()
    again = Memory("d", client=client, spool=tmp_path)
    try:
        assert again.flush(timeout=10)
        assert Memory("d", client=client).to_dict() == {"log": ["start", "left behind"]}
        assert again.log == ["start", "left behind"]
        assert mine.to_dict() == {"log": ["start", "left behind"]}
    finally:
        again.close()
        mine.close()


# -- connections held by the reuse cache ------------------------------------------------------


@pytest.mark.parametrize("ending", ["close", "let go"])
def test_memories_built_on_a_client_per_request_leave_no_connections_open(real_url: str, ending: str) -> None:
    """An app makes a client per request (redis.Redis.from_url(url)), builds a memory on it, uses
    it and closes it (or lets go of it). The cache keys cores by the client's channel, so each
    request leaves a core behind; none of them may keep a connection to the server open."""
    import gc

    watcher = redis.Redis.from_url(real_url)
    before = len(watcher.client_list())
    for i in range(20):
        mem = Memory("per-request", client=redis.Redis.from_url(real_url))
        mem.n = i
        if ending == "close":
            mem.close()
        del mem
    gc.collect()
    after = len(watcher.client_list())
    assert after - before <= 2, f"{after - before} connections left open by 20 finished requests"


# -- bad options meeting the cache key -------------------------------------------------------


def test_a_bad_expiry_gets_the_clear_error_whatever_is_cached(client: redis.Redis) -> None:
    """ttl=[5] used to get "an expiry must be a positive number of seconds, not [5]"; the cache key
    built from the options now fails first with TypeError "unhashable type: 'list'"."""
    with pytest.raises(ValueError, match="an expiry must be"):
        Memory("bad", client=client, ttl=[5])


def test_an_expiry_refused_alone_is_refused_with_a_cached_memory(client: redis.Redis) -> None:
    """ttl=True is refused on its own, but taken once a memory with ttl=1 is cached: True == 1 as
    a cache key, so the options are never checked."""
    with pytest.raises(ValueError, match="an expiry must be"):
        Memory("bad", client=client, ttl=True)
    kept = Memory("bad", client=client, ttl=1)
    try:
        with pytest.raises(ValueError, match="an expiry must be"):
            Memory("bad", client=client, ttl=True)
    finally:
        kept.close()


def test_keep_memories_0_keeps_no_replica_once_its_memory_is_closed(client: redis.Redis) -> None:
    """keep_memories(0): "0 keeps none". A memory holding a large value is closed; its replica (and
    the value) must not stay loaded in this process until some other memory happens to be built."""
    import gc
    import weakref

    warm = Memory("warm", client=client)
    warm.x = 1  # the server code loaded (fakeredis keeps the frames of a client's first call alive)
    warm.close()
    keep_memories(0)
    mem = Memory("big", client=client)
    mem.blob = {"rows": list(range(10_000))}
    core = weakref.ref(mem._rm)
    mem.close()
    del mem
    gc.collect()
    assert core() is None, "the closed memory's core and replica are still kept"


def test_an_offline_write_through_a_kept_proxy_is_lost_to_an_eviction_under_way(
    switch: Switch, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """keep_memories(0). A worker keeps `log = Memory("ev").log` (the memory object let go of) and,
    offline, appends to it while another thread builds Memory("other"), whose take() has just
    chosen the idle "ev" core for eviction (it had nothing queued then) and is about to close it.
    The append is queued and returns; the eviction's close then found it queued and offline, logged
    "closed with 1 queued operations ... lost" and cleared it. An eviction only forgets a core now:
    the proxy goes on through it, and the append reaches Redis."""
    import gc

    behind = switch.client()
    warm = Memory("warm", client=behind)
    warm.x = 1  # this client's first write (fakeredis keeps the frames of its first call alive)
    keep_memories(0)
    Memory("ev", client=behind).log = []
    log = Memory("ev", client=behind).log
    gc.collect()
    entered, go = _pause_core_close(monkeypatch)
    switch.cut()
    built: list[Memory] = []
    closer = threading.Thread(target=lambda: built.append(Memory("other", client=behind)), name="closer")
    closer.start()
    # An eviction now forgets the core, never closes it: no close to wait for.
    assert not entered.wait(1)
    log.append("offline")  # queued: returns
    go.set()
    closer.join(10)
    switch.restore()
    for mem in built:
        mem.close()
    warm.close()
    reader = Memory("ev", client=client)
    import time

    deadline = time.monotonic() + 5
    while reader.to_dict() != {"log": ["offline"]} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reader.to_dict() == {"log": ["offline"]}


def test_status_still_answers_after_close(client: redis.Redis) -> None:
    """Before shared cores, mem.status() after mem.close() told what was left (online, pending,
    dropped); the closed object now reaches _Closed and status() raises MemoryClosed, though the
    Closing section names only reads and writes (and proxies' changes) as raising."""
    mem = Memory("st", client=client)
    mem.x = 1
    mem.close()
    status = mem.status()  # MemoryClosed: rm:memory:{st} was closed here; open a new memory to use it
    assert status.pending == 0 and status.dropped == 0
