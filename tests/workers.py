"""Functions run in child processes by the multi-process tests."""

from __future__ import annotations

from multiprocessing.synchronize import Barrier

from redis_memory import ConversationMemory


def append_and_set(url: str, writer: int, count: int, barrier: Barrier) -> None:
    mem = ConversationMemory("race", url=url)
    messages, seen = mem.messages, mem.seen
    barrier.wait()
    for i in range(count):
        messages.append({"writer": writer, "i": i})
        seen[f"{writer}:{i}"] = i
