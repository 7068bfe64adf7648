"""Four agent processes share one conversation through redis_memory.

    python examples/demo.py

Uses the server named by REDIS_URL, else the embedded one (no Redis needed).
Exits non-zero if any message was lost or duplicated.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time

from redis_memory import ConversationMemory, embedded_dir

URL = os.environ.get("REDIS_URL") or "embedded://"
AGENTS = ["planner", "researcher", "writer", "critic"]
TURNS = 50


def agent(name: str) -> None:
    """One agent: appends its turns and keeps a count, while the others do the same."""
    mem = ConversationMemory("demo-trip", url=URL)
    for turn in range(1, TURNS + 1):
        mem.messages.append({"role": "assistant", "name": name, "content": f"{name}, turn {turn}"})
        mem.turns[name] = turn


def main() -> int:
    mem = ConversationMemory("demo-trip", url=URL)
    mem.delete()
    mem.messages = [{"role": "user", "content": "Plan three days in Lisbon."}]
    mem.turns = {}
    mem.context = {"topic": "travel", "preferences": {"tone": "casual"}}

    started = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=agent, args=(name,)) for name in AGENTS]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started

    messages = mem.messages
    pairs = [(m["name"], m["content"]) for m in messages[1:]]
    complete = len(messages) == 1 + len(AGENTS) * TURNS and len(set(pairs)) == len(pairs)
    in_order = all(
        [int(c.rsplit(" ", 1)[1]) for n, c in pairs if n == name] == list(range(1, TURNS + 1)) for name in AGENTS
    )
    print(f"server: {URL}")
    print(f"{len(AGENTS)} processes appended {len(messages) - 1} messages in {elapsed:.2f} s")
    print(f"none lost or duplicated: {complete}; each agent's order kept: {in_order}")
    print(f"turns per agent: {dict(mem.turns)}")
    print(f"first messages: {json.dumps(messages[:3])}")

    mem.context["preferences"]["tone"] = "formal"  # a nested change, seen by a fresh reader
    print(f"context seen by another reader: {ConversationMemory('demo-trip', url=URL).context}")
    if URL.startswith("embedded:"):
        where = embedded_dir(URL)
        named = "" if where == embedded_dir() else f" {where}"
        print(f"the embedded server keeps running, its data in {where}, for the next run and other processes;")
        call = f"stop_embedded({str(where)!r})" if named else "stop_embedded()"
        print(f"stop it with: redis-memory embedded stop{named}  (or redis_memory.{call})")
    return 0 if complete and in_order else 1


if __name__ == "__main__":
    sys.exit(main())
