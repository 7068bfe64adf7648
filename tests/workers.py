"""Functions run in child processes by the multi-process tests."""

from __future__ import annotations

import time
from multiprocessing.synchronize import Barrier, Event
from typing import Any

from redis.sentinel import Sentinel
from servers import SentinelSetup

from redis_memory import ConversationMemory, Memory, connection


def append_and_set(url: str, writer: int, count: int, barrier: Barrier) -> None:
    mem = ConversationMemory("race", url=url)
    messages, seen = mem.messages, mem.seen
    barrier.wait()
    for i in range(count):
        messages.append({"writer": writer, "i": i})
        seen[f"{writer}:{i}"] = i


def stream_appends(url: str, writer: int, count: int, barrier: Barrier) -> None:
    """Append ``count`` items at a steady pace, then wait until all of them are in Redis."""
    mem = ConversationMemory("faults", url=url)
    messages = mem.messages
    barrier.wait()
    for i in range(count):
        messages.append({"writer": writer, "i": i})
        time.sleep(0.004)
    assert mem.flush(timeout=60), mem.status()


def append_while_down(url: str, writer: int, loaded: Event, down: Event, written: Event, up: Event) -> None:
    """Load the memory, append 20 items once the server is down, then flush once it is back."""
    mem = ConversationMemory("offline", url=url)
    messages = mem.messages
    loaded.set()
    assert down.wait(30)
    for i in range(20):
        messages.append({"writer": writer, "i": i})
    assert mem.status().pending == 20
    written.set()
    assert up.wait(30)
    assert mem.flush(timeout=60), mem.status()


def spool_and_hang(url: str, spool: str, loaded: Event, down: Event, written: Event) -> None:
    """With a spool, append 50 items while the server is down, then wait to be killed."""
    mem = ConversationMemory("spooled", url=url, spool=spool)
    messages = mem.messages
    loaded.set()
    assert down.wait(30)
    for i in range(50):
        messages.append(i)
    written.set()
    time.sleep(120)


def open_spool_and_flush(url: str, spool: str) -> None:
    """A new process on the same spool: the dead one's queue reaches the server."""
    mem = ConversationMemory("spooled", url=url, spool=spool)
    assert mem.flush(timeout=60), mem.status()


def agent_listens(url: str, session_id: str, subscribed: Event, results: Any) -> None:
    """Agent B: follow the session's shared memory and report the first change event; try A's notes."""
    from redis_memory import PrivateMemory, Session

    b = Session(session_id, agent="B", url=url)
    try:
        b.agent("A")
        results.put("B opened A's private memory")
    except PrivateMemory:
        pass
    with b.shared.subscribe() as feed:
        subscribed.set()
        event = feed.get(timeout=30)
    assert event is not None, "no change event within 30 s"
    results.put((event.op, event.attribute, event.path, event.author, b.shared.plan[event.path[1]]))


def spool_new_containers_and_hang(url: str, spool: str, loaded: Event, down: Event, written: Event) -> None:
    """With a spool, create a list and a dict while the server is down, change what is inside, wait to be killed."""
    mem = Memory("containers", url=url, spool=spool)
    mem.to_dict()
    loaded.set()
    assert down.wait(30)
    mem.todo = []
    mem.todo.append("x")
    mem.box = {"items": []}
    for i in range(20):
        mem.box["items"].append(i)
    written.set()
    time.sleep(120)


def open_containers_spool_and_flush(url: str, spool: str) -> None:
    """A new process on the same spool: every change the dead one queued reaches the server, none dropped."""
    mem = Memory("containers", url=url, spool=spool)
    assert mem.flush(timeout=60), mem.status()
    assert mem.status().dropped == 0, mem.status()


def spread_writer(url: str, writer: int, names: list[str], rounds: int, barrier: Barrier) -> None:
    """Append to, and set a key of, each named memory, ``rounds`` times over; every write in Redis at the end."""
    mems = [Memory(name, url=url) for name in names]
    logs = [mem.log for mem in mems]
    seen = [mem.seen for mem in mems]
    barrier.wait()
    for i in range(rounds):
        for log, marks in zip(logs, seen, strict=True):
            log.append([writer, i])
            marks[f"{writer}:{i}"] = i
    for mem in mems:
        assert mem.flush(timeout=60), mem.status()


def _client_of(target: str | list[tuple[str, int]]) -> Any:
    """A client for a URL (any node, for a cluster), or for the master that the sentinels at ``target`` name."""
    if isinstance(target, str):
        return connection.connect(url=target)
    return Sentinel(target, socket_timeout=2).master_for(
        SentinelSetup.SERVICE, socket_connect_timeout=2, socket_timeout=5
    )


def failover_writer(
    target: str | list[tuple[str, int]],
    name: str,
    writer: int,
    wait_for: int,
    started: Event,
    stop: Event,
    finished: Barrier,
    out: Any,
) -> None:
    """Append ``[writer, i]`` until told to stop (at least 20 times) and flush; once every writer has,
    report the count, and whether this replica equals a fresh load."""
    client = _client_of(target)
    mem = Memory(name, client=client, wait_for_replicas=wait_for, replica_timeout=0.5)
    log = mem.log
    count = 0
    started.set()
    while not stop.is_set() or count < 20:
        log.append([writer, count])
        count += 1
        time.sleep(0.002)
    flushed = mem.flush(timeout=90)
    finished.wait(120)
    mine = mem.to_dict()
    fresh = Memory(name, client=_client_of(target)).to_dict()
    out.put((writer, count, flushed, mine == fresh, mem.status().dropped))


def append_to_conversations(url: str, writer: int, conversations: int, count: int, barrier: Barrier) -> None:
    """With the sync API: append ``count`` items to each of ``conversations`` conversations, interleaved."""
    opened = [ConversationMemory(f"aio-{c}", url=url) for c in range(conversations)]
    barrier.wait()
    for i in range(count):
        for c, mem in enumerate(opened):
            mem.add_message({"role": "user", "content": f"sync {writer} {c} {i}"})
    for mem in opened:
        mem.close()


def langchain_turns(url: str, conversation_id: str, questions: list[str], replies: list[str], seen: Any) -> None:
    """Run one RunnableWithMessageHistory turn per question (sync invoke); put how many messages the model saw."""
    from chains import history_chain

    chain, histories, counts = history_chain(url, replies)
    for question in questions:
        chain.invoke({"question": question}, config={"configurable": {"session_id": conversation_id}})
    seen.put(counts)
    for history in histories.values():
        history.close()
