"""SPEC section 4 measured: each row a ratio against raw redis-py doing the same
work on the same server in the same run. Medians of interleaved samples.
The offline row is a time, not a ratio: there is no raw equivalent of a
write that cannot reach the server; nor is the change-event row, a latency
between two processes.

    python benchmarks/run.py                # Debian's redis-server and embedded Valkey
    python benchmarks/run.py --server redis # one of them
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netproxy import TcpProxy
from servers import EmbeddedServer, debian_redis

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


def server_time(client: redis.Redis, rounds: int = 9, per_round: int = 200) -> tuple[float, float, float]:
    """Microseconds the server spends per call (INFO commandstats): a plain append, a scalar set, a raw HSET.

    Medians of interleaved rounds, each on statistics reset just before it.
    """
    mem = ConversationMemory("server-time", client=client)
    mem.messages = []
    messages = mem.messages
    payload = msgpack.packb(message(0))
    counter = iter(range(10**9))
    samples: dict[str, list[float]] = {"append": [], "set": [], "hset": []}
    for _ in range(rounds):
        for kind in samples:
            client.config_resetstat()
            for _ in range(per_round):
                n = next(counter)
                if kind == "append":
                    messages.append(message(n))
                elif kind == "set":
                    mem.title = f"title {n}"
                else:
                    client.hset("raw-server-time", str(n), payload)
            stats = client.info("commandstats")
            samples[kind].append(stats["cmdstat_hset" if kind == "hset" else "cmdstat_fcall"]["usec_per_call"])
    return statistics.median(samples["append"]), statistics.median(samples["set"]), statistics.median(samples["hset"])


def bench(url: str, target: int | str) -> list[tuple[str, float, str]]:
    client = redis.Redis.from_url(url)
    client.flushall()
    rows: list[tuple[str, float, str]] = []
    payload = msgpack.packb(message(0))
    counter = iter(range(10**9))

    def raw_hset() -> None:
        client.hset("raw", str(next(counter)), payload)

    def raw_hget() -> None:
        client.hget("raw", "0")

    append_ratio: dict[int, float] = {}
    for size in (100, 1_000, 10_000):
        mem = ConversationMemory(f"append-{size}", client=client)
        mem.messages = []
        for start in range(0, size, 500):
            mem.messages.extend(message(i) for i in range(start, min(size, start + 500)))
        i = iter(range(size, 10**9))
        # each sample appends one message: the list grows by only 775 during the row
        # interleaved() calls the lambda only during this iteration, so late binding is harmless
        ratio = interleaved(raw_hset, lambda: mem.messages.append(message(next(i))))  # noqa: B023
        append_ratio[size] = ratio
        rows.append((f"mem.messages.append(m) at {size:,} messages", ratio, "<= 2.5"))
    rows.append(("growth: append at 10,000 / at 100", append_ratio[10_000] / append_ratio[100], "<= 1.2"))

    mem = ConversationMemory("append-1000", client=client)
    mem.title = "weather"
    rows.append(("len(mem.messages) at 1,000 messages", interleaved(raw_hget, lambda: len(mem.messages)), "<= 1.3"))
    rows.append(("mem.title", interleaved(raw_hget, lambda: mem.title), "<= 1.3"))

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

    def counted(packed: bytes) -> object:
        trips[0] += 1
        return send(packed)

    store._call_packed = counted  # type: ignore[method-assign]
    lib_batch()
    store._call_packed = send  # type: ignore[method-assign]
    label = f"a batch of 1,000 attribute sets ({trips[0]} round trips) / a pipeline of 1,000 HSETs"
    rows.append((label, ratio, "<= 2"))

    append_us, set_us, hset_us = server_time(client)
    rows.append((f"apply function, server time per plain append (an HSET: {hset_us:.1f} us)", append_us, "<= 12 us"))
    rows.append(("apply function, server time per scalar attribute set", set_us, "<= 12 us"))

    rows.append(listing_row(client))

    median_ms, p95_ms = event_latency(url)
    label = f"change event, agent A to agent B in another process (95th pct {p95_ms:.1f} ms)"
    rows.append((label, median_ms, "<= 50 ms"))

    median_s, worst_s = offline_writes(target, url)
    rows.append((f"100 appends while Redis is down, in all (slowest of 7: {worst_s:.3f} s)", median_s, "< 1 s"))
    client.flushall()
    return rows


def main() -> None:
    logging.getLogger("redis_memory").setLevel(logging.ERROR)  # the offline row's warnings are expected
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", choices=["redis", "valkey", "both"], default="both")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.server in ("redis", "both") and shutil.which("redis-server"):
            server = debian_redis(Path(tmp) / "redis")
            version = redis.Redis.from_url(server.url).info()["redis_version"]
            try:
                results[f"Redis {version}"] = bench(server.url, server.port)
            finally:
                server.stop()
        if args.server in ("valkey", "both"):
            embedded = EmbeddedServer(Path(tmp) / "valkey")
            info = redis.Redis.from_url(embedded.url).info()
            version = info.get("valkey_version") or info["redis_version"]
            try:
                results[f"embedded Valkey {version} (unix socket)"] = bench(embedded.url, embedded.socket_path)
            finally:
                embedded.stop()
    for name, rows in results.items():
        print(f"\n{name}, Python {sys.version.split()[0]}, {os.cpu_count()} cores")
        print(f"| {'what':<72} | {'ratio':>6} | target |")
        print(f"|{'-' * 74}|{'-' * 8}|--------|")
        for what, value, target in rows:
            if target.endswith(" ms"):
                shown = f"{value:.1f} ms"
            elif target.endswith(" us"):
                shown = f"{value:.1f} us"
            elif target.endswith(" s"):
                shown = f"{value:.3f} s"
            else:
                shown = f"{value:>5.2f}x"
            print(f"| {what:<72} | {shown:>6} | {target:>6} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
