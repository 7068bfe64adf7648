"""Adversarial reproductions of bugs in the move to a Redis Functions library (each failed before its fix)."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Any

import redis
from servers import debian_redis

from redis_memory import Memory, RedisMemoryError

spawn = multiprocessing.get_context("spawn")


def flush_functions_until(url: str, started: Any, stop: Any) -> None:
    """Another process: FUNCTION FLUSH, over and over, until told to stop."""
    client = redis.Redis.from_url(url)
    client.function_flush()
    started.set()
    while not stop.is_set():
        client.function_flush()


def test_a_dict_key_holding_a_zero_byte_is_named_whole_in_its_change_event(client: redis.Redis) -> None:
    """`mem.d[0] = 1` (msgpack key b"\\x00") and `mem.d["a\\x00b"] = 2` must each arrive as an event
    whose path names the key: ("d", 0) and ("d", "a\\x00b"). The apply function now builds each
    key's part with string.format('%d:%s', #k, k); Lua 5.1's %s (on real servers) stops at the
    first zero byte of a string under 100 bytes, so the message says "1:" with no key: the
    subscriber gets path ("d",) - the whole dict - for both, instead of the key changed
    (on all three backends; ae2e7d8, which concatenated, passes)."""
    mem = Memory("feed", client=client)
    mem.d = {}
    with mem.subscribe() as feed:
        mem.d[0] = 1
        mem.d["a\x00b"] = 2
        mem.d["k"] = 3
        paths = []
        for _ in range(3):
            event = feed.get(timeout=10)
            assert event is not None
            paths.append(event.path)
    assert paths == [("d", 0), ("d", "a\x00b"), ("d", "k")]


def test_an_author_holding_a_zero_byte_is_named_whole_in_its_change_event(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """A memory made with author="bot\\x00 1" writes; a subscriber must see author "bot\\x00 1".
    The author's part is built with string.format('%d:%s'): on real servers it is cut at the
    zero byte, while its length prefix still says 6, so the message's parts no longer line up and
    the subscriber gets no event at all: feed.get(timeout=10) returns None (it passes on ae2e7d8)."""
    mine = Memory("feed", client=client)
    theirs = Memory("feed", client=other_client, author="bot\x00 1")
    theirs.d = {}
    with mine.subscribe() as feed:
        theirs.d["k"] = 1
        event = feed.get(timeout=10)
    assert event is not None
    assert (event.author, event.path) == ("bot\x00 1", ("d", "k"))


def test_a_full_server_still_serves_reads_and_deletes(real_url: str) -> None:
    """A server at its maxmemory (policy noeviction) refuses writes, but reads and DEL still run:
    a process must still read a memory another one changed, and `mem.delete()` is how a user
    frees memory. Every library function is now registered without flags, so the server refuses
    the whole FCALL up front: reading b.x (a sync) raises ServerRefused "... OOM command not
    allowed when used memory > 'maxmemory'." and so does a.delete(), which leaves the memory in
    place. With the EVALSHA scripts of ae2e7d8 both worked (read 2; the keys deleted)."""
    client, other = redis.Redis.from_url(real_url), redis.Redis.from_url(real_url)
    a, b = Memory("m", client=client), Memory("m", client=other)
    try:
        a.x = 1
        assert b.x == 1
        a.x = 2
        client.config_set("maxmemory", 1)
        try:
            seen = b.x
            a.delete()
        finally:
            client.config_set("maxmemory", 0)
        assert seen == 2
        assert client.exists(a._rm.store.key) == 0
    finally:
        a.close(timeout=0)
        b.close(timeout=0)


def test_writes_while_another_process_flushes_the_functions_raise_only_library_errors(real_url: str) -> None:
    """Another process runs FUNCTION FLUSH in a loop (a deploy script, an admin) while this one
    appends. Each append may fail, but only with a RedisMemoryError, and what this process holds
    must be what the server holds. Store._fcall reloads the library once and sends the FCALL
    again; when the second FCALL also meets "Function not found", send() re-raises redis-py's
    NoScriptError as is: the user gets `redis.exceptions.NoScriptError: ERR Function not found`
    (a third or more of the 300 appends on Redis 7.0 and Valkey), which `except RedisMemoryError` misses.
    (The EVALSHA code of ae2e7d8 had the same single retry under SCRIPT FLUSH.)"""
    mem = Memory("m", client=redis.Redis.from_url(real_url))
    mem.l = []
    started, stop = spawn.Event(), spawn.Event()
    flusher = spawn.Process(target=flush_functions_until, args=(real_url, started, stop))
    flusher.start()
    foreign: list[str] = []
    try:
        assert started.wait(30)
        for i in range(300):
            try:
                mem.l.append(i)
            except RedisMemoryError:
                pass
            except Exception as exc:  # what a user's `except RedisMemoryError` lets through
                foreign.append(f"{type(exc).__module__}.{type(exc).__name__}: {exc}")
    finally:
        stop.set()
        flusher.join(30)
    try:
        assert (len(foreign), foreign[:1]) == (0, [])
        assert list(mem.l) == Memory("m", client=redis.Redis.from_url(real_url)).to_dict()["l"]
    finally:
        mem.close(timeout=0)


def test_on_a_full_server_deleting_an_attribute_still_frees_it(real_url: str) -> None:
    """At maxmemory (noeviction), `del mem.big` is how a user makes room. The EVALSHA script of
    ae2e7d8 sent its HDEL (allowed when out of memory) before its HSET, and the delete went
    through. The apply function has no flags, so the server refuses the FCALL before it runs:
    `del a.big` raises ServerRefused "... OOM command not allowed when used memory >
    'maxmemory'." and the data stays (the server still holds ['big', 'keep'])."""
    client = redis.Redis.from_url(real_url)
    a = Memory("m", client=client)
    try:
        a.big = ["x" * 1000] * 50
        a.keep = 1
        client.config_set("maxmemory", 1)
        try:
            del a.big
        finally:
            client.config_set("maxmemory", 0)
        assert sorted(Memory("m", client=redis.Redis.from_url(real_url)).to_dict()) == ["keep"]
    finally:
        a.close(timeout=0)


def test_a_memory_read_through_a_read_only_replica_sees_the_latest_change(tmp_path: Path) -> None:
    """A process reads a memory through a replica (a read-only follower, or the old primary just
    demoted by a failover); another writes on the primary. Reads only read, and a replica serves
    them: with the EVALSHA scripts of ae2e7d8 the reader saw x == 2. The sync function has no
    'no-writes' flag, so the replica refuses its FCALL ("READONLY You can't write against a read
    only replica."), which the library takes for an unreachable server: the reader silently
    keeps serving the old x == 1 (a fresh Memory, which reads the hash whole, sees 2). Fails
    with `assert (1, 2) == (2, 2)`. (On a client whose link was already marked down, a fresh
    Memory raises ConnectionFailed "... was never loaded here: ... READONLY ...".)"""
    primary, replica = debian_redis(tmp_path / "primary"), debian_redis(tmp_path / "replica")
    try:
        on_primary, on_replica = redis.Redis.from_url(primary.url), redis.Redis.from_url(replica.url)
        on_replica.replicaof("127.0.0.1", primary.port)
        writer = Memory("m", client=on_primary)
        writer.x = 1

        def replicated(stamp: Any) -> None:
            deadline = time.monotonic() + 20
            while on_replica.hget("rm:memory:{m}", "v") != stamp:
                assert time.monotonic() < deadline, "the replica did not catch up"
                time.sleep(0.05)

        replicated(on_primary.hget("rm:memory:{m}", "v"))
        reader = Memory("m", client=on_replica)
        try:
            assert reader.x == 1
            writer.x = 2
            replicated(on_primary.hget("rm:memory:{m}", "v"))
            seen = reader.x
            fresh = Memory("m", client=redis.Redis.from_url(replica.url))
            try:
                fresh_seen = fresh.x
            except RedisMemoryError as exc:
                fresh_seen = repr(exc)
            finally:
                fresh.close(timeout=0)
            assert (seen, fresh_seen) == (2, 2)
        finally:
            reader.close(timeout=0)
            writer.close(timeout=0)
    finally:
        replica.stop()
        primary.stop()
