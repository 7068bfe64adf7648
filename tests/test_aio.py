"""The async API (redis_memory.aio): the sync core driven from a worker thread, never from the loop."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import Switch, flush
from workers import append_to_conversations

from redis_memory import (
    ConversationMemory,
    Memory,
    MemoryClosed,
    MissingAttribute,
    NotLoaded,
    RedisMemoryError,
    WrongThread,
)
from redis_memory.aio import AsyncConversationMemory, AsyncMemory, AsyncSession


def run(scenario: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(scenario())


def test_async_writes_and_local_reads_share_one_memory_with_sync_code(client: redis.Redis) -> None:
    """Awaited writes reach Redis; attribute reads come from the replica; refresh() brings others' changes."""

    async def scenario() -> None:
        async with AsyncMemory("shared", client=client) as mem:
            await mem.set("title", "draft")
            await mem.append("steps", "plan")
            await mem.extend("steps", ["search", "answer"])
            assert mem.title == "draft" and mem.steps == ["plan", "search", "answer"]
            assert mem["title"] == "draft" and "steps" in mem and "steps" in dir(mem)
            sync = Memory("shared", client=client)
            assert sync.steps == ["plan", "search", "answer"]
            sync.steps.append("by sync")
            sync.title = "final"
            assert mem.title == "draft"  # the local replica, as it was
            await mem.refresh()
            assert mem.title == "final" and mem.steps[-1] == "by sync"
            await mem.remove("title")
            with pytest.raises(MissingAttribute):
                _ = mem.title
            assert not hasattr(mem, "title")
            assert await mem.to_dict() == {"steps": ["plan", "search", "answer", "by sync"]}
            assert (await mem.status()).pending == 0
            assert await mem.run(lambda m: m.steps.pop()) == "by sync"
            assert Memory("shared", client=client).steps == ["plan", "search", "answer"]

    run(scenario)


def test_a_batch_is_one_atomic_change(client: redis.Redis) -> None:
    """await mem.batch(fn): every statement of fn in one call; a raising fn sends nothing."""

    def statements(m: Memory) -> None:
        m.step = 1
        m.todo = []
        m.todo.append("read")
        m.todo.append("answer")

    def changed_mind(m: Memory) -> None:
        m.step = 2
        raise RuntimeError("changed my mind")

    async def scenario() -> None:
        async with AsyncMemory("batch", client=client) as mem:
            before = client.hget(mem.key, "v")
            await mem.batch(statements)
            after = client.hget(mem.key, "v")
            assert int((after or b"0").split()[0]) == int((before or b"0 x").split()[0]) + 1
            with pytest.raises(RuntimeError):
                await mem.batch(changed_mind)
            assert mem.step == 1 and Memory("batch", client=client).to_dict() == {"step": 1, "todo": ["read", "answer"]}

    run(scenario)


def test_proxies_refuse_changes_from_the_loop_and_reads_before_a_load_are_an_error(client: redis.Redis) -> None:
    """A proxy of an async memory cannot be changed on the loop (WrongThread); an unloaded one raises NotLoaded."""

    async def scenario() -> None:
        mem = AsyncMemory("guard", client=client)
        with pytest.raises(NotLoaded) as unloaded:
            _ = mem.anything
        assert isinstance(unloaded.value, RedisMemoryError) and not isinstance(unloaded.value, AttributeError)
        await mem.set("items", [1])
        items = mem.items
        with pytest.raises(WrongThread):
            items.append(2)
        with pytest.raises(TypeError):
            mem.items = [3]
        assert mem.items == [1] and Memory("guard", client=client).items == [1]
        await mem.close()
        with pytest.raises(MemoryClosed):
            _ = mem.items
        with pytest.raises(MemoryClosed):
            await mem.set("x", 1)
        await mem.close()  # twice: nothing

    run(scenario)


def test_an_async_memory_let_go_of_ends_its_thread(client: redis.Redis) -> None:
    """Without close(), a collected async memory's worker thread still ends (the fixture checks no thread is left)."""

    # fakeredis keeps the "Function not found" of a server's first FCALL (and
    # through its traceback, the frames that made the call) alive: load the
    # server functions first, so that what is measured is this library's hold.
    Memory("warm-up", client=client).loaded = True

    async def scenario() -> None:
        mem = AsyncMemory("let-go", client=client)
        await mem.set("x", 1)
        session = AsyncSession("let-go", client=client)
        await session.shared.set("y", 2)
        threads = [t for t in threading.enumerate() if t.name.startswith("redis_memory aio")]
        assert len(threads) == 2
        del mem, session
        gc.collect()
        for thread in threads:
            thread.join(5)
            assert not thread.is_alive()

    run(scenario)
    assert Memory("let-go", client=client).x == 1


def test_conversation_add_message_and_session(client: redis.Redis) -> None:
    """AsyncConversationMemory.add_message stores OpenAI-style dicts; AsyncSession's memories are async ones."""

    async def scenario() -> None:
        async with AsyncConversationMemory("talk", client=client, max_messages=3) as chat:
            for i in range(5):
                await chat.add_message({"role": "user", "content": f"m{i}"})
            assert [m["content"] for m in chat.messages] == ["m2", "m3", "m4"]
            assert ConversationMemory("talk", client=client).messages == chat.messages
        async with AsyncSession("trip", agent="planner", client=client) as session:
            await session.shared.set("itinerary", ["Paris"])
            private = await session.private()
            await private.set("budget", 900)
            assert session.shared.itinerary == ["Paris"] and private.budget == 900
            assert await session.agents() == ["planner"]
            await session.delete()

    run(scenario)


def test_an_async_append_goes_to_the_list_another_writer_put_in_place(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """append(name, value) is by name: after another process replaced the list, it lands in the new one."""
    writer = Memory("moved-async", client=other_client)
    writer.log = ["old"]

    async def scenario() -> None:
        async with AsyncMemory("moved-async", client=client) as mem:
            await mem.refresh()
            assert mem.log == ["old"]
            writer.log = ["new"]
            await mem.append("log", "a")
            writer.log = []
            await mem.extend("log", ["b", "c"])
            assert mem.log == ["b", "c"]

    run(scenario)
    assert writer.log == ["b", "c"]


def test_offline_writes_queue_and_replay_in_order_exactly_once(switch: Switch, client: redis.Redis) -> None:
    """Cut off, awaited appends apply locally and queue; back online, flush replays each once, in order."""

    async def scenario() -> None:
        async with AsyncConversationMemory("offline", client=switch.client()) as mem:
            await mem.append("log", "start")
            switch.cut()
            for i in range(20):
                await mem.append("log", i)
            status = await mem.status()
            assert not status.online and status.pending == 20
            assert mem.log == ["start", *range(20)]
            switch.restore()
            assert await mem.flush(timeout=20)
            assert (await mem.status()).pending == 0
        assert ConversationMemory("offline", client=client).log == ["start", *range(20)]

    run(scenario)


def test_a_spooled_async_queue_survives_its_memory(switch: Switch, client: redis.Redis, tmp_path: Path) -> None:
    """Closed while offline, an async memory's queue stays in its spool; the next one replays it once."""

    async def scenario() -> None:
        mem = AsyncMemory("spooled", client=switch.client(), spool=tmp_path)
        await mem.set("log", ["start"])
        switch.cut()
        for i in range(5):
            await mem.append("log", i)
        await mem.close(timeout=0.1)
        switch.restore()
        async with AsyncMemory("spooled", client=switch.client(), spool=tmp_path) as again:
            assert await again.flush(timeout=20)
        assert Memory("spooled", client=client).log == ["start", 0, 1, 2, 3, 4]

    run(scenario)


def test_the_feed_is_an_async_iterator(client: redis.Redis, other_client: redis.Redis) -> None:
    """async for event in mem.subscribe(): every change, by any writer, in order."""

    async def scenario() -> None:
        async with AsyncMemory("fed", client=client) as mem, mem.subscribe() as feed:
            writer = Memory("fed", client=other_client, author="sync")
            writer.steps = []
            writer.steps.append("one")
            await mem.append("steps", "two")
            seen = []
            async for event in feed:
                seen.append((event.op, event.path, event.author))
                if len(seen) == 3:
                    break
            assert seen == [("set", ("steps",), "sync"), ("append", ("steps", 0), "sync"),
                            ("append", ("steps", 1), None)]  # fmt: skip
            assert await feed.get(timeout=0.2) is None
            writer.close()

    run(scenario)


@pytest.fixture
def loop_socket_audit(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Records every call on a blocking socket made on the thread that runs the test's event loop.

    Non-blocking sockets (timeout 0: the loop's own wake-up pipe, asyncio
    transports) cannot block the loop; any other one can, for a round trip.
    """
    calls: list[str] = []
    loop_thread = threading.current_thread()

    for name in ("connect", "send", "sendall", "recv", "recv_into"):
        original = getattr(socket.socket, name)

        def audited(sock: socket.socket, *args: Any, _original: Any = original, _name: str = name) -> Any:
            if threading.current_thread() is loop_thread and sock.gettimeout() != 0.0:
                calls.append(_name)
            return _original(sock, *args)

        monkeypatch.setattr(socket.socket, name, audited)
    yield calls


TASKS = 200
CONVERSATIONS = 10
PER_TASK = 10
SYNC_WRITERS = 2
PER_SYNC_WRITER = 20


def test_200_tasks_and_sync_processes_lose_nothing_and_never_block_the_loop(
    real_url: str, loop_socket_audit: list[str]
) -> None:
    """200 asyncio tasks append to 10 conversations while processes write with the sync API.

    0 lost, 0 duplicated, each task's and each process's order kept, and no
    socket call ever made on the event loop's thread (the audit would record it).
    """
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(SYNC_WRITERS + 1)
    procs = [
        ctx.Process(target=append_to_conversations, args=(real_url, w, CONVERSATIONS, PER_SYNC_WRITER, barrier))
        for w in range(SYNC_WRITERS)
    ]
    for p in procs:
        p.start()

    async def task(number: int, start: asyncio.Event) -> None:
        mem = AsyncConversationMemory(f"aio-{number % CONVERSATIONS}", url=real_url)
        try:
            await start.wait()
            for i in range(PER_TASK):
                await mem.add_message({"role": "assistant", "content": f"task {number} {i}"})
        finally:
            await mem.close()

    async def scenario() -> None:
        start = asyncio.Event()
        running = [asyncio.create_task(task(n, start)) for n in range(TASKS)]
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
        start.set()
        await asyncio.gather(*running)

    run(scenario)
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert loop_socket_audit == []
    for c in range(CONVERSATIONS):
        contents = [m["content"] for m in ConversationMemory(f"aio-{c}", url=real_url).messages]
        assert len(contents) == len(set(contents))
        expected = {f"task {n} {i}" for n in range(c, TASKS, CONVERSATIONS) for i in range(PER_TASK)}
        expected |= {f"sync {w} {c} {i}" for w in range(SYNC_WRITERS) for i in range(PER_SYNC_WRITER)}
        assert set(contents) == expected
        for n in range(c, TASKS, CONVERSATIONS):
            assert [x for x in contents if x.startswith(f"task {n} ")] == [f"task {n} {i}" for i in range(PER_TASK)]
        for w in range(SYNC_WRITERS):
            mine = [x for x in contents if x.startswith(f"sync {w} ")]
            assert mine == [f"sync {w} {c} {i}" for i in range(PER_SYNC_WRITER)]


def test_the_socket_audit_sees_a_blocking_call_on_the_loop(real_url: str, loop_socket_audit: list[str]) -> None:
    """The audit is not blind: a sync memory used on the loop's thread is recorded."""

    async def scenario() -> None:
        with Memory("audit", url=real_url) as mem:
            mem.x = 1

    run(scenario)
    assert loop_socket_audit


def test_a_tracked_async_memory_refreshes_without_a_round_trip_when_nothing_changed(client: redis.Redis) -> None:
    """tracking=True passes through: an awaited refresh of unchanged data sends nothing; another's write shows."""

    async def scenario() -> None:
        async with AsyncConversationMemory("tracked-async", client=client, tracking=True) as conv:
            await conv.append("messages", {"role": "user", "content": "hi"})
            await conv.refresh()
            await conv.refresh()
            channel = await conv.run(lambda m: m._rm.store.channel)
            tracked = await conv.run(lambda m: bool(m._rm.store.tracker and m._rm.store.tracker.enabled))
            before = getattr(channel, "round_trips", 0)
            for _ in range(10):
                await conv.refresh()
            if tracked:
                assert channel.round_trips == before
            ConversationMemory("tracked-async", client=client).messages.append({"role": "assistant", "content": "yo"})
            deadline = asyncio.get_running_loop().time() + 5
            while len(conv.messages) < 2:  # the invalidation arrives, the next refresh catches up
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
                await conv.refresh()
            assert conv.messages[-1] == {"role": "assistant", "content": "yo"}

    run(scenario)


# -- calls on the loop: the sync core in a greenlet whose waits are awaited (green.py) --

SINGLE_BACKENDS = ("redis7", "valkey")


@pytest.fixture(params=SINGLE_BACKENDS)
def single_server(request: pytest.FixtureRequest, servers: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """A flushed single real server (a cluster's calls go to the worker thread): its backend name and server."""
    name = str(request.param)
    flush(servers, name)
    yield name, servers[name]
    flush(servers, name)


class Ticker:
    """A task that counts the loop's turns: it advances only while the loop is free."""

    def __init__(self, every: float = 0.005) -> None:
        self.ticks = 0
        self.every = every
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            self.ticks += 1

    def stop(self) -> None:
        self.task.cancel()


def test_awaited_calls_run_on_the_loop_without_a_blocking_socket_call(
    single_server: tuple[str, Any], loop_socket_audit: list[str]
) -> None:
    """After the first call, awaited reads and writes run on the loop's thread, every socket wait awaited."""
    url = single_server[1].url

    async def scenario() -> None:
        async with AsyncConversationMemory("on-loop", url=url) as conv:
            for i in range(20):
                await conv.append("messages", {"role": "user", "content": f"m{i}"})
            await conv.set("title", "t")
            await conv.refresh()
            where = await conv.run(lambda m: threading.current_thread())
            assert where is threading.current_thread()  # the loop's thread, not the worker
            assert [m["content"] for m in conv.messages] == [f"m{i}" for i in range(20)]

    run(scenario)
    assert loop_socket_audit == []
    assert [m["content"] for m in ConversationMemory("on-loop", url=url).messages] == [f"m{i}" for i in range(20)]


def test_a_cancelled_append_still_lands_once_and_the_loop_runs_while_it_waits(
    single_server: tuple[str, Any],
) -> None:
    """Writes paused on the server: the loop keeps turning; a cancelled append lands once, before the next."""
    url = single_server[1].url
    admin = redis.Redis.from_url(url)

    async def scenario() -> None:
        async with AsyncConversationMemory("cancelled", url=url) as conv:
            await conv.append("log", "first")
            admin.execute_command("CLIENT", "PAUSE", "400", "WRITE")
            ticker = Ticker()
            pending = asyncio.create_task(conv.append("log", "cancelled"))
            await asyncio.sleep(0.1)
            assert not pending.done()  # waiting for the paused server, on the loop
            pending.cancel()
            after = asyncio.create_task(conv.append("log", "after"))
            with pytest.raises(asyncio.CancelledError):
                await pending
            await after
            ticker.stop()
            assert ticker.ticks >= 20  # about 80 turns in 0.4 s; none while the loop is blocked
            assert conv.log == ["first", "cancelled", "after"]

    run(scenario)
    assert ConversationMemory("cancelled", url=url).log == ["first", "cancelled", "after"]


def test_a_silent_server_times_out_on_the_loop_and_the_append_is_replayed_once(
    single_server: tuple[str, Any], servers: dict[str, Any]
) -> None:
    """A partition: the awaited append waits on the loop (which keeps turning) until the command timeout,
    then is queued; healed, it is replayed exactly once."""
    name, _ = single_server
    cable = Switch(servers, name)
    assert cable.proxy is not None
    try:
        client = redis.Redis.from_url(cable.proxy.url, socket_connect_timeout=1, socket_timeout=0.5)

        async def scenario() -> None:
            async with AsyncConversationMemory("silent", client=client) as conv:
                await conv.append("log", "before")
                cable.silence()
                ticker = Ticker()
                started = asyncio.get_running_loop().time()
                await conv.append("log", "during")
                waited = asyncio.get_running_loop().time() - started
                ticker.stop()
                assert 0.4 < waited < 5
                assert ticker.ticks >= waited / 0.005 / 4  # the loop turned while the append waited
                status = await conv.status()
                assert not status.online and status.pending == 1
                cable.silence(False)
                cable.restore()
                assert await conv.flush(timeout=20)
                assert conv.log == ["before", "during"]

        run(scenario)
        direct = redis.Redis.from_url(servers[name].url)
        assert ConversationMemory("silent", client=direct).log == ["before", "during"]
    finally:
        cable.close()


def test_a_connection_killed_between_calls_is_opened_again_off_the_loop(
    single_server: tuple[str, Any], loop_socket_audit: list[str]
) -> None:
    """The server closed the library's connection: the next awaited call connects on another thread, resends once."""
    url = single_server[1].url
    admin = redis.Redis.from_url(url)

    async def scenario() -> None:
        async with AsyncConversationMemory("killed", url=url) as conv:
            await conv.append("log", 1)
            for _ in range(3):
                kill = ("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
                killed = await asyncio.to_thread(admin.execute_command, *kill)
                assert killed >= 1
                await conv.append("log", len(conv.log) + 1)
            assert conv.log == [1, 2, 3, 4]
            assert (await conv.status()).online

    run(scenario)
    assert loop_socket_audit == []
    assert ConversationMemory("killed", url=url).log == [1, 2, 3, 4]


def test_a_sync_memory_on_the_loop_never_waits_for_a_suspended_async_call(single_server: tuple[str, Any]) -> None:
    """A blocking sync call made on the loop's thread while an async call waits for its reply: both finish.

    (They use different connections: on a shared one, the sync call would wait for a lock the suspended
    async call holds, which only the blocked loop could release.)
    """
    url = single_server[1].url
    admin = redis.Redis.from_url(url)
    client = redis.Redis.from_url(url)
    done: list[str] = []

    async def scenario() -> None:
        async with AsyncMemory("mixed", client=client) as mem:
            await mem.set("a", 0)
            admin.execute_command("CLIENT", "PAUSE", "300", "WRITE")
            pending = asyncio.create_task(mem.set("a", 1))
            await asyncio.sleep(0.05)
            with Memory("mixed-sync", client=client) as sync:
                sync.b = 2  # blocks the loop until the pause ends
            await pending
            done.append("both")

    thread = threading.Thread(target=run, args=(scenario,), daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the loop deadlocked"
    assert done == ["both"]
    assert Memory("mixed", client=client).a == 1
    assert Memory("mixed-sync", client=client).b == 2


def test_subscribing_and_closing_a_feed_make_no_blocking_call_on_the_loop(
    single_server: tuple[str, Any], loop_socket_audit: list[str]
) -> None:
    """The feed's subscription connects and waits for the server's answer: on the worker, never on the loop."""
    url = single_server[1].url

    async def scenario() -> None:
        async with AsyncMemory("feed-audit", url=url) as mem:
            feed = await mem.subscribe().start()
            await mem.set("x", 1)
            event = await feed.get(timeout=10)
            assert event is not None and event.attribute == "x"
            await feed.close()

    run(scenario)
    assert loop_socket_audit == []


def test_concurrent_opens_of_one_agent_give_one_async_memory(client: redis.Redis) -> None:
    """Two tasks asking for the same agent at once get the same async memory, whose calls run one at a time."""

    async def scenario() -> None:
        async with AsyncSession("concurrent-agent", client=client) as session:
            first, second = await asyncio.gather(session.agent("x"), session.agent("x"))
            assert first is second
            assert "n" not in first  # loaded: a read before the load raises NotLoaded
            await first.set("n", 1)
            assert first.n == 1

    run(scenario)


@pytest.mark.parametrize("task_kept", [True, False])
def test_a_loop_closed_with_a_call_suspended_in_it_leaves_other_loops_working(
    single_server: tuple[str, Any], task_kept: bool
) -> None:
    """A loop closed (not by asyncio.run) while a call waits in it for its reply: async memories of the same
    client on another loop still work (they once waited for ever for the connection the lost call held).
    A task let go of then is unwound where it waited: its write is replayed once by the reconnect thread."""
    url = single_server[1].url
    client = redis.Redis.from_url(url)
    admin = redis.Redis.from_url(url)
    kept: list[Any] = []

    def abandon() -> None:
        loop = asyncio.new_event_loop()
        mem = AsyncMemory("abandoned", client=client)
        waiting = AsyncMemory("abandoned-waiting", client=client)  # same loop, so the same connection
        loop.run_until_complete(mem.refresh())
        loop.run_until_complete(mem.set("x", 1))
        loop.run_until_complete(waiting.set("x", 1))
        admin.execute_command("CLIENT", "PAUSE", "500", "WRITE")
        task = loop.create_task(mem.set("x", 2))  # waits for its reply
        second = loop.create_task(waiting.set("x", 2))  # waits for its turn on the connection
        loop.run_until_complete(asyncio.sleep(0.1))
        assert not task.done() and not second.done()
        loop.close()  # with the calls suspended in it
        kept.extend((mem, waiting))
        if task_kept:
            kept.extend((task, second))
        else:
            del task, second
            gc.collect()  # the tasks' coroutines are closed here, on the loop's thread

    thread = threading.Thread(target=abandon)
    thread.start()
    thread.join(30)

    async def scenario() -> None:
        await asyncio.sleep(0.6)  # the pause is over
        mem = AsyncMemory("other", client=client)
        try:
            await asyncio.wait_for(mem.set("y", 1), 10)
            await asyncio.wait_for(mem.set("y", 2), 10)
            assert mem.y == 2
        finally:
            await mem.close()

    run(scenario)
    if not task_kept:
        deadline = time.monotonic() + 20
        while (Memory("abandoned", client=client).x, Memory("abandoned-waiting", client=client).x) != (2, 2):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for mem in kept:
            assert mem.x == 2
            mem.close_sync()
    else:
        for mem in kept[:2]:
            mem._rm_worker.stop()  # the abandoned memories' threads (their calls can never finish)


def test_an_async_memory_first_used_from_sync_code_has_a_connection_of_its_own(client: redis.Redis) -> None:
    """Built by run_sync (no event loop), an async memory still gets a channel apart from sync memories'."""
    mem = AsyncMemory("outside-a-loop", client=client)
    try:
        async_channel = mem.run_sync(lambda m: m._rm.store.channel)
        with Memory("sync-beside", client=client) as sync:
            assert async_channel is not sync._rm.store.channel
    finally:
        mem.close_sync()
