"""SPEC section 4 measured: each row a ratio against raw redis-py doing the same
work on the same server in the same run. Medians of interleaved samples.
The offline row is a time, not a ratio: there is no raw equivalent of a
write that cannot reach the server; nor is the change-event row, a latency
between two processes.

    python benchmarks/run.py                  # Debian's redis-server and embedded Valkey
    python benchmarks/run.py --server redis   # one of them
    python benchmarks/run.py --server cluster # a 3+3 Redis Cluster of redis-server processes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterable
from pathlib import Path

import msgpack
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from async_rows import async_rows
from netproxy import TcpProxy
from servers import ClusterServer, EmbeddedServer, debian_redis

from redis_memory import ConversationMemory, Memory, Session

CONTENT = "The weather in Paris is mild today, with light wind from the west and a chance of rain in the evening. "


def message(i: int) -> dict[str, object]:
    return {"role": "user" if i % 2 else "assistant", "content": f"{i}: {CONTENT}"}


def median_ns(fn: Callable[[], object], samples: int) -> float:
    times = []
    for _ in range(samples):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times)


def interleaved(raw: Callable[[], object], lib: Callable[[], object], rounds: int = 31, per_round: int = 25) -> float:
    """Median over rounds of (library median / raw median), the two sampled back to back.

    Pairing each library sample with a raw one taken moments before cancels
    the drift of a shared, noisy machine.
    """
    ratios = []
    for _ in range(rounds):
        raw_ns = median_ns(raw, per_round)
        ratios.append(median_ns(lib, per_round) / raw_ns)
    return statistics.median(ratios)


class Wire:
    """A bare socket to the server: the "wire floor", one command's round trip with no client library at all."""

    def __init__(self, target: int | str) -> None:
        if isinstance(target, int):
            self.sock = socket.create_connection(("127.0.0.1", target))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(target)

    def command(self, *args: bytes) -> Callable[[], object]:
        """A call that sends ``args`` as one command and reads its (short) reply."""
        packed = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
        sock = self.sock

        def call() -> object:
            sock.sendall(packed)
            return sock.recv(65536)

        return call

    def close(self) -> None:
        self.sock.close()


def compared(
    what: str,
    raw: Callable[[], object],
    lib: Callable[[], object],
    wire: Callable[[], object],
    channel: object,
    target: str,
    rounds: int = 31,
    per_round: int = 25,
) -> tuple[str, float, str]:
    """A row: the library's call against raw redis-py, with its round trips and its figure against the wire floor.

    The three are sampled back to back in each round; the ratios are medians
    over rounds. Round trips are counted on the library's own connection.
    """
    ratios, floors = [], []
    for _ in range(rounds):
        raw_ns = median_ns(raw, per_round)
        wire_ns = median_ns(wire, per_round)
        lib_ns = median_ns(lib, per_round)
        ratios.append(lib_ns / raw_ns)
        floors.append(lib_ns / wire_ns)
    before = channel.round_trips  # type: ignore[attr-defined]
    for _ in range(20):
        lib()
    trips = (channel.round_trips - before) / 20  # type: ignore[attr-defined]
    label = f"{what} ({trips:g} round trips; {statistics.median(floors):.2f}x the wire floor)"
    return (label, statistics.median(ratios), target)


LOAD_SCRIPT = """
import sys, time, msgpack, redis
from redis_memory import ConversationMemory, Memory, Session
url, key, raw_key, mode = sys.argv[1:5]
client = redis.Redis.from_url(url)
client.ping()
start = time.perf_counter()
if mode == "raw":
    values = [msgpack.unpackb(v) for v in client.hgetall(raw_key).values()]
    n = len(values)
else:
    n = len(ConversationMemory(key, client=client).messages)
print(time.perf_counter() - start, n)
"""


def load_times(url: str, conv: str, raw_key: str, repeats: int = 5) -> tuple[float, float]:
    raws, libs = [], []
    for _ in range(repeats):
        for mode, out in (("raw", raws), ("lib", libs)):
            done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, url, conv, raw_key, mode],
                                  capture_output=True, text=True, check=True)  # fmt: skip
            seconds, n = done.stdout.split()
            assert int(n) == 10_000, n
            out.append(float(seconds))
    return statistics.median(raws), statistics.median(libs)


def offline_writes(target: int | str, url: str, writes: int = 100, repeats: int = 7) -> tuple[float, float]:
    """Seconds for ``writes`` appends while the server is unreachable (the first one finds out): median, max."""
    totals = []
    for n in range(repeats):
        proxy = TcpProxy(target)
        try:
            mem = ConversationMemory(f"offline-{n}", client=redis.Redis.from_url(proxy.url, socket_connect_timeout=2))
            mem.messages = []
            messages = mem.messages
            proxy.cut()
            start = time.perf_counter()
            for i in range(writes):
                messages.append(message(i))
            totals.append(time.perf_counter() - start)
            assert mem.status().pending == writes
            proxy.restore()
            assert mem.flush(timeout=30)
            assert len(ConversationMemory(f"offline-{n}", url=url).messages) == writes
        finally:
            proxy.close()
    return statistics.median(totals), max(totals)


LISTENER_SCRIPT = """
import json, sys, threading, time
from redis_memory import Session
url, session_id, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
received, done = {}, threading.Event()
def on_change(event):
    received[event.path[1]] = time.time()
    if len(received) == count:
        done.set()
b = Session(session_id, agent="B", url=url)
with b.shared.subscribe(on_change):
    print("ready", flush=True)
    done.wait(120)
print(json.dumps(received))
"""


def event_latency(url: str, count: int = 200) -> tuple[float, float]:
    """Agent A appends to a session's shared memory; agent B, another process, is called back.

    Milliseconds from just before A's append to B's callback: median, 95th percentile.
    """
    a = Session("latency", agent="A", url=url)
    a.shared.plan = []
    listener = subprocess.Popen([sys.executable, "-c", LISTENER_SCRIPT, url, "latency", str(count)],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert listener.stdout is not None
    assert listener.stdout.readline().strip() == "ready"
    sent = []
    for i in range(count):
        sent.append(time.time())
        a.shared.plan.append(i)
        time.sleep(0.01)
    received = json.loads(listener.stdout.readline())
    listener.wait(30)
    assert len(received) == count, len(received)
    latencies = sorted((received[str(i)] - sent[i]) * 1000 for i in range(count))
    return statistics.median(latencies), latencies[int(0.95 * count)]


def listing_row(client: redis.Redis) -> tuple[str, float, str]:
    """Listing the same 10 idle conversations among 100 and among 10,010: O(result) means the same time."""
    for n in range(10):
        ConversationMemory(f"idle-{n}", client=client, prefix="listing").messages = [message(n)]
    cutoff = time.time() + 0.75  # idle ones were written before, busy ones after
    time.sleep(1.5)
    timings, busy = {}, 0
    for total in (100, 10_010):
        while busy < total - 10:
            ConversationMemory(f"busy-{busy}", client=client, prefix="listing").messages = [message(busy)]
            busy += 1
        runs = []
        for _ in range(21):
            start = time.perf_counter()
            found = ConversationMemory.list_ids(idle_for=time.time() - cutoff, client=client, prefix="listing")
            runs.append(time.perf_counter() - start)
            assert len(found) == 10, len(found)
        timings[total] = statistics.median(runs)
    ms = timings[10_010] * 1000
    return (f"list 10 idle conversations among 10,010 / among 100 ({ms:.2f} ms)", timings[10_010] / timings[100], "~ 1")


#: The floor under any script's append: a function making the same Redis commands as the apply
#: function's fast append on an untracked connection (HMGET, TIME, HEXISTS, an HSET of as many
#: fields, PUBLISH), with the same keys and arguments, and no logic of its own.
FLOOR_LIBRARY = """#!lua name=redis_memory_bench_floor
local function floor(KEYS, ARGV)
  local K = KEYS[1]
  redis.call('HMGET', K, 'i', 'v', 'c', 'w' .. ARGV[1], 'h' .. ARGV[10])
  redis.call('TIME')
  redis.call('HEXISTS', K, 'h' .. ARGV[7])
  redis.call('HSET', K, 'e1:' .. ARGV[7], ARGV[18], 'h1', ARGV[8], 'v', ARGV[8], 'j', ARGV[8], 'ta', ARGV[7],
    'w' .. ARGV[1], ARGV[7])
  redis.pcall('PUBLISH', K .. ':feed', ARGV[8])
  return {'ok', ARGV[8], ARGV[2], '', ARGV[8], '1', ''}
end
redis.register_function('redis_memory_bench_floor', floor)
"""


def floor_call(client: redis.Redis, n: int, payload: bytes) -> None:
    """The floor function (:data:`FLOOR_LIBRARY`), called with the arguments of the ``n``-th plain append."""
    seq, token = b"%d" % n, b"floor%x" % n
    args = (b"floor", b"*", b"0", b"", b"PUBLISH", b"1", seq, token, b"lappend", b"1", token,
            b"0", b"0", b"4", b"1", b"0", b"f", payload, b"")  # fmt: skip
    client.fcall("redis_memory_bench_floor", 2, "floor-server-time", "floor-server-time:w", *args)


def server_time(client: redis.Redis, rounds: int = 9, per_round: int = 200) -> dict[str, float]:
    """Microseconds the server spends per call (INFO commandstats), by kind of call.

    A plain append, a scalar set, a nested dict's key set, a raw HSET, and the floor (:data:`FLOOR_LIBRARY`) called with
    an append's arguments. Medians of interleaved rounds, each on statistics reset just before it.
    """
    mem = ConversationMemory("server-time", client=client)
    mem.messages = []
    messages = mem.messages
    payload = msgpack.packb(message(0))
    client.function_load(FLOOR_LIBRARY, replace=True)
    counter = iter(range(10**9))
    mem.context = {"topic": "none"}
    samples: dict[str, list[float]] = {"append": [], "set": [], "nested": [], "hset": [], "floor": []}
    try:
        for _ in range(rounds):
            for kind in samples:
                client.config_resetstat()
                for _ in range(per_round):
                    n = next(counter)
                    if kind == "append":
                        messages.append(message(n))
                    elif kind == "set":
                        mem.title = f"title {n}"
                    elif kind == "nested":
                        mem.context["topic"] = f"topic {n}"
                    elif kind == "hset":
                        client.hset("raw-server-time", str(n), payload)
                    else:
                        floor_call(client, n, payload)
                stats = client.info("commandstats")
                samples[kind].append(stats["cmdstat_hset" if kind == "hset" else "cmdstat_fcall"]["usec_per_call"])
    finally:
        client.function_delete("redis_memory_bench_floor")
    return {kind: statistics.median(values) for kind, values in samples.items()}


CONTENDED_SCRIPT = """
import json, sys, time
import redis
from redis_memory import ConversationMemory
url, mode, worker, count, start_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
client = redis.Redis.from_url(url)
mem = ConversationMemory("contended", client=client)
mem.messages  # loaded before the clock starts
while time.time() < start_at:
    time.sleep(0.001)
begin = time.perf_counter()
for i in range(count):
    item = {"role": "user", "content": f"{worker}:{i}"}
    if mode == "raw":
        client.rpush("raw-contended", json.dumps(item))
    elif mode == "add":
        mem.add_message(item)
    else:
        mem.messages.append(item)
print(time.perf_counter() - begin)
"""


def contended(url: str, processes: int = 8, count: int = 300, way: str = "lib") -> tuple[float, int, int]:
    """Aggregate appends per second of ``processes`` processes on one conversation, over the same with raw RPUSH.

    ``way``: "lib" appends with ``mem.messages.append(m)`` (a read of the
    attribute, then the append), "add" with ``mem.add_message(m)``. Also the
    appends lost and duplicated (both must be 0).
    """
    client = redis.Redis.from_url(url)
    ConversationMemory("contended", client=client).messages = []
    rates = {}
    for mode in ("raw", way):
        start_at = time.time() + 2.0
        command = [sys.executable, "-c", CONTENDED_SCRIPT, url, mode]
        workers = [
            subprocess.Popen([*command, str(n), str(count), str(start_at)], stdout=subprocess.PIPE, text=True)
            for n in range(processes)
        ]
        seconds = [float(worker.communicate(timeout=300)[0]) for worker in workers]
        rates[mode] = processes * count / max(seconds)
    stored = [f"{m['content']}" for m in ConversationMemory("contended", client=client).messages]
    expected = {f"{n}:{i}" for n in range(processes) for i in range(count)}
    lost, duplicated = len(expected - set(stored)), len(stored) - len(set(stored))
    return rates[way] / rates["raw"], lost, duplicated


Row = tuple[str, float, str]


def shown(row: Row) -> str:
    """One row of the table: what, the figure in its unit, the target."""
    what, value, target = row
    if target.endswith(" ms"):
        figure = f"{value:.1f} ms"
    elif target.endswith(" us"):
        figure = f"{value:.1f} us"
    elif target in ("ops/s", "B", "us"):
        figure = f"{value:,.0f}" if target != "us" else f"{value:.1f}"
    elif target.endswith(" s"):
        figure = f"{value:.3f} s"
    else:
        figure = f"{value:>5.2f}x"
    return f"| {what:<72} | {figure:>6} | {target:>6} |"


class Rows(list[Row]):
    """The rows of one server, each printed (to stderr) once measured: a run cut short still shows them."""

    def append(self, row: Row) -> None:
        super().append(row)
        print(shown(row), file=sys.stderr, flush=True)

    def extend(self, rows: Iterable[Row]) -> None:
        for row in rows:
            self.append(row)


def bench(url: str, target: int | str, rows: Rows) -> Rows:
    client = redis.Redis.from_url(url)
    client.flushall()
    payload = msgpack.packb(message(0))
    counter = iter(range(10**9))
    wire = Wire(target)
    as_json = json.dumps(message(0)).encode()

    def raw_hset() -> None:
        client.hset("raw", str(next(counter)), payload)

    def raw_hget() -> None:
        client.hget("raw", "0")

    def raw_rpush() -> None:
        client.rpush("raw-list", as_json)

    wire_rpush = wire.command(b"RPUSH", b"wire-list", as_json)
    wire_hget = wire.command(b"HGET", b"raw", b"0")

    append_ratio: dict[int, float] = {}
    for size in (100, 1_000, 10_000):
        mem = ConversationMemory(f"append-{size}", client=client)
        mem.messages = []
        for start in range(0, size, 500):
            mem.messages.extend(message(i) for i in range(start, min(size, start + 500)))
        i = iter(range(size, 10**9))
        # each sample appends one message: the list grows by only 775 during the row
        # compared() calls the lambda only during this iteration, so late binding is harmless
        row = compared(f"mem.messages.append(m) at {size:,} messages", raw_rpush,
                       lambda: mem.messages.append(message(next(i))),  # noqa: B023
                       wire_rpush, mem._rm.store.channel, "<= 2.5")  # fmt: skip
        append_ratio[size] = row[1]
        rows.append(row)
    rows.append(("growth: append at 10,000 / at 100", append_ratio[10_000] / append_ratio[100], "<= 1.2"))

    mem = ConversationMemory("append-1000", client=client)
    mem.title = "weather"
    held = mem.messages
    j = iter(range(2000, 10**9))
    channel = mem._rm.store.channel
    rows.append(compared("held.append(m), a proxy held in a variable", raw_rpush,
                         lambda: held.append(message(next(j))), wire_rpush, channel, "<= 1.2"))  # fmt: skip
    rows.append(compared("len(mem.messages) at 1,000 messages", raw_hget, lambda: len(mem.messages), wire_hget,
                         channel, "<= 1.3"))  # fmt: skip
    rows.append(compared("mem.title", raw_hget, lambda: mem.title, wire_hget, channel, "<= 1.3"))

    tracked = ConversationMemory("append-1000", client=client, tracking=True)
    tracked_held = tracked.messages
    channel = tracked._rm.store.channel
    rows.append(compared("tracking=True: mem.title, unchanged", raw_hget, lambda: tracked.title, wire_hget, channel,
                         "<= 0.1"))  # fmt: skip
    rows.append(compared("tracking=True: len(mem.messages), unchanged", raw_hget, lambda: len(tracked.messages),
                         wire_hget, channel, "<= 0.1"))  # fmt: skip
    rows.append(compared("tracking=True: mem.messages.append(m)", raw_rpush,
                         lambda: tracked.messages.append(message(next(j))), wire_rpush, channel, "<= 1.3"))  # fmt: skip
    rows.append(compared("tracking=True: held.append(m)", raw_rpush,
                         lambda: tracked_held.append(message(next(j))), wire_rpush, channel, "<= 1.2"))  # fmt: skip
    # What any script's append costs: redis-py calling the floor function with an append's arguments.
    client.function_load(FLOOR_LIBRARY, replace=True)
    calls = types.SimpleNamespace(round_trips=0)  # one FCALL each

    def floor_append() -> None:
        calls.round_trips += 1
        floor_call(client, next(j), payload)

    rows.append(compared("  floor: redis-py FCALL of a function making only the append's Redis commands", raw_rpush,
                         floor_append, wire_rpush, calls, "-"))  # fmt: skip
    client.function_delete("redis_memory_bench_floor")

    for tracking in (False, True):
        # A memory built per request (a web handler), in a process that served the conversation before.
        def per_request(tracking: bool = tracking) -> None:
            ConversationMemory("append-1000", client=client, tracking=tracking).messages.append(message(next(j)))

        per_request()
        label = "a new ConversationMemory(id) per request + one append, 1,000 messages, warm process"
        channel = ConversationMemory("append-1000", client=client, tracking=tracking)._rm.store.channel
        rows.append(compared(label + (", tracking=True" if tracking else ""), raw_rpush, per_request, wire_rpush,
                             channel, "<= 2"))  # fmt: skip
    wire.close()

    conv = ConversationMemory("load-10000", client=client)
    conv.messages = []
    messages = [message(i) for i in range(10_000)]
    for start in range(0, 10_000, 500):
        conv.messages.extend(messages[start : start + 500])
    client.hset("raw-load", mapping={str(n): msgpack.packb(m) for n, m in enumerate(messages)})
    raw_s, lib_s = load_times(url, "load-10000", "raw-load")
    load_label = f"load 10,000 messages in a new process ({lib_s * 1000:.0f} ms vs {raw_s * 1000:.0f} ms)"
    rows.append((load_label, lib_s / raw_s, "<= 2"))

    small = ConversationMemory("memory-1000", client=client)
    small.messages = []
    for start in range(0, 1000, 500):
        small.messages.extend(messages[start : start + 500])
    used = client.memory_usage(small.key, samples=0)
    packed = len(msgpack.packb(messages[:1000]))
    rows.append((f"Redis memory, 1,000 messages ({used:,} B vs {packed:,} B msgpack)", used / packed, "<= 2"))

    bounded = ConversationMemory("bounded", client=client, max_messages=100)
    bounded.messages = [message(i) for i in range(100)]
    j = iter(range(100, 10**9))
    ratio = interleaved(raw_hset, lambda: bounded.messages.append(message(next(j))))
    rows.append(("append with max_messages=100, list full (trims one per append)", ratio, "<= 2.5"))
    rows.append(("  the same / the untrimmed append at 100 messages", ratio / append_ratio[100], "~ 1"))
    while next(j) < 10_000:
        bounded.messages.append(message(0))
    at_10k = client.memory_usage(bounded.key, samples=0)
    while next(j) < 100_000:
        bounded.messages.append(message(0))
    at_100k = client.memory_usage(bounded.key, samples=0)
    rows.append((f"Redis memory after 100,000 / 10,000 bounded appends ({at_100k:,} B)", at_100k / at_10k, "flat"))

    batched = Memory("batch", client=client)
    batched.seed = 0
    rounds = iter(range(10**9))

    def raw_pipeline() -> None:
        pipe = client.pipeline(transaction=False)
        base = next(rounds) * 1000
        for k in range(1000):
            pipe.hset("raw-batch", f"k{k}", base + k)
        pipe.execute()

    def lib_batch() -> None:
        base = next(rounds) * 1000
        with batched.batch():
            for k in range(1000):
                batched[f"k{k}"] = base + k

    ratio = interleaved(raw_pipeline, lib_batch, rounds=9, per_round=3)
    store, trips = batched._rm.store, [0]
    send = store._call_packed

    def counted(packed: bytes, *rest: object) -> object:
        trips[0] += 1
        return send(packed, *rest)

    store._call_packed = counted  # type: ignore[method-assign]
    lib_batch()
    store._call_packed = send  # type: ignore[method-assign]
    label = f"a batch of 1,000 attribute sets ({trips[0]} round trips) / a pipeline of 1,000 HSETs"
    rows.append((label, ratio, "<= 2"))

    times = server_time(client)
    label = f"apply function, server time per plain append (an HSET: {times['hset']:.1f} us)"
    rows.append((label, times["append"], "<= 12 us"))
    rows.append(("apply function, server time per scalar attribute set", times["set"], "<= 12 us"))
    rows.append(("  per scalar set of a nested dict's key (mem.context[k] = v)", times["nested"], "us"))
    rows.append(("  floor: a function making only the append's Redis commands, no logic", times["floor"], "us"))

    ratio, lost, duplicated = contended(url)
    label = f"8 processes appending to one conversation ({lost} lost, {duplicated} duplicated) / 8 doing RPUSH"
    rows.append((label, ratio, ">= 0.5"))
    ratio, lost, duplicated = contended(url, way="add")
    label = f"  the same with mem.add_message(m) ({lost} lost, {duplicated} duplicated) / 8 doing RPUSH"
    rows.append((label, ratio, ">= 0.5"))

    rows.append(listing_row(client))

    median_us, p99_us, worst_us = invalidation_window(url)
    label = (f"tracking=True: a write's invalidation reaches a reader after its reply "
             f"(99th pct {p99_us:.0f} us, max {worst_us:.0f} us)")  # fmt: skip
    rows.append((label, median_us, "us"))

    median_ms, p95_ms = event_latency(url)
    label = f"change event, agent A to agent B in another process (95th pct {p95_ms:.1f} ms)"
    rows.append((label, median_ms, "<= 50 ms"))

    median_s, worst_s = offline_writes(target, url)
    rows.append((f"100 appends while Redis is down, in all (slowest of 7: {worst_s:.3f} s)", median_s, "< 1 s"))
    rows.extend(async_rows(url))
    rows.append(small_memories(client))
    # Values up to 64 bytes keep a small hash in Redis's compact encoding by default; messages are longer.
    default = client.config_get("hash-max-listpack-value")
    client.config_set("hash-max-listpack-value", 512)
    try:
        label, ratio, target = small_memories(client)
        rows.append((f"{label}, hash-max-listpack-value 512", ratio, target))
    finally:
        client.config_set("hash-max-listpack-value", next(iter(default.values())))
    client.flushall()
    return rows


def small_memories(client: redis.Redis, count: int = 10_000, size: int = 10) -> tuple[str, float, str]:
    """Redis memory of ``count`` conversations of ``size`` messages, against the same messages as raw JSON lists.

    Both measured as the growth of the server's used memory (INFO), so the
    library's writer index and listing count too.
    """
    client.execute_command("FLUSHALL", "SYNC")  # Valkey frees a plain FLUSHALL lazily: the figures would move
    messages = [message(i) for i in range(size)]
    encoded = [json.dumps(m) for m in messages]

    def used() -> int:
        return int(client.info("memory")["used_memory"])

    start = used()
    pipe = client.pipeline(transaction=False)
    for n in range(count):
        pipe.rpush(f"raw-small-{n}", *encoded)
    pipe.execute()
    raw = used() - start
    start = used()
    for n in range(count):
        ConversationMemory(f"small-{n}", client=client).messages = messages
    lib = used() - start
    label = f"Redis memory, {count:,} conversations x {size} messages ({lib:,} B vs {raw:,} B as raw JSON lists)"
    return (label, lib / raw, "<= 1.3")


WINDOW_SCRIPT = """
import json, select, sys, time
from redis_memory import Memory
url, rounds = sys.argv[1], int(sys.argv[2])
mem = Memory("window", url=url, tracking=True)
mem.n, mem.n  # loaded and marked: the server tracks the key for this connection
sock = mem._rm.store.channel.conn._sock
print("ready", flush=True)
arrivals, seen = [], []
for _ in range(rounds):
    select.select([sock], [], [], 10)
    arrivals.append(time.monotonic())  # CLOCK_MONOTONIC: one clock for every process of the machine
    seen.append(mem.n)  # takes the invalidation in, checks the version, is tracked again
print(json.dumps([arrivals, seen]))
"""


def invalidation_window(url: str, rounds: int = 300) -> tuple[float, float, float]:
    """How long after a writer has its reply the invalidation reaches a tracked reader's socket (microseconds).

    The writer is this process, the reader another; both read CLOCK_MONOTONIC.
    A read in that window can miss the write: the median, the 99th
    percentile and the largest of ``rounds`` writes, 0 when the invalidation
    came first.
    """
    writer = Memory("window", url=url)
    writer.n = -1
    command = [sys.executable, "-c", WINDOW_SCRIPT, url, str(rounds)]
    reader = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert reader.stdout is not None and reader.stdout.readline().strip() == "ready"
    replied = []
    for n in range(rounds):
        time.sleep(0.005)  # the reader has caught up and is tracked again
        writer.n = n
        replied.append(time.monotonic())
    arrivals, seen = json.loads(reader.communicate(timeout=120)[0])
    assert seen == list(range(rounds)), "a tracked read missed a write whose invalidation had arrived"
    gaps = sorted(max(0.0, (arrived - done) * 1e6) for arrived, done in zip(arrivals, replied, strict=True))
    return statistics.median(gaps), gaps[int(len(gaps) * 0.99)], gaps[-1]


THROUGHPUT_SCRIPT = """
import sys, time
from redis_memory import ConversationMemory
url, first, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
mems = [ConversationMemory(f"chat-{n}", url=url) for n in range(first, first + count)]
for mem in mems:
    mem.messages = []
chats = [mem.messages for mem in mems]
message = {"role": "user", "content": "x" * 110}
done, end = 0, time.perf_counter() + seconds
while time.perf_counter() < end:
    chats[done % count].append(message)
    done += 1
print(done)
"""


def cluster_bench(cluster: ClusterServer, rows: Rows) -> Rows:
    """Rows for docs/scaling.md: the append through the cluster router, per-shard capacity and memory, events."""
    client = cluster.client()
    payload = msgpack.packb(message(0))
    counter = iter(range(10**9))
    mem = ConversationMemory("append-cluster", client=client)
    mem.messages = [message(i) for i in range(100)]
    node = redis.Redis(port=cluster.master_of(mem.key))  # raw redis-py, straight to the key's master
    raw_key = "raw{" + mem.key.partition("{")[2]  # the same slot

    def raw_hset() -> None:
        node.hset(raw_key, str(next(counter)), payload)

    def cluster_hset() -> None:
        client.hset(raw_key, str(next(counter)), payload)

    i = iter(range(100, 10**9))
    node.config_resetstat()
    rows.append(("mem.messages.append(m), RedisCluster client, vs HSET on the key's master", interleaved(
        raw_hset, lambda: mem.messages.append(message(next(i)))), "<= 2.5"))  # fmt: skip
    # Server time per write, one writer: the apply script's own cost, what bounds a shard's writes per second.
    per_call = node.info("commandstats")["cmdstat_fcall"]["usec_per_call"]
    rows.append(("  server time per append (FCALL usec_per_call on that master)", per_call, "us"))
    rows.append(("  so one shard's core can apply at most (appends/s)", 1e6 / per_call, "ops/s"))
    rows.append(("  raw RedisCluster.hset vs raw redis.Redis.hset on that master", interleaved(
        raw_hset, cluster_hset), "-"))  # fmt: skip

    procs, per_proc, seconds = 4, 50, 5.0
    workers = [
        subprocess.Popen([sys.executable, "-c", THROUGHPUT_SCRIPT, cluster.url, str(n * per_proc), str(per_proc),
                          str(seconds)], stdout=subprocess.PIPE, text=True)
        for n in range(procs)
    ]  # fmt: skip
    total = sum(int(w.communicate()[0]) for w in workers)
    rows.append((f"appends/s, {procs} processes x {per_proc} conversations, whole cluster", total / seconds, "ops/s"))

    conv = ConversationMemory("sized", client=client)
    conv.messages = [message(n) for n in range(20)]
    conv.title = "weather"
    owner = redis.Redis(port=cluster.master_of(conv.key))
    used = sum(owner.memory_usage(key, samples=0) or 0 for key in (conv.key, conv.key + ":w"))
    rows.append(("Redis memory of a 20-message conversation: hash and writer index (B)", used, "B"))

    median_ms, p95_ms = event_latency(cluster.url)
    label = f"change event on the cluster, agent A to agent B in another process (95th pct {p95_ms:.1f} ms)"
    rows.append((label, median_ms, "<= 50 ms"))
    cluster.flushall()
    return rows


def main() -> None:
    logging.getLogger("redis_memory").setLevel(logging.ERROR)  # the offline row's warnings are expected
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", choices=["redis", "valkey", "both", "cluster"], default="both")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    results: dict[str, Rows] = {}

    def measure(name: str, run: Callable[[Rows], object]) -> None:
        print(f"\n{name}: measuring", file=sys.stderr, flush=True)
        results[name] = Rows()
        run(results[name])

    try:
        with tempfile.TemporaryDirectory() as tmp:
            if args.server in ("redis", "both") and shutil.which("redis-server"):
                server = debian_redis(Path(tmp) / "redis")
                version = redis.Redis.from_url(server.url).info()["redis_version"]
                try:
                    measure(f"Redis {version}", lambda rows: bench(server.url, server.port, rows))
                finally:
                    server.stop()
            if args.server == "cluster":
                cluster = ClusterServer(Path(tmp) / "cluster")
                try:
                    measure("Redis 7.0 Cluster, 3 masters + 3 replicas", lambda rows: cluster_bench(cluster, rows))
                finally:
                    cluster.stop()
            if args.server in ("valkey", "both"):
                embedded = EmbeddedServer(Path(tmp) / "valkey")
                info = redis.Redis.from_url(embedded.url).info()
                version = info.get("valkey_version") or info["redis_version"]
                try:
                    measure(
                        f"embedded Valkey {version} (unix socket)",
                        lambda rows: bench(embedded.url, embedded.socket_path, rows),
                    )
                finally:
                    embedded.stop()
    finally:
        # What was measured is shown even if a row failed (--json keeps only a whole run).
        for name, rows in results.items():
            print(f"\n{name}, Python {sys.version.split()[0]}, {os.cpu_count()} cores")
            print(f"| {'what':<72} | {'ratio':>6} | target |")
            print(f"|{'-' * 74}|{'-' * 8}|--------|")
            for row in rows:
                print(shown(row))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
