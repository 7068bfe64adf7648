"""8 processes x 500 mixed nested operations through real outages: nothing lost, nothing twice, order kept."""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import Switch
from netproxy import TcpProxy
from servers import EmbeddedServer, RedisServer, durable_redis
from stress_workers import NAME, stress_writer

from redis_memory import Memory

spawn = multiprocessing.get_context("spawn")

WRITERS = 8
OPERATIONS = 500
#: Writers 0-3 reach the server through proxies (two writers a proxy); 4-7 directly.
PROXIED = 4


@pytest.fixture
def durable(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, fsyncing every write, so that SIGKILL loses nothing."""
    server = durable_redis(tmp_path / "server")
    yield server
    server.stop()


def check_writer(fresh: dict[str, Any], writer: int, model: dict[str, Any]) -> None:
    """What ``writer`` left in the fresh load is exactly its model, in its order."""
    mine = f"{writer}:"
    assert [t for t in fresh["log"] if t.startswith(mine)] == model["log"], f"writer {writer}: log"
    assert [t for t in fresh["front"] if t.startswith(mine)] == model["front"][::-1], f"writer {writer}: front"
    assert {t for t in fresh["tags"] if t.startswith(mine)} == set(model["tags"]), f"writer {writer}: tags"
    assert {k: v for k, v in fresh["d"].items() if k.startswith(mine)} == model["d"], f"writer {writer}: d"
    sub = {"items": model["items"], "seen": set(model["seen"])}
    if model["count"] is not None:
        sub["count"] = model["count"]
    sub.update({k: {"l": v["l"], "s": set(v["s"])} for k, v in model["nodes"].items()})
    assert fresh["d2"][f"w{writer}"] == sub, f"writer {writer}: d2"
    assert fresh["sorted"][f"w{writer}"] == model["sorted"], f"writer {writer}: sorted"


#: (what, when: the share of its operations every writer cut off has made, cut, restore, seconds held)
Outage = tuple[str, float, Callable[[], object], Callable[[], object], float]


def cut_off(what: str) -> range:
    """The writers an outage cuts off: every one when the server goes, else those behind the proxies."""
    return range(WRITERS) if "server" in what else range(PROXIED)


def cut_and_restore_all(proxies: list[TcpProxy]) -> tuple[Callable[[], None], Callable[[], None]]:
    def cut() -> None:
        for proxy in proxies:
            proxy.cut()

    def restore() -> None:
        for proxy in proxies:
            proxy.restore()

    return cut, restore


def lose_replies(proxies: list[TcpProxy], count: int) -> None:
    """Each proxy throws the next ``count`` replies away (0: stop throwing replies away)."""
    for proxy in proxies:
        with proxy.lock:
            proxy.to_lose = count


def stop_losing_replies(proxies: list[TcpProxy]) -> None:
    """Once each proxy has lost a reply (writers ahead of the others may pause a while), lose no more."""
    deadline = time.monotonic() + 20
    while not all(p.replies_lost for p in proxies) and time.monotonic() < deadline:
        time.sleep(0.01)
    lose_replies(proxies, 0)


def run_stress(
    direct_url: str, proxies: list[TcpProxy], outages: list[Outage], tmp_path: Path, pause: float = 0.004
) -> None:
    """Run the writers (the first PROXIED through ``proxies``), bring ``outages`` in turn, check it all.

    An outage starts when every writer it cuts off (all for a server outage,
    else the proxied ones) has made its share of operations: so even the
    slowest of them is writing when it starts. Writers offline run faster
    (no round trips): a server outage moves every writer on by about its
    length over the pause between operations.
    """
    setup = Memory(NAME, url=direct_url)
    setup.log, setup.front, setup.tags = [], [], set()
    setup.d, setup.d2, setup.sorted = {}, {}, {}
    urls = [proxies[w * len(proxies) // PROXIED].url if w < PROXIED else direct_url for w in range(WRITERS)]
    start, finished = spawn.Barrier(WRITERS + 1), spawn.Barrier(WRITERS)
    progress: Any = spawn.Array("i", WRITERS)
    outs = [tmp_path / f"writer{w}.json" for w in range(WRITERS)]
    shared = (start, finished, progress)
    procs = [
        spawn.Process(target=stress_writer, args=(urls[w], direct_url, w, OPERATIONS, pause, *shared, str(outs[w])))
        for w in range(WRITERS)
    ]
    total = WRITERS * (OPERATIONS - 2)  # the two setdefaults that make each writer's containers are not counted
    seen: list[tuple[str, list[int], list[int]]] = []

    def reached(group: range, count: int) -> bool:
        deadline = time.monotonic() + 60
        while min(progress[w] for w in group) < count:
            if time.monotonic() > deadline or not all(p.is_alive() for p in procs):
                return False
            time.sleep(0.01)
        return True

    began = time.monotonic()
    try:
        for p in procs:
            p.start()
        start.wait(120)
        for what, when, cut, restore, hold in outages:
            if not reached(cut_off(what), int((OPERATIONS - 2) * when)):
                break
            before = list(progress)
            cut()
            time.sleep(hold)
            during = list(progress)
            restore()
            seen.append((what, before, during))
        for p in procs:
            p.join(max(1.0, 150 - (time.monotonic() - began)))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
    reports: list[dict[str, Any]] = [json.loads(o.read_text()) if o.exists() else {"error": "no report"} for o in outs]
    errors = {w: r["error"] for w, r in enumerate(reports) if r["error"]}
    assert not errors, "\n".join(f"writer {w}:\n{e}" for w, e in errors.items())
    assert [p.exitcode for p in procs] == [0] * WRITERS
    fresh = Memory(NAME, url=direct_url).to_dict()
    models = [r["model"] for r in reports]
    for w, model in enumerate(models):
        check_writer(fresh, w, model)
    assert len(fresh["log"]) == sum(len(m["log"]) for m in models), "log: lost or duplicated"
    assert len(fresh["front"]) == sum(len(m["front"]) for m in models), "front: lost or duplicated"
    assert fresh["tags"] == {t for m in models for t in m["tags"]}
    assert fresh["d"] == {k: v for m in models for k, v in m["d"].items()}
    assert set(fresh["d2"]) == set(fresh["sorted"]) == {f"w{w}" for w in range(WRITERS)}
    assert setup.to_dict() == fresh, "the parent's replica differs from a fresh load"
    # Every outage came while the writers were writing, and those cut off wrote through it.
    assert [what for what, _, _ in seen] == [outage[0] for outage in outages], f"outages missed: {seen}"
    for what, before, during in seen:
        assert sum(before) < total, f"{what}: after the writes"
        assert any(during[w] > before[w] for w in cut_off(what)), f"{what}: nobody wrote during it {before} {during}"


def test_eight_processes_mixed_nested_operations_through_outages(durable: RedisServer, tmp_path: Path) -> None:
    """8 processes x 500 list, dict and set operations (front inserts, pops, sorts, nested), while links are
    cut and the server is SIGKILLed and restarted: 0 lost, 0 duplicated, each writer's order kept, every
    replica equal to a fresh load."""
    proxies = [TcpProxy(durable.port) for _ in range(2)]
    both = cut_and_restore_all(proxies)
    try:
        outages: list[Outage] = [
            ("proxy 0 cut", 0.08, proxies[0].cut, proxies[0].restore, 0.3),
            ("replies lost", 0.16, lambda: lose_replies(proxies, 4), lambda: stop_losing_replies(proxies), 0.3),
            ("proxy 1 cut", 0.24, proxies[1].cut, proxies[1].restore, 0.3),
            ("server SIGKILLed", 0.32, durable.kill, durable.start, 0.2),
            ("both proxies cut", 0.55, *both, 0.3),
            ("server SIGKILLed again", 0.7, durable.kill, durable.start, 0.2),
        ]
        run_stress(durable.url, proxies, outages, tmp_path)
        # Commands the server applied whose replies never came: each applied once all the same.
        assert all(p.replies_lost for p in proxies), [p.replies_lost for p in proxies]
    finally:
        for proxy in proxies:
            proxy.close()


# One proxy in front of one server: a cluster's nodes are cut and killed by the tests of test_cluster.py.
@pytest.mark.parametrize("real_url", ["redis7", "valkey"], indirect=True)
def test_eight_processes_mixed_nested_operations_through_cut_links(
    servers: dict[str, Any], real_url: str, tmp_path: Path
) -> None:
    """The same 8 x 500 on each real server, half the writers behind links cut three times: the same checks."""
    server = servers["redis7"] if real_url == servers["redis7"].url else servers["valkey"]
    proxies = [TcpProxy(server.socket_path if isinstance(server, EmbeddedServer) else server.port) for _ in range(2)]
    both = cut_and_restore_all(proxies)
    try:
        outages: list[Outage] = [
            ("proxy 0 cut", 0.15, proxies[0].cut, proxies[0].restore, 0.4),
            ("both proxies cut", 0.4, *both, 0.4),
            ("proxy 1 cut", 0.65, proxies[1].cut, proxies[1].restore, 0.4),
        ]
        run_stress(real_url, proxies, outages, tmp_path)
    finally:
        for proxy in proxies:
            proxy.close()


# -- Positional list writes name the item they mean -----------------------------------------------
#
# ``del l[i]``, ``pop(i)``, ``remove(x)``, ``l[i] = v`` and a middle ``insert`` name the slot this
# replica saw and the item it saw there; the script finds that item wherever another process's
# insert or delete in the middle moved it, so the item meant is the one deleted or replaced.


def five_and_a_held_view(client: redis.Redis, other_client: redis.Redis) -> tuple[Memory, list[Any]]:
    """Another process's memory on ['a', 'b', 'c', 'd', 'e'], and this process's proxy of it, held."""
    other = Memory("slots", client=other_client)
    other.items = ["a", "b", "c", "d", "e"]
    return other, Memory("slots", client=client).items


def test_held_list_remove_after_a_middle_insert_elsewhere_removes_the_item_asked_for(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """remove('a') through a held proxy, after another process inserted in the middle: 'a' goes, 'b' stays."""
    other, held = five_and_a_held_view(client, other_client)
    other.items.insert(2, "X")  # the script moves 'a' and 'b' one slot towards the front
    held.remove("a")
    assert Memory("slots", client=other_client).items == ["b", "X", "c", "d", "e"]


def test_held_list_setitem_after_a_middle_insert_elsewhere_replaces_the_item_seen(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """held[0] = 'A' replaces the 'a' this process saw at index 0, not the 'b' moved into its slot."""
    other, held = five_and_a_held_view(client, other_client)
    other.items.insert(2, "X")
    held[0] = "A"
    assert Memory("slots", client=other_client).items == ["A", "b", "X", "c", "d", "e"]


def test_held_list_pop_front_after_a_middle_insert_elsewhere_pops_the_front(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """held.pop(0) returns and removes 'a', the first item both here and on the server."""
    other, held = five_and_a_held_view(client, other_client)
    other.items.insert(2, "X")
    assert held.pop(0) == "a"
    assert Memory("slots", client=other_client).items == ["b", "X", "c", "d", "e"]


def test_held_list_remove_of_an_item_deleted_elsewhere_keeps_its_neighbour(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """remove('b') after another process deleted 'b': ValueError (as on a fresh view), and 'a' is not deleted."""
    other, held = five_and_a_held_view(client, other_client)
    del other.items[1]  # the script moves 'a' into the slot 'b' had
    with pytest.raises(ValueError):
        held.remove("b")
    assert Memory("slots", client=other_client).items == ["a", "c", "d", "e"]


def test_offline_remove_replayed_after_a_middle_insert_elsewhere_removes_the_item_asked_for(
    switch: Switch, client: redis.Redis
) -> None:
    """remove('b') queued offline while another process inserts in the middle: the replay removes 'b', not 'X'."""
    other = Memory("slots", client=client)
    other.items = ["a", "b", "c", "d", "e"]
    mem = Memory("slots", client=switch.client())
    assert mem.items == ["a", "b", "c", "d", "e"]
    switch.cut()
    mem.items.remove("b")
    other.items.insert(2, "X")  # online: 'a' and 'b' move one slot towards the front
    switch.restore()
    assert mem.flush(timeout=10)
    assert mem.status().dropped == 0
    assert Memory("slots", client=client).items == ["a", "X", "c", "d", "e"]
