"""The change feed: events published by the write scripts, as an iterator and as callbacks."""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing
import os
import threading
import time
from typing import Any

import pytest
import redis
from conftest import REAL_BACKENDS, Switch, everywhere
from workers import agent_listens

from redis_memory import ConversationMemory, Event, Feed, Memory, Session
from redis_memory import feed as feed_module

spawn = multiprocessing.get_context("spawn")


def take(feed: Feed, count: int) -> list[tuple[str, tuple[Any, ...], str | None]]:
    """The next ``count`` events as (op, path, author); fails if they do not come within 10 s."""
    found = []
    for _ in range(count):
        event = feed.get(timeout=10)
        assert event is not None, f"only {len(found)} of {count} events came: {found}"
        assert event.attribute == (event.path[0] if event.path else None)
        found.append((event.op, event.path, event.author))
    return found


def test_each_change_is_an_event_naming_what_changed(client: redis.Redis, other_client: redis.Redis) -> None:
    """Every kind of write, by another memory object, arrives with its op, path and author."""
    mine = Memory("feed", client=client)
    theirs = Memory("feed", client=other_client, author="bob")
    steps = [
        (lambda: setattr(theirs, "context", {"topic": "billing"}), [("set", ("context",))]),
        (lambda: theirs.context.__setitem__("topic", "refunds"), [("set", ("context", "topic"))]),
        (lambda: theirs.context.update(a=1, b=2), [("set", ("context", "a")), ("set", ("context", "b"))]),
        (lambda: theirs.context.pop("a"), [("delete", ("context", "a"))]),
        (lambda: setattr(theirs, "messages", []), [("set", ("messages",))]),
        (lambda: theirs.messages.append({"role": "user"}), [("append", ("messages", 0))]),
        (lambda: theirs.messages.extend([1, 2]), [("append", ("messages", 1)), ("append", ("messages", 2))]),
        (lambda: theirs.messages.insert(0, "first"), [("insert", ("messages", 0))]),
        (lambda: theirs.messages[1].__setitem__("content", "hi"), [("set", ("messages", 1, "content"))]),
        (lambda: theirs.messages.__setitem__(2, 10), [("set", ("messages", 2))]),
        (lambda: theirs.messages.pop(), [("delete", ("messages", 3))]),
        (lambda: theirs.messages.sort(key=str), [("replace", ("messages",))]),
        (lambda: theirs.context.clear(), [("clear", ("context",))]),
        (lambda: delattr(theirs, "context"), [("delete", ("context",))]),
    ]
    with mine.subscribe() as feed:
        for write, expected in steps:
            write()
            assert take(feed, len(expected)) == [(op, path, "bob") for op, path in expected]
        assert feed.get(timeout=0.2) is None  # nothing more than what was written


def test_events_carry_the_version_and_the_server_time(client: redis.Redis) -> None:
    """Versions count up by one per change; the time is the server's, now; no-op writes publish nothing."""
    mem = ConversationMemory("versions", client=client)
    mem.messages = []
    with mem.subscribe() as feed:
        before = dt.datetime.now(dt.UTC)
        for i in range(5):
            mem.messages.append(i)
        mem.messages.sort()  # already sorted: changes nothing
        mem.messages.append(5)
        events = [feed.get(timeout=10) for _ in range(6)]
        assert feed.get(timeout=0.2) is None
    assert all(isinstance(e, Event) for e in events)
    versions = [e.version for e in events if e is not None]
    assert versions == list(range(versions[0], versions[0] + 6))
    for e in events:
        assert e is not None and e.memory == "versions" and e.author is None
        assert abs((e.time - before).total_seconds()) < 60


def test_deleting_the_memory_is_a_clear_of_the_whole_memory(client: redis.Redis) -> None:
    """delete() publishes a clear with no attribute; the memory written again counts from version 1."""
    mem = Memory("gone", client=client)
    mem.title = "x"
    with mem.subscribe() as feed:
        mem.delete()
        mem.title = "y"
        cleared, written = feed.get(timeout=10), feed.get(timeout=10)
    assert cleared is not None and (cleared.op, cleared.attribute, cleared.path) == ("clear", None, ())
    assert written is not None and (written.op, written.path, written.version) == ("set", ("title",), 1)


def test_a_callback_gets_every_event_and_survives_its_own_errors(
    client: redis.Redis, other_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """subscribe(callback) calls back from a thread; an exception is logged and later events still come."""
    seen: list[tuple[Any, ...]] = []
    done = threading.Event()

    def callback(event: Event) -> None:
        seen.append(event.path)
        if len(seen) == 1:
            raise RuntimeError("first one fails")
        if len(seen) == 3:
            done.set()

    listener = ConversationMemory("callbacks", client=client)
    writer = ConversationMemory("callbacks", client=other_client)
    with caplog.at_level(logging.ERROR, logger="redis_memory"), listener.subscribe(callback):
        writer.title = "a"
        writer.messages = ["m"]
        writer.messages.append("n")
        assert done.wait(10), seen
    assert seen == [("title",), ("messages",), ("messages", 1)]
    assert "change callback raised" in caplog.text and "first one fails" in caplog.text


def test_closing_a_feed_ends_iteration(client: redis.Redis) -> None:
    """A for loop over a feed ends when another thread closes it."""
    mem = Memory("closing", client=client)
    feed = mem.subscribe()
    threading.Timer(0.3, feed.close).start()
    started = time.monotonic()
    assert list(feed) == []
    assert time.monotonic() - started < 10


def test_bad_arguments_are_refused(client: redis.Redis) -> None:
    with pytest.raises(TypeError, match="callable"):
        Memory("bad", client=client).subscribe("not a function")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="author"):
        Memory("bad", client=client, author=7)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", REAL_BACKENDS)
def test_a_feed_that_lost_its_link_says_resync(client: redis.Redis, switch: Switch) -> None:
    """Changes made while the subscriber was cut off are not replayed: a resync event says to read again."""
    listener = Memory("resync", client=switch.client())
    writer = Memory("resync", client=client)
    writer.log = []
    with listener.subscribe() as feed:
        writer.log.append(1)
        assert take(feed, 1) == [("append", ("log", 0), None)]
        switch.cut()
        assert feed.get(timeout=0.5) is None  # notices the lost link
        writer.log.append(2)  # published while the subscriber is away
        switch.restore()
        event = feed.get(timeout=10)
        assert event is not None and (event.op, event.path) == ("resync", ())
        assert listener.log == [1, 2]
        writer.log.append(3)
        assert take(feed, 1) == [("append", ("log", 2), None)]


def retrying_client(servers: dict[str, Any], backend: str) -> Any:
    """A client as redis.Redis() makes one with no options: its connections retry a command three times."""
    if backend == "cluster":
        return servers["cluster"].client()
    if backend == "valkey":
        return redis.Redis(unix_socket_path=servers["valkey"].socket_path)
    return redis.Redis(host="127.0.0.1", port=servers[backend].port)


@pytest.mark.parametrize("backend", REAL_BACKENDS)
@pytest.mark.parametrize("seen_before", [False, True])
def test_a_feed_whose_connection_was_killed_says_resync(
    servers: dict[str, Any], client: redis.Redis, backend: str, seen_before: bool
) -> None:
    """The server closes the subscriber's connection (CLIENT KILL) and a change is made before the feed
    reads again: the change is not lost silently, a resync event says to read again. Also with a client
    whose own connections reconnect by themselves."""
    writer = Memory("killed", client=client)
    writer.log = []
    with Memory("killed", client=retrying_client(servers, backend)).subscribe() as feed:
        if seen_before:
            writer.log.append(0)
            assert take(feed, 1) == [("append", ("log", 0), None)]
        everywhere(client, "CLIENT", "KILL", "TYPE", "pubsub")
        time.sleep(0.3)
        writer.log.append(1)  # published while the subscriber's connection is gone
        event = feed.get(timeout=10)
        assert event is not None and (event.op, event.path) == ("resync", ())
        writer.log.append(2)
        assert take(feed, 1) == [("append", ("log", 2 if seen_before else 1), None)]


@pytest.mark.parametrize("backend", REAL_BACKENDS)
@pytest.mark.parametrize("garbage", [b"garbage\r\n", b"*1\r\n:1\r\n", b">2\r\n:1\r\n:2\r\n"])
def test_bytes_that_are_not_a_message_on_the_feed_link_are_a_broken_link(
    client: redis.Redis, switch: Switch, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever comes on the subscribed connection that is not a message: the feed subscribes again and says
    resync, in either mode, without an error logged (the callback never raised)."""
    listener = Memory("garbled", client=switch.client())
    writer = Memory("garbled", client=client)
    writer.log = []
    with listener.subscribe() as feed:
        writer.log.append(1)
        assert take(feed, 1) == [("append", ("log", 0), None)]
        switch.inject(garbage)
        assert take(feed, 1) == [("resync", (), None)]
        writer.log.append(2)
        assert take(feed, 1) == [("append", ("log", 1), None)]
    seen: list[str] = []

    def wait_for(op: str, count: int) -> None:
        deadline = time.monotonic() + 10
        while seen.count(op) < count:
            assert time.monotonic() < deadline, seen
            time.sleep(0.02)

    with caplog.at_level(logging.ERROR, logger="redis_memory"), listener.subscribe(lambda e: seen.append(e.op)):
        time.sleep(0.5)  # subscribed
        writer.log.append(3)
        wait_for("append", 1)
        switch.inject(garbage)
        wait_for("resync", 1)
        writer.log.append(4)
        wait_for("append", 2)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert len(caplog.records) < 20  # no loop logging the same failure over and over


@pytest.mark.parametrize("backend", REAL_BACKENDS)
def test_writes_queued_offline_are_published_when_replayed(client: redis.Redis, switch: Switch) -> None:
    """A memory cut off queues its appends; their events come when the queue reaches Redis."""
    writer = ConversationMemory("replayed", client=switch.client(), author="offline-agent")
    writer.messages = []
    listener = ConversationMemory("replayed", client=client)
    with listener.subscribe() as feed:
        switch.cut()
        for i in range(3):
            writer.messages.append(i)
        assert writer.status().pending == 3
        assert feed.get(timeout=0.3) is None
        switch.restore()
        assert writer.flush(timeout=30)
        assert take(feed, 3) == [("append", ("messages", i), "offline-agent") for i in range(3)]


def test_an_agent_in_another_process_sees_the_change_and_not_the_private_memory(real_url: str) -> None:
    """Agent A writes to .shared; agent B, in another process, gets the event; neither reads the other's notes."""
    a = Session("team", agent="A", url=real_url)
    a.shared.plan = []
    a.private.notes = "A only"
    subscribed = spawn.Event()
    results = spawn.Queue()
    b = spawn.Process(target=agent_listens, args=(real_url, "team", subscribed, results))
    b.start()
    try:
        assert subscribed.wait(60)
        a.shared.plan.append("search the docs")
        reported = results.get(timeout=60)
    finally:
        b.join(60)
    assert b.exitcode == 0
    assert reported == ("append", "plan", ("plan", 0), "A", "search the docs")
    assert results.empty()  # B could not open A's memory
    assert a.agents() == ["A"]


def test_a_memory_deleted_and_made_again_gets_paths_from_the_new_one(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """Node ids restart in a new memory: events after a delete name the new containers, not the old."""
    writer = Memory("again", client=client)
    with Memory("again", client=other_client).subscribe() as feed:
        writer.a = []
        for i in range(3):
            writer.a.append(i)
        assert take(feed, 4)[-1] == ("append", ("a", 2), None)
        writer.delete()
        writer.b = []
        writer.b.append("x")
        assert take(feed, 3) == [("clear", (), None), ("set", ("b",), None), ("append", ("b", 0), None)]


def test_the_feed_never_changes_the_subscribers_own_objects(client: redis.Redis, other_client: redis.Redis) -> None:
    """Events are resolved on a replica of the feed's own: a dict the user holds (or loops over) is left alone."""
    mine = Memory("untouched", client=client)
    mine.ctx = {"a": {"n": 1}}
    held = mine.ctx
    came = threading.Event()
    with mine.subscribe(lambda event: came.set()):
        Memory("untouched", client=other_client).ctx["a"]["n"] = 2
        assert came.wait(10)
        assert dict.copy(held) == {"a": {"n": 1}}  # changes only on the user's next read
    assert mine.ctx == {"a": {"n": 2}}


def test_a_memory_that_vanished_without_an_event_gives_resync(client: redis.Redis) -> None:
    """A memory that expired (no event) and was written again is a gap: resync, then the new events."""
    mem = Memory("expiring", client=client)
    mem.x = 1
    with mem.subscribe() as feed:
        mem.y = 2
        assert take(feed, 1) == [("set", ("y",), None)]
        client.delete(mem.key, mem.key + ":w")  # as expiry does: nothing published
        mem.z = 3
        assert take(feed, 2) == [("resync", (), None), ("set", ("z",), None)]


def test_get_without_waiting_returns_an_event_already_there(client: redis.Redis) -> None:
    mem = Memory("polled", client=client)
    with mem.subscribe() as feed:
        assert feed.get(timeout=0) is None
        mem.x = 1
        time.sleep(0.3)
        event = feed.get(timeout=0)
        assert event is not None and event.path == ("x",)


def test_only_what_changed_is_published(client: redis.Redis) -> None:
    """An update names only the keys whose value changed; deleting a memory that does not exist says nothing."""
    mem = Memory("changed", client=client, author="alice")
    mem.d = {"a": 1, "b": 2}
    with mem.subscribe() as feed:
        mem.d.update(a=1, b=3)
        assert take(feed, 1) == [("set", ("d", "b"), "alice")]
        Memory("never-written", client=client).delete()
        mem.delete()
        assert take(feed, 1) == [("clear", (), "alice")]
        assert feed.get(timeout=0.3) is None


def test_a_bounded_append_reports_what_it_dropped(client: redis.Redis) -> None:
    """With max_messages, the messages dropped from the front are delete events: a mirror stays exact."""
    chat = ConversationMemory("mirror", client=client, max_messages=3)
    chat.messages = []
    mirror: list[Any] = []
    appended = iter(range(7))  # the values, in the order they were appended
    with chat.subscribe() as feed:
        for i in range(5):
            chat.messages.append(i)
        chat.messages.extend([5, 6])
        for _ in range(5 + 2 + 4):  # 7 appends, 4 drops
            event = feed.get(timeout=10)
            assert event is not None
            if event.op == "delete":
                del mirror[event.path[1]]
            else:
                assert event.op == "append" and event.path[1] == len(mirror)
                mirror.append(next(appended))
        assert feed.get(timeout=0.3) is None
    assert mirror == chat.messages == [4, 5, 6]


@pytest.mark.parametrize("backend", REAL_BACKENDS)
def test_a_feed_notices_a_silent_link(client: redis.Redis, switch: Switch, monkeypatch: pytest.MonkeyPatch) -> None:
    """A link that drops everything without closing (a partition) is found by a PING; then resync."""
    monkeypatch.setattr(feed_module, "IDLE_PING", 0.3)
    monkeypatch.setattr(feed_module, "PONG_WAIT", 0.5)
    if switch.fake is not None:
        pytest.skip("fakeredis has no link to silence")
    listener = Memory("partition", client=switch.client())
    writer = Memory("partition", client=client)
    with listener.subscribe() as feed:
        switch.silence()
        writer.x = 1  # never reaches the listener
        assert feed.get(timeout=2) is None
        switch.silence(False)
        event = feed.get(timeout=10)
        assert event is not None and event.op == "resync"
        writer.x = 2
        assert take(feed, 1) == [("set", ("x",), None)]


@pytest.mark.parametrize("backend", REAL_BACKENDS)
def test_a_forked_child_follows_on_its_own_connection(client: redis.Redis) -> None:
    """After fork, the child subscribes afresh (resync, then every event); the parent still gets every event."""
    writer = Memory("forked", client=client)
    with Memory("forked", client=client).subscribe() as feed:
        pid = os.fork()
        if pid == 0:  # the child: count what it sees for 3 s
            seen = 0
            try:
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline:
                    seen += feed.get(timeout=max(0.0, deadline - time.monotonic())) is not None
            finally:
                os._exit(seen)
        time.sleep(1)
        for i in range(3):
            writer[f"k{i}"] = i
        assert take(feed, 3) == [("set", (f"k{i}",), None) for i in range(3)]
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 4  # resync + the same 3


@pytest.mark.parametrize("backend", REAL_BACKENDS)
def test_a_callback_subscription_runs_on_in_a_forked_child(client: redis.Redis) -> None:
    """Threads do not survive fork: the child's subscription starts its own and is called back there too."""
    writer = Memory("forked-callback", client=client)
    seen: list[Event] = []
    with Memory("forked-callback", client=client).subscribe(seen.append):
        pid = os.fork()
        if pid == 0:
            try:
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and not any(e.op == "set" for e in seen):
                    time.sleep(0.05)
            finally:
                os._exit(1 if any(e.op == "set" and e.path == ("x",) for e in seen) else 0)
        time.sleep(1)
        writer.x = 1
        _, status = os.waitpid(pid, 0)
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 1
    assert [(e.op, e.path) for e in seen] == [("set", ("x",))]


BUSY_SCRIPT = """
local start = redis.call('TIME')
while true do
    local now = redis.call('TIME')
    if (now[1] - start[1]) * 1000000 + (now[2] - start[2]) >= 1500000 then return 1 end
end
"""


def test_a_feed_whose_link_breaks_while_the_server_is_busy_resyncs_once_it_is_not(
    servers: dict[str, Any],
) -> None:
    """Resubscribing while a long script runs is answered BUSY: "not now", so the feed tries again and then
    says resync (it raised ServerRefused, which ended a ``for event in feed`` loop)."""
    url = servers["redis7"].url
    admin = redis.Redis.from_url(url)
    admin.flushall()
    admin.config_set("busy-reply-threshold", 100)
    try:
        mem = Memory("busy-feed", url=url)
        mem.x = 1
        with mem.subscribe() as feed:
            admin.client_kill_filter(_type="pubsub")
            script = threading.Thread(target=lambda: redis.Redis.from_url(url).eval(BUSY_SCRIPT, 0))
            script.start()
            time.sleep(0.2)
            seen = []
            deadline = time.monotonic() + 20
            while "resync" not in seen:
                assert time.monotonic() < deadline, seen
                event = feed.get(timeout=1)
                if event is not None:
                    seen.append(event.op)
            script.join(10)
            mem.x = 2
            event = feed.get(timeout=10)
            assert event is not None and (event.op, event.attribute) == ("set", "x")
    finally:
        admin.config_set("busy-reply-threshold", 5000)
