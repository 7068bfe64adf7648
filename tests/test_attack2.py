"""Adversarial reproductions of bugs in the latest changes (each test fails until its bug is fixed)."""

from __future__ import annotations

import redis

from redis_memory import Memory


def test_a_positional_set_through_a_stale_view_hits_the_item_seen_not_an_equal_one(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """One process holds ["a", "b", "a"]; another inserts "z" before the last "a" (the server
    moves that "a" one slot on). `held[2] = "x"` names the last "a": the script should find that
    item where it moved and replace it, giving ["a", "b", "z", "x"]. Today locate() scans from
    the front and replaces the first equal "a": ["x", "b", "z", "a"] - the wrong item is
    overwritten, silently, in every process."""
    mine = Memory("t", client=client)
    mine.l = ["a", "b", "a"]
    held = mine.l
    Memory("t", client=other_client).l.insert(2, "z")
    held[2] = "x"
    assert Memory("t", client=other_client).to_dict()["l"] == ["a", "b", "z", "x"]


def test_a_positional_delete_through_a_stale_view_removes_the_item_seen_not_an_equal_one(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """As above, with `del held[2]`: the last "a" (the item seen at index 2) should go, giving
    ["a", "b", "z"]. Today the first "a" is deleted: ["b", "z", "a"]."""
    mine = Memory("t", client=client)
    mine.l = ["a", "b", "a"]
    held = mine.l
    Memory("t", client=other_client).l.insert(2, "z")
    del held[2]
    assert Memory("t", client=other_client).to_dict()["l"] == ["a", "b", "z"]
