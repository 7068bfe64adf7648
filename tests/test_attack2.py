"""Adversarial reproductions of bugs in the latest changes (each test fails until its bug is fixed)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import fakeredis
import pytest
import redis
from conftest import Switch, everywhere

from redis_memory import Memory, RedisMemoryError


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


def test_delete_idle_of_a_session_never_leaves_an_agent_that_joined_during_it_orphaned(
    client: redis.Redis, other_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """delete_idle deletes a session whole, and only if none of its memories changed lately.
    An agent that joins and writes while the delete runs (after its SMEMBERS of the
    participants, before its script) should either keep the session alive or be deleted with
    it. Today the script names only the agents listed before: the shared memory and the
    participant set are deleted, and the new agent's fresh memory is left behind, in no
    participant set, never listed or deleted again; its session, active, is gone."""
    from redis_memory import Session
    from redis_memory import session as session_module

    with Session("s", client=client) as s:
        s.shared.topic = "old"
        s.agent("old").x = 1
    time.sleep(0.3)
    real_agents = session_module.Session.agents
    joined: list[Any] = []

    def agents_then_a_join(self: Any) -> list[str]:
        found = real_agents(self)
        if not joined:
            late = Session("s", client=other_client)
            late.agent("late").note = "fresh"
            joined.append(late)
        return found

    monkeypatch.setattr(session_module.Session, "agents", agents_then_a_join)
    Session.delete_idle(0.2, client=client)
    monkeypatch.undo()
    joined[0].close()
    fresh = Session("s", client=other_client)
    try:
        late_alive = fresh.agent("late").to_dict() == {"note": "fresh"}
        shared_alive = fresh.shared.to_dict() == {"topic": "old"}
        # Either the whole session is kept, or the late agent went with it.
        assert late_alive == shared_alive, (late_alive, shared_alive)
    finally:
        fresh.close()


def test_a_queued_write_refused_for_lack_of_memory_stays_queued(switch: Switch, client: redis.Redis) -> None:
    """A write queued offline meets a server out of memory (maxmemory reached) on replay. That
    refusal is transient: the write should stay queued (memory.py says so: "out of memory, no
    permission: it may pass later, so it stays queued") and reach Redis once memory is freed.
    Today Redis 7 words a refusal inside a script "... script: <sha>, on @user_function:620.",
    `_malformed` takes it for a damaged record, and the write is dropped for good."""
    if isinstance(client, fakeredis.FakeRedis):
        pytest.skip("fakeredis has no maxmemory")
    mem = Memory("t", client=switch.client())
    mem.a = 1
    switch.cut()
    mem.b = "queued while offline"
    client.config_set("maxmemory", 1)
    try:
        switch.restore()
        with contextlib.suppress(RedisMemoryError):
            mem.flush(timeout=5)
    finally:
        client.config_set("maxmemory", 0)
    try:
        with contextlib.suppress(RedisMemoryError):
            mem.flush(timeout=5)
        assert Memory("t", client=client).to_dict() == {"a": 1, "b": "queued while offline"}
    finally:
        mem.close(timeout=0)


def test_a_session_with_thousands_of_agents_can_be_deleted(client: redis.Redis) -> None:
    """Session.delete (and delete_idle, which it serves) deletes the shared memory, every agent's
    memory and its ":w" key, and the participant set in one script. A session of 4,100 agents
    (the participant set filled as agent() would, without opening each memory, to keep the test
    quick) should be deleted whole. Today the script's `DEL unpack(KEYS)` exceeds Lua's unpack
    limit (~8,000 values): ServerRefused "too many results to unpack", nothing is deleted, and
    delete_idle stops at that session with an error."""
    from redis_memory import Session

    s = Session("s", client=client)
    try:
        s.shared.topic = "x"
        s.agent("a0").v = 0
        client.sadd(s._agents_key, *[f"agent{i}" for i in range(4100)])
        s.delete()
    finally:
        s.close()
    assert client.dbsize() == 0 or not client.exists(s.shared.key, s._agents_key)


@pytest.mark.parametrize(
    ("change", "theirs", "expected"),
    [
        # del l[1:3] removes 2 and 3; another process put "z" in front: 1 must stay.
        (lambda xs: xs.__delitem__(slice(1, 3)), lambda xs: xs.insert(0, "z"), ["z", 1, 4]),
        # ... another process deleted 2: 4 must stay.
        (lambda xs: xs.__delitem__(slice(1, 3)), lambda xs: xs.__delitem__(1), [1, 4]),
        # del l[::2] removes 1 and 3; "z" in front: 2 and 4 must stay.
        (lambda xs: xs.__delitem__(slice(None, None, 2)), lambda xs: xs.insert(0, "z"), ["z", 2, 4]),
        # l[1:3] = ["x"] replaces 2 and 3; "z" in front: 1 must stay.
        (lambda xs: xs.__setitem__(slice(1, 3), ["x"]), lambda xs: xs.insert(0, "z"), ["z", 1, "x", 4]),
        # ... another process deleted 2: 4 must stay.
        (lambda xs: xs.__setitem__(slice(1, 3), ["x"]), lambda xs: xs.__delitem__(1), [1, "x", 4]),
    ],
    ids=[
        "del-slice/front-insert",
        "del-slice/middle-delete",
        "del-step/front-insert",
        "set-slice/front-insert",
        "set-slice/middle-delete",
    ],
)
def test_a_stale_queued_slice_change_is_not_re_made_on_other_items(
    switch: Switch, client: redis.Redis, change: Any, theirs: Any, expected: list[Any]
) -> None:
    """[1, 2, 3, 4] is held by a process cut off from Redis, which changes a slice of it;
    meanwhile another process inserts at the front or deletes in the middle. On replay the slice
    change is re-made from the server's list: it should still remove (or replace) the items the
    first process removed, and keep the others. Today it is re-made by index on the moved list:
    items neither process removed are deleted (1, or 4) and removed ones come back (del l[::2]
    after a front insert keeps exactly 1 and 3, the two it deleted) - silently, in every replica."""
    mem = Memory("t", client=switch.client())
    mem.l = [1, 2, 3, 4]
    other = Memory("t", client=client)
    switch.cut()
    change(mem.l)
    theirs(other.l)
    switch.restore()
    try:
        with contextlib.suppress(RedisMemoryError):
            mem.flush(timeout=10)
        assert Memory("t", client=client).to_dict()["l"] == expected
    finally:
        mem.close(timeout=0)


@pytest.mark.parametrize("removal", ["del", "pop", "remove"])
def test_a_queued_removal_of_a_message_another_process_edited_is_not_lost_silently(
    switch: Switch, client: redis.Redis, removal: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A process cut off from Redis removes the first message (`del m[0]`, `m.pop(0)`, or
    `m.remove(...)`); meanwhile another process adds a field to that message (it is promoted).
    On replay the message is still there, under another stored form: the removal should either
    be applied (the message still exists) or, if a changed container is kept by design, be
    reported as dropped, as a queued `m[0] = v` is in the same case. Today the script answers
    'missing', replay takes it as "nothing left to do": the message stays on the server, nothing
    is logged, and `pop(0)` has returned a message the server never removed."""
    import logging

    mem = Memory("t", client=switch.client())
    mem.m = [{"r": "u", "c": 1}, {"r": "a", "c": 2}]
    other = Memory("t", client=client)
    switch.cut()
    if removal == "del":
        del mem.m[0]
    elif removal == "pop":
        assert mem.m.pop(0) == {"r": "u", "c": 1}
    else:
        mem.m.remove({"r": "u", "c": 1})
    other.m[0]["seen"] = True
    caplog.set_level(logging.INFO, logger="redis_memory")
    switch.restore()
    try:
        with contextlib.suppress(RedisMemoryError):
            mem.flush(timeout=10)
        stored = Memory("t", client=client).to_dict()["m"]
        reported = any("dropped" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
        assert stored == [{"r": "a", "c": 2}] or reported, stored
    finally:
        mem.close(timeout=0)


def test_a_middle_insert_through_a_stale_view_goes_before_the_item_seen_not_an_equal_one(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """One process holds ["a", "b", "a"]; another deletes "b" (the server moves the last "a" back
    one slot). `held.insert(2, "x")` goes before the last "a", the item seen at index 2:
    ["a", "x", "a"]. Today locate() misses it at its old slot, scans from the front and
    inserts before the first "a": ["x", "a", "a"]."""
    mine = Memory("t", client=client)
    mine.l = ["a", "b", "a"]
    held = mine.l
    del Memory("t", client=other_client).l[1]
    held.insert(2, "x")
    assert Memory("t", client=other_client).to_dict()["l"] == ["a", "x", "a"]


def test_a_queued_write_refused_for_a_missing_permission_stays_queued(switch: Switch, client: redis.Redis) -> None:
    """Like the out-of-memory case: the ACL user a memory connects as loses HSET while a write is
    queued, and gets it back. The write should stay queued and land once the permission is
    back. Today the refusal, worded "... can't run this command ... script: <sha>, on
    @user_function:..." by the server, is taken for a damaged record and the write is dropped."""
    if isinstance(client, fakeredis.FakeRedis):
        pytest.skip("fakeredis has no ACL users")
    everywhere(client, "ACL", "SETUSER", "lim", "on", ">pw", "~*", "&*", "+@all")
    try:
        mem = Memory("t", client=switch.client("lim", "pw"))
        try:
            mem.a = 1
            switch.cut()
            mem.b = "queued while offline"
            everywhere(client, "ACL", "SETUSER", "lim", "-hset")
            switch.restore()
            with contextlib.suppress(RedisMemoryError):
                mem.flush(timeout=3)
            everywhere(client, "ACL", "SETUSER", "lim", "+hset")
            with contextlib.suppress(RedisMemoryError):
                mem.flush(timeout=5)
            assert Memory("t", client=client).to_dict() == {"a": 1, "b": "queued while offline"}
        finally:
            mem.close(timeout=0)
    finally:
        everywhere(client, "ACL", "DELUSER", "lim")
