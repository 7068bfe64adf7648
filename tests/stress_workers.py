"""The writer of the multi-process stress test, and the model each writer keeps of its own contributions.

Every writer touches only items tagged with its own number, so that the
final state is checkable although the writers' operations interleave: what
a writer added and did not remove must be there exactly once, in its order.
"""

from __future__ import annotations

import json
import random
import time
import traceback
from multiprocessing.sharedctypes import SynchronizedArray
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

from redis_memory import Memory

NAME = "stress"
#: How many operations a writer may be ahead of the slowest one: writers cut
#: off run ahead while offline, and every outage should find all of them writing.
WINDOW = 40
KINDS = ["log", "front", "tag", "untag", "set", "pop", "setdefault", "nested", "nested_set", "node", "node_append"]
KINDS += ["sorted", "sort", "lpop", "lpop_front", "linsert_front"]
WEIGHTS = [14, 8, 10, 5, 10, 6, 5, 12, 6, 3, 6, 12, 3, 6, 3, 3]


def empty_model() -> dict[str, Any]:
    return {
        "log": [], "front": [], "tags": set(), "d": {}, "items": [], "seen": set(), "count": None, "nodes": {},
        "sorted": [],
    }  # fmt: skip


def run_ops(
    mem: Memory, writer: int, count: int, progress: SynchronizedArray[int], hold: bool, pause: float
) -> dict[str, Any]:
    """``count`` mixed operations of ``writer``, ``pause`` seconds apart; the model of what it leaves behind.

    With ``hold`` the shared containers are read once and their proxies held
    through every outage; else each operation reads its container again.
    """
    rng = random.Random(writer)
    model = empty_model()
    me = f"w{writer}"
    held = {name: mem[name] for name in ("log", "front", "tags", "d")}

    def shared(name: str) -> Any:
        return held[name] if hold else mem[name]

    sub = mem.d2.setdefault(me, {"items": [], "seen": set()})
    assert sub == {"items": [], "seen": set()}, sub
    own = mem.sorted.setdefault(me, [])
    assert own == [], own
    window = WINDOW
    for i in range(1, count - 1):
        deadline = time.monotonic() + 30
        while min(progress[:]) < i - 1 - window:
            if time.monotonic() > deadline:  # the slowest writer is stuck: its own report says why
                window = count
            time.sleep(0.002)
        tag = f"{writer}:{i}"
        kind = rng.choices(KINDS, WEIGHTS)[0]
        if kind == "log":
            shared("log").append(tag)
            model["log"].append(tag)
        elif kind == "front":
            shared("front").insert(0, tag)
            model["front"].append(tag)
        elif kind == "tag" or (kind == "untag" and not model["tags"]):
            shared("tags").add(tag)
            model["tags"].add(tag)
        elif kind == "untag":
            gone = rng.choice(sorted(model["tags"]))
            shared("tags").discard(gone)
            model["tags"].remove(gone)
        elif kind == "set" or (kind == "pop" and not model["d"]):
            key = f"{writer}:{rng.randrange(12)}"
            shared("d")[key] = i
            model["d"][key] = i
        elif kind == "pop":
            key = rng.choice(sorted(model["d"]))
            got = shared("d").pop(key)
            assert got == model["d"].pop(key), (key, got)
        elif kind == "setdefault":
            key = f"{writer}:s{rng.randrange(6)}"
            got = shared("d").setdefault(key, i)
            assert got == model["d"].setdefault(key, i), (key, got)
        elif kind == "nested":
            node = mem.d2[me] if not hold else sub
            node["items"].append(i)
            model["items"].append(i)
            if i % 5 == 0:
                node["count"] = i
                model["count"] = i
        elif kind == "nested_set":
            node = mem.d2[me] if not hold else sub
            element = i % 7
            if element in model["seen"]:
                node["seen"].discard(element)
                model["seen"].remove(element)
            else:
                node["seen"].add(element)
                model["seen"].add(element)
        elif kind == "node" or (kind == "node_append" and not model["nodes"]):
            # A new nested container replaces the old one (made offline during an outage).
            key = f"n{rng.randrange(3)}"
            (mem.d2[me] if not hold else sub)[key] = {"l": [i], "s": {tag}}
            model["nodes"][key] = {"l": [i], "s": {tag}}
        elif kind == "node_append":
            key = rng.choice(sorted(model["nodes"]))
            node = (mem.d2[me] if not hold else sub)[key]
            node["l"].append(i)
            node["s"].add(tag)
            model["nodes"][key]["l"].append(i)
            model["nodes"][key]["s"].add(tag)
        elif kind == "linsert_front":
            value = rng.randrange(100)
            (own if hold else mem.sorted[me]).insert(0, value)
            model["sorted"].insert(0, value)
        elif kind == "lpop_front" and model["sorted"]:
            got = (own if hold else mem.sorted[me]).pop(0)
            assert got == model["sorted"].pop(0), got
        elif kind == "sorted" or (kind in ("lpop", "lpop_front") and not model["sorted"]):
            value = rng.randrange(100)
            (own if hold else mem.sorted[me]).append(value)
            model["sorted"].append(value)
        elif kind == "sort":
            (own if hold else mem.sorted[me]).sort()
            model["sorted"].sort()
        else:
            got = (own if hold else mem.sorted[me]).pop()
            assert got == model["sorted"].pop(), got
        progress[writer] += 1
        time.sleep(pause)
    return model


def stress_writer(
    url: str,
    direct_url: str,
    writer: int,
    count: int,
    pause: float,
    start: Barrier,
    finished: Barrier,
    progress: SynchronizedArray[int],
    out: str,
) -> None:
    """Write through ``url``, flush, wait for every writer, compare this replica with a fresh load; report to ``out``.

    The fresh load goes to the server directly (``direct_url``), never through a link the test may cut.
    """
    report: dict[str, Any] = {"error": None}
    try:
        mem = Memory(NAME, url=url)
        mem.to_dict()  # loaded before any outage
        start.wait(60)
        model = run_ops(mem, writer, count, progress, hold=writer % 2 == 1, pause=pause)
        assert mem.flush(timeout=60), mem.status()
        status = mem.status()
        assert status.pending == 0 and status.dropped == 0, status
        finished.wait(120)
        mine = mem.to_dict()
        fresh = Memory(NAME, url=direct_url).to_dict()
        if mine != fresh:
            diff = {k: (mine.get(k), fresh.get(k)) for k in set(mine) | set(fresh) if mine.get(k) != fresh.get(k)}
            raise AssertionError(f"writer {writer}: its replica differs from a fresh load (mine, fresh): {diff!r}")
        model["nodes"] = {k: {"l": v["l"], "s": sorted(v["s"])} for k, v in model["nodes"].items()}
        report["model"] = {k: sorted(v) if isinstance(v, set) else v for k, v in model.items()}
    except BaseException:
        report["error"] = traceback.format_exc()
        start.abort()  # the others stop waiting for this writer
        finished.abort()
    Path(out).write_text(json.dumps(report))
