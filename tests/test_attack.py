"""Adversarial reproductions of bugs in the latest changes (each test fails until its bug is fixed)."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from conftest import Switch

from redis_memory import Memory, RedisMemoryError


def test_a_queued_sort_that_no_longer_fits_the_servers_list_does_not_brick_the_memory(
    switch: Switch, client: redis.Redis
) -> None:
    """A sort queued offline is re-made on replay from the server's list. If another process
    meanwhile added an item that cannot be compared (a str among ints), the sort cannot be
    re-made: it should be refused (dropped and counted, or a RedisMemoryError), and the
    change queued after it should still reach Redis. Today the replay raises a bare
    TypeError from every read, write and flush, forever, and the later change is lost."""
    mem = Memory("t", client=switch.client())
    mem.items = [3, 1, 2]
    other = Memory("t", client=client)
    switch.cut()
    mem.items.sort()
    mem.after = "queued behind the sort"
    other.items.append("a str")
    switch.restore()
    try:
        mem.flush(timeout=10)
    except RedisMemoryError:
        pass
    except TypeError as exc:  # the bug
        pytest.fail(f"replay raised a bare {exc!r}")
    # The memory still works, and the change queued after the sort reached Redis.
    assert Memory("t", client=client).to_dict().get("after") == "queued behind the sort"
    assert mem.to_dict()["items"] == [3, 1, 2, "a str"]
    mem.close()
