"""The async rows of SPEC section 4: awaited calls against ``redis.asyncio`` doing the same work, same server.

Run by ``benchmarks/run.py`` (one run, beside the sync rows), or alone:
``python benchmarks/async_rows.py redis://127.0.0.1:6379/0``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio

from redis_memory.aio import AsyncConversationMemory

Row = tuple[str, float, str]
CONTENT = "The weather in Paris is mild today, with light wind from the west and a chance of rain in the evening. "


def item(i: int) -> dict[str, Any]:
    return {"role": "user" if i % 2 else "assistant", "content": f"{i}: {CONTENT}"}


async def median_ns(call: Callable[[], Awaitable[object]], samples: int) -> float:
    times = []
    for _ in range(samples):
        start = time.perf_counter_ns()
        await call()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times)


async def interleaved(
    raw: Callable[[], Awaitable[object]], lib: Callable[[], Awaitable[object]], rounds: int = 31, per_round: int = 25
) -> float:
    """Median over rounds of (library median / raw median), sampled back to back (as run.py's sync rows)."""
    ratios = []
    for _ in range(rounds):
        raw_ns = await median_ns(raw, per_round)
        ratios.append(await median_ns(lib, per_round) / raw_ns)
    return statistics.median(ratios)


async def measure(url: str) -> list[Row]:
    rows: list[Row] = []
    client = redis.asyncio.Redis.from_url(url)
    counter = iter(range(10**9))
    payload = json.dumps(item(0))

    async def raw_rpush() -> None:
        await client.rpush("raw-async-list", payload)

    conv = AsyncConversationMemory("async-append", url=url)
    await conv.extend("messages", [item(i) for i in range(100)])

    async def lib_append() -> None:
        await conv.append("messages", item(next(counter)))

    rows.append(("await conv.append(\"messages\", m) / redis.asyncio RPUSH", await interleaved(raw_rpush, lib_append),
                 "<= 1.5"))  # fmt: skip
    await conv.close()
    rows.extend(await agents_rows(client, url))
    await client.aclose()
    return rows


async def agents_rows(client: redis.asyncio.Redis, url: str) -> list[Row]:
    """AgentsSession against the Agents SDK's own RedisSession: one add_items of a turn, then get_items(limit=20)."""
    try:
        from agents.extensions.memory import RedisSession
    except ImportError:
        return []
    from redis_memory.integrations.openai_agents import AgentsSession

    theirs = RedisSession("bench", redis_client=client)
    ours = AgentsSession("bench", url=url)
    seed = [item(i) for i in range(100)]
    await theirs.add_items(seed)
    await ours.add_items(seed)
    counter = iter(range(10**9))

    def turn() -> list[dict[str, Any]]:
        n = next(counter)
        return [item(2 * n), item(2 * n + 1)]

    async def raw_turn() -> None:
        await theirs.add_items(turn())
        await theirs.get_items(limit=20)

    async def lib_turn() -> None:
        await ours.add_items(turn())
        await ours.get_items(limit=20)

    ratio = await interleaved(raw_turn, lib_turn, rounds=15)
    await ours.close()
    return [("AgentsSession add_items(2) + get_items(20) / the SDK's RedisSession", ratio, "<= 1")]


def async_rows(url: str) -> list[Row]:
    """The async rows, measured on a loop of their own."""
    return asyncio.run(measure(url))


if __name__ == "__main__":
    for what, ratio, target in async_rows(sys.argv[1]):
        print(f"| {what:<72} | {ratio:>5.2f}x | {target:>6} |")
