"""Redis Cluster and Sentinel: routing, slot migration, failover, with real processes and real kills.

The cluster is the test session's (3 masters, 3 replicas, see servers.ClusterServer); the
failover tests kill one of its masters and start it again (it rejoins as a replica), then
wait until every master has a replica in sync again, so that later tests find it whole.
"""

from __future__ import annotations

import gc
import multiprocessing
import signal
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.sentinel import Sentinel
from servers import ClusterServer, SentinelSetup
from workers import failover_writer, spread_writer

from redis_memory import Memory, NotReplicated, Session, health_check
from redis_memory.catalog import INDEX_PARTS
from redis_memory.cluster import slot_of
from redis_memory.connection import Channel

WRITERS = 6
MEMORIES = 200
ROUNDS = 5


@pytest.fixture
def cluster(servers: dict[str, Any]) -> Iterator[ClusterServer]:
    """The session's cluster, flushed, whole again after the test."""
    found: ClusterServer = servers["cluster"]
    found.flushall()
    yield found
    for node in found.nodes:
        if node.process is None or node.process.poll() is not None:
            node.start()
    found.wait_healthy()
    found.flushall()


def test_a_cluster_client_and_a_node_url_reach_the_same_memories(cluster: ClusterServer) -> None:
    """A RedisCluster as client= and the URL of any node (a replica's too) see one set of memories."""
    for i in range(30):
        Memory(f"m{i}", client=cluster.client()).items = [i]
    for node in cluster.nodes:
        assert [Memory(f"m{i}", url=node.url).items for i in range(30)] == [[i] for i in range(30)]


def test_a_cluster_clients_own_connect_hook_runs_on_the_librarys_connections(cluster: ClusterServer) -> None:
    """A hook given as redis_connect_func runs on each connection the library opens to a master (here it
    names the connection), and a memory on a client let go of keeps neither the client nor its hook alive."""

    def hook(connection: Any) -> None:
        connection.send_command("CLIENT", "SETNAME", "hooked")
        assert connection.read_response() == b"OK"

    client = cluster.client(redis_connect_func=hook)
    memories = [Memory(f"hook{i}", client=client) for i in range(30)]
    for i, mem in enumerate(memories):
        mem.x = i
    masters = [port for port, role in cluster.roles().items() if role == "master"]
    for port in masters:
        names = [entry["name"] for entry in redis.Redis(port=port).client_list()]
        assert "hooked" in names
    gone = weakref.ref(client)
    del client, hook, memories, mem
    gc.collect()
    assert gone() is None
    assert [Memory(f"hook{i}", client=cluster.client()).x for i in range(30)] == list(range(30))


def test_memories_spread_over_every_master_and_concurrent_writers_lose_nothing(cluster: ClusterServer) -> None:
    """200 memories on all three masters; 6 processes append and set keys: 0 lost, 0 duplicated, order kept."""
    names = [f"spread-{i}" for i in range(MEMORIES)]
    masters = {cluster.master_of(Memory(name, url=cluster.url).key) for name in names}
    assert len(masters) == 3
    for name in names:
        setup = Memory(name, url=cluster.url)
        setup.log, setup.seen = [], {}
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WRITERS)
    procs = [ctx.Process(target=spread_writer, args=(cluster.url, w, names, ROUNDS, barrier)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0
    client = cluster.client()
    for name in names:
        mem = Memory(name, client=client)
        pairs = [tuple(item) for item in mem.log]
        assert sorted(pairs) == [(w, i) for w in range(WRITERS) for i in range(ROUNDS)], name
        for w in range(WRITERS):
            assert [i for writer, i in pairs if writer == w] == list(range(ROUNDS)), name
        assert mem.seen == {f"{w}:{i}": i for w in range(WRITERS) for i in range(ROUNDS)}, name


def test_the_index_is_split_over_several_masters_and_listing_merges_it(cluster: ClusterServer) -> None:
    """Index entries lie in several sorted sets on different masters; list_ids and count see all of them."""
    client = cluster.client()
    names = [f"listed-{i}" for i in range(60)]
    for name in names:
        Memory(name, client=client).x = 1
    catalog = Memory._rm_catalog(client, "rm")
    assert catalog is not None
    parts = catalog.parts()
    assert len(parts) == INDEX_PARTS and len({slot_of(part) for part in parts}) == INDEX_PARTS
    holding = [part for part in parts if client.zcard(part)]
    assert len({cluster.master_of(part) for part in holding}) == 3
    assert sorted(Memory.list_ids(client=client)) == sorted(names)
    assert Memory.count(url=cluster.url) == len(names)
    assert len(Memory.list_ids(client=client, limit=7)) == 7
    assert Memory.delete_idle(0, client=client, batch=25) == len(names)
    assert Memory.list_ids(client=client) == [] and Memory.count(client=client) == 0


def test_a_session_keeps_its_keys_in_one_slot(cluster: ClusterServer) -> None:
    """Shared memory, every agent's memory and the participant set share one slot, and one master."""
    session = Session("trip", client=cluster.client())
    session.shared.plan = ["a"]
    for agent in ("planner", "booker", "critic"):
        session.agent(agent).notes = [agent]
    keys = [session.shared.key, session._agents_key, *(session.agent(a).key for a in session.agents())]
    assert len({slot_of(key) for key in keys}) == 1
    session.delete()
    assert Session("trip", client=cluster.client()).agents() == []


def _migrate(cluster: ClusterServer, key: str, pause: float) -> None:
    """Move the slot of ``key`` to another master: IMPORTING, MIGRATING, MIGRATE, a pause, then NODE everywhere."""
    slot = slot_of(key)
    source_port = cluster.master_of(key)
    target_port = next(port for port, role in cluster.roles().items() if role == "master" and port != source_port)
    source, target = redis.Redis(port=source_port), redis.Redis(port=target_port)
    source_id, target_id = source.execute_command("CLUSTER", "MYID"), target.execute_command("CLUSTER", "MYID")
    target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        source.execute_command("MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *keys)
    time.sleep(pause)  # the slot's keys are on the target, the source still owns the slot: ASK
    for port, role in cluster.roles().items():
        if role == "master":
            redis.Redis(port=port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


def test_a_slot_migrated_during_writes_loses_and_repeats_nothing(
    cluster: ClusterServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appends while their slot migrates (MIGRATE, ASK redirections in between): each lands once, in order."""
    asked: list[bytes] = []
    real = Channel.exchange

    def watching(self: Channel, packed: bytes, *args: Any) -> tuple[list[object], bool]:
        if packed.startswith(b"*1\r\n$6\r\nASKING"):
            asked.append(packed)
        return real(self, packed, *args)

    monkeypatch.setattr(Channel, "exchange", watching)
    mem = Memory("migrating", client=cluster.client())
    mem.log = []
    total, written = 600, threading.Event()

    def write() -> None:
        log = mem.log
        for i in range(total):
            log.append(i)
            time.sleep(0.001)
        written.set()

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(0.1)
    before = cluster.master_of(mem.key)
    _migrate(cluster, mem.key, pause=0.3)
    writer.join(60)
    assert written.is_set()
    assert cluster.master_of(mem.key) != before
    assert asked, "no command was redirected by ASK"
    assert mem.flush(timeout=30)
    assert Memory("migrating", url=cluster.url).log == list(range(total))
    assert mem.log == list(range(total))


def _writers_through_a_failover(
    target: str | list[tuple[str, int]], name: str, wait_for: int, kill: Any, recover: Any
) -> list[tuple[int, int, bool, bool, int]]:
    """3 processes append to memory ``name`` while ``kill()`` runs, then ``recover()``; what each reports."""
    ctx = multiprocessing.get_context("spawn")
    stop, out, finished = ctx.Event(), ctx.Queue(), ctx.Barrier(3)
    starts = [ctx.Event() for _ in range(3)]
    procs = [
        ctx.Process(target=failover_writer, args=(target, name, w, wait_for, starts[w], stop, finished, out))
        for w in range(3)
    ]
    for p in procs:
        p.start()
    try:
        for started in starts:
            assert started.wait(60)
        time.sleep(0.5)
        kill()
        recover()
        time.sleep(0.5)
        stop.set()
        reports = [out.get(timeout=150) for _ in procs]
    finally:
        stop.set()
        for p in procs:
            p.join(30)
            if p.exitcode is None:
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    return sorted(reports)


def _check(items: list[Any], reports: list[tuple[int, int, bool, bool, int]]) -> int:
    """No write twice, each writer's order kept, every replica exact; how many writes are missing."""
    pairs = [tuple(item) for item in items]
    assert len(pairs) == len(set(pairs)), "a write was applied twice"
    lost = 0
    for writer, count, flushed, exact, dropped in reports:
        assert flushed and exact and dropped == 0, (writer, flushed, exact, dropped)
        mine = [i for w, i in pairs if w == writer]
        assert mine == sorted(mine), f"writer {writer}'s order was not kept"
        assert set(mine) <= set(range(count))
        lost += count - len(mine)
    return lost


def _kill_master_of(cluster: ClusterServer, key: str) -> tuple[Any, Any]:
    """kill(): stop the replica of the master serving ``key`` (SIGSTOP) and cut its link on the master's side,
    so that for a moment the master acknowledges writes the replica never gets; then SIGKILL the master and
    let the replica go on (SIGCONT). recover(): wait for the replica to take over, then start the killed
    master again (it rejoins as a replica)."""
    victim = cluster.node(cluster.master_of(key))
    info = redis.Redis(port=victim.port).info("replication")
    replica = cluster.node(int(info["slave0"]["port"]))
    assert replica.process is not None

    def kill() -> None:
        assert replica.process is not None
        replica.process.send_signal(signal.SIGSTOP)
        try:
            redis.Redis(port=victim.port).client_kill_filter(_type="replica")
            time.sleep(0.3)
            victim.kill()
        finally:
            replica.process.send_signal(signal.SIGCONT)

    def recover() -> None:
        deadline = time.monotonic() + 60
        while cluster.master_of(key) == victim.port:
            assert time.monotonic() < deadline, "no replica took over"
            time.sleep(0.1)
        victim.start()
        cluster.wait_healthy()

    return kill, recover


def test_a_master_killed_during_writes_with_wait_for_replicas_loses_nothing(cluster: ClusterServer) -> None:
    """SIGKILL of the master (its replica lagging) during 3 processes' appends with wait_for_replicas=1: after
    the failover every write that returned is there exactly once, in each writer's order, every replica exact."""
    Memory("fo-wait", url=cluster.url).log = []
    kill, recover = _kill_master_of(cluster, Memory("fo-wait", url=cluster.url).key)
    reports = _writers_through_a_failover(cluster.url, "fo-wait", 1, kill, recover)
    assert _check(Memory("fo-wait", url=cluster.url).log, reports) == 0


def test_a_master_killed_during_writes_without_waiting_leaves_every_replica_exact(
    cluster: ClusterServer, record_property: Any
) -> None:
    """The same without wait_for_replicas: the writes the dead master acknowledged but never replicated are
    lost (Redis replicates asynchronously), but nothing is applied twice, order holds, and every process's
    replica notices the rollback and equals a fresh load."""
    Memory("fo-async", url=cluster.url).log = []
    kill, recover = _kill_master_of(cluster, Memory("fo-async", url=cluster.url).key)
    reports = _writers_through_a_failover(cluster.url, "fo-async", 0, kill, recover)
    lost = _check(Memory("fo-async", url=cluster.url).log, reports)
    written = sum(count for _, count, *_ in reports)
    record_property("writes_lost_without_wait_for_replicas", f"{lost} of {written}")
    print(f"\nmaster killed without wait_for_replicas: {lost} of {written} writes lost")
    assert lost > 0, "the replica was stopped: the writes its master acknowledged meanwhile should be lost"


def test_wait_for_replicas_keeps_an_unconfirmed_write_queued(cluster: ClusterServer) -> None:
    """Asking for more replicas than there are: the write is applied and kept pending (NotReplicated) until
    confirmed; with what the cluster has, writes confirm at once."""
    mem = Memory("too-many", client=cluster.client(), wait_for_replicas=2, replica_timeout=0.2)
    mem.x = 1
    status = mem.status()
    assert status.pending == 1 and isinstance(status.last_error, NotReplicated)
    assert Memory("too-many", url=cluster.url).x == 1  # applied by the master all the same
    assert mem.flush(timeout=0.5) is False
    mem.close(timeout=0)
    enough = Memory("enough", client=cluster.client(), wait_for_replicas=1)
    enough.x = 1
    for node in cluster.nodes:  # as after a failover to a replica that never ran the script
        redis.Redis(port=node.port).script_flush()
    enough.x = 2
    assert enough.status().pending == 0 and enough.flush(timeout=1)
    assert Memory("enough", url=cluster.url).x == 2


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSetup]:
    setup = SentinelSetup(Path(tmp_path_factory.mktemp("sentinel")))
    yield setup
    setup.stop()


def test_a_sentinel_failover_during_writes_loses_nothing_with_wait_for_replicas(sentinels: SentinelSetup) -> None:
    """SENTINEL FAILOVER while 3 processes append through Sentinel-managed clients (wait_for_replicas=1):
    every write is there once, in order, and every replica is exact."""
    admin = redis.Redis(port=sentinels.sentinels[0].port)
    old = sentinels.master_port()
    Memory("sentinel", client=redis.Redis(port=old)).log = []

    def failover() -> None:
        admin.execute_command("SENTINEL", "FAILOVER", SentinelSetup.SERVICE)

    def recover() -> None:
        deadline = time.monotonic() + 60
        while sentinels.master_port() == old:
            assert time.monotonic() < deadline, "the sentinels did not fail over"
            time.sleep(0.1)
        sentinels.wait_ready()

    managed = Sentinel(sentinels.addresses).master_for(SentinelSetup.SERVICE)
    assert health_check(managed).mode == "sentinel"
    reports = _writers_through_a_failover(sentinels.addresses, "sentinel", 1, failover, recover)
    master = redis.Redis(port=sentinels.master_port())
    assert sentinels.master_port() != old
    assert _check(Memory("sentinel", client=master).log, reports) == 0


def _subscribed(pubsub: Any, kind: str) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.2)
        if message is not None and message["type"] == kind:
            return
    raise AssertionError(f"no {kind} confirmation")


def test_changes_are_published_within_the_memory_shard(cluster: ClusterServer) -> None:
    """On a cluster the server code publishes with SPUBLISH: a sharded subscriber on the memory's master
    gets each change, a classic subscriber on another master gets none (no broadcast to every node)."""
    mem = Memory("sharded", client=cluster.client())
    mem.x = 0
    owner = cluster.master_of(mem.key)
    other = next(port for port, role in cluster.roles().items() if role == "master" and port != owner)
    sharded, classic = redis.Redis(port=owner).pubsub(), redis.Redis(port=other).pubsub()
    try:
        sharded.ssubscribe(mem.key + ":changes")
        _subscribed(sharded, "ssubscribe")
        classic.subscribe(mem.key + ":changes")
        _subscribed(classic, "subscribe")
        mem.x = 1
        mem.delete()
        got = [sharded.get_message(timeout=5), sharded.get_message(timeout=5)]
        assert [m["type"] for m in got if m] == ["smessage", "smessage"]
        assert classic.get_message(timeout=1) is None
    finally:
        sharded.close()
        classic.close()


def test_a_feed_follows_its_memory_through_a_failover(cluster: ClusterServer) -> None:
    """A feed on a memory whose master is killed resubscribes on the replica that took over: a resync,
    then the changes made there."""
    name = "followed"
    mem = Memory(name, client=cluster.client())
    mem.x = 0
    kill, recover = _kill_master_of(cluster, mem.key)
    with Memory(name, client=cluster.client()).subscribe() as feed:
        kill()
        recover()
        mem.x = 1
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and ("set", ("x",)) not in seen:
            event = feed.get(timeout=1)
            if event is not None:
                seen.append((event.op, event.path))
                if event.op == "resync":
                    mem.x = len(seen) + 1  # a change made after the feed is back
    assert ("resync", ()) in seen and seen[-1] == ("set", ("x",)), seen
    assert mem.flush(timeout=10)
