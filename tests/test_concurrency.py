"""Many processes writing one memory at once on a real server."""

from __future__ import annotations

import multiprocessing

from workers import append_and_set

from redis_memory import ConversationMemory

WRITERS = 6
PER_WRITER = 150


def test_concurrent_appends_and_sets_lose_nothing(real_url: str) -> None:
    """6 processes x 150 appends and dict sets: 0 lost, 0 duplicated, each writer's order kept."""
    setup = ConversationMemory("race", url=real_url)
    setup.messages = []
    setup.seen = {}
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WRITERS)
    procs = [ctx.Process(target=append_and_set, args=(real_url, w, PER_WRITER, barrier)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    mem = ConversationMemory("race", url=real_url)
    messages = mem.messages
    pairs = [(m["writer"], m["i"]) for m in messages]
    assert len(pairs) == WRITERS * PER_WRITER
    assert set(pairs) == {(w, i) for w in range(WRITERS) for i in range(PER_WRITER)}
    for w in range(WRITERS):
        assert [i for (writer, i) in pairs if writer == w] == list(range(PER_WRITER))
    assert mem.seen == {f"{w}:{i}": i for w in range(WRITERS) for i in range(PER_WRITER)}
    # Every writer's replica ended exact: a late reader agrees with a fresh one.
    assert setup.messages == messages
