"""Sessions: a shared memory, private agent memories, participants, isolation and clean-up."""

from __future__ import annotations

import time

import pytest
import redis
from conftest import Switch, all_keys

from redis_memory import (
    AgentMemory,
    ConnectionFailed,
    CorruptData,
    PrivateMemory,
    RedisMemoryError,
    Session,
    SessionMemory,
)


def test_agents_share_one_memory_and_keep_their_own(client: redis.Redis, other_client: redis.Redis) -> None:
    """Agents see each other's shared writes; each private memory is separate."""
    a = Session("s1", agent="A", client=client)
    b = Session("s1", agent="B", client=other_client)
    a.shared.plan = ["search"]
    b.shared.plan.append("answer")
    a.private.notes = "A's"
    b.private.notes = "B's"
    assert a.shared.plan == ["search", "answer"] == b.shared.plan
    assert a.private.notes == "A's" and b.private.notes == "B's"
    assert a.agents() == ["A", "B"] == b.agents()
    assert isinstance(a.private, AgentMemory) and a.private.agent == "A"


def test_an_agent_cannot_open_another_agents_memory(client: redis.Redis) -> None:
    """A session opened for agent A refuses B's private memory; an orchestrator's view reaches both."""
    a = Session("s2", agent="A", client=client)
    with pytest.raises(PrivateMemory) as raised:
        a.agent("B")
    assert isinstance(raised.value, PermissionError) and isinstance(raised.value, RedisMemoryError)
    orchestrator = Session("s2", client=client)
    orchestrator.agent("B").todo = [1]
    with pytest.raises(PrivateMemory):
        _ = orchestrator.private
    assert "todo" not in dir(a.private)


def test_sessions_are_isolated_and_in_one_hash_tag(client: redis.Redis) -> None:
    """Two sessions never see each other's data; every key of a session has the session's hash tag."""
    one, two = Session("one", client=client), Session("two", client=client)
    one.shared.x = 1
    one.agent("A").y = 2
    two.shared.x = 3
    assert one.shared.x == 1 and two.shared.x == 3 and "y" not in dir(two.agent("A"))
    keys = [k.decode() for k in all_keys(client, "rm:session:{one}*")]
    assert len(keys) >= 4 and all("{one}" in k for k in keys)
    assert all(b"{one}" not in k for k in all_keys(client, "rm:session:{two}*"))


def test_delete_on_exit_removes_every_key_and_the_index_entry(client: redis.Redis) -> None:
    """with Session(..., delete_on_exit=True) leaves nothing behind; without it, the session stays."""
    with Session("kept", client=client) as kept:
        kept.shared.x = 1
    with Session("temp", client=client, delete_on_exit=True) as temp:
        temp.shared.x = 1
        temp.agent("A").y = 2
        temp.agent("B").z = 3
        assert Session.list_ids(client=client) == ["kept", "temp"]
    assert [k for k in all_keys(client, "*") if b"{temp}" in k] == []
    assert Session.list_ids(client=client) == ["kept"]
    assert Session("kept", client=client).shared.x == 1


def test_session_metadata_and_idle_clean_up(client: redis.Redis) -> None:
    """metadata() reports the shared memory's activity; delete_idle removes idle sessions with their agents."""
    s = Session("idle", client=client)
    s.shared.topic = "billing"
    s.agent("A").notes = "private"
    meta = s.metadata()
    assert meta.created_at is not None and meta.last_activity is not None
    assert Session.delete_idle(0, client=client) == 1
    assert [k for k in all_keys(client, "*") if b"{idle}" in k] == []


def test_with_ttl_the_participant_set_expires_with_the_session(client: redis.Redis) -> None:
    """ttl= covers the participant set too: it gets the expiry and every write to any memory renews it."""
    s = Session("short", agent="A", client=client, ttl=30)
    s.private.notes = "n"
    agents_key = s.shared.key + ":agents"
    assert 0 < client.pttl(agents_key) <= 30_000
    client.pexpire(agents_key, 1_000)
    s.shared.plan = ["x"]  # a write to the shared memory renews it
    assert client.pttl(agents_key) > 1_000
    client.pexpire(agents_key, 1_000)
    s.private.notes = "m"  # and so does a write to an agent's memory
    assert client.pttl(agents_key) > 1_000
    s.private.delete()  # deleting one agent's memory leaves the session's participants
    assert s.agents() == ["A"]
    s.shared.persist()
    assert client.pttl(agents_key) == -1


def test_an_agents_writes_carry_its_name(client: redis.Redis, other_client: redis.Redis) -> None:
    """In a session opened for an agent, change events name that agent as the author."""
    listener = Session("authors", client=other_client)
    writer = Session("authors", agent="A", client=client)
    with listener.shared.subscribe() as feed:
        writer.shared.topic = "billing"
        event = feed.get(timeout=10)
    assert event is not None and (event.attribute, event.author) == ("topic", "A")


def test_one_agent_cannot_shorten_the_sessions_participant_list(client: redis.Redis) -> None:
    """expire() on one agent's memory leaves the participant set (shared by the session) as long as it was."""
    s = Session("long", client=client, ttl=600)
    s.agent("A").notes = "a"
    s.agent("B").notes = "b"
    s.agent("A").expire(1)
    assert client.pttl(s.shared.key + ":agents") > 500_000
    assert s.agents() == ["A", "B"]


def test_session_calls_while_redis_is_down_raise_connection_failed(switch: Switch) -> None:
    """agents() and delete() raise ConnectionFailed when Redis is unreachable; opening an agent's memory does not."""
    offline = switch.client()
    s = Session("down", agent="A", client=offline)
    s.shared.topic = "loaded"
    switch.cut()
    for call in (s.agents, s.delete, lambda: Session("down", client=offline).delete()):
        with pytest.raises(ConnectionFailed) as raised:
            call()
        assert isinstance(raised.value, ConnectionError) and isinstance(raised.value, RedisMemoryError)
    assert s.private.agent == "A" and s.agent("A") is s.private
    assert s.shared.topic == "loaded"


def test_a_participant_set_of_another_type_is_corrupt_data_naming_it(client: redis.Redis) -> None:
    """A participant set key holding a string makes agent(), private, agents() and delete() raise CorruptData."""
    s = Session("taken", agent="A", client=client)
    agents_key = s.shared.key + ":agents"
    client.set(agents_key, "someone else's")
    for call in (lambda: s.private, lambda: s.agent("A"), s.agents, s.delete):
        with pytest.raises(CorruptData) as raised:
            call()
        assert raised.value.key == agents_key and isinstance(raised.value, ValueError)
    assert client.get(agents_key) == b"someone else's"


def _wait_online(mem: AgentMemory) -> None:
    deadline = time.monotonic() + 10
    while not mem.status().online and time.monotonic() < deadline:
        time.sleep(0.02)


def _session_keys(client: redis.Redis, session_id: str) -> list[bytes]:
    return [k for k in all_keys(client, "*") if b"{" + session_id.encode() + b"}" in k]


def test_an_agent_first_opened_while_redis_is_down_is_deleted_with_the_session(
    switch: Switch, client: redis.Redis
) -> None:
    """An agent whose memory was opened during an outage joins the participants once it writes; delete() takes it."""
    offline = switch.client()
    switch.cut()
    s = Session("late", agent="A", client=offline)
    agent = s.private  # opened while Redis is down
    with pytest.raises(ConnectionFailed):
        agent.notes = "never loaded here: refused"
    switch.restore()
    _wait_online(agent)
    s.private.notes = "written once Redis is back"
    assert Session("late", client=client).agents() == ["A"]
    Session("late", client=client).delete()
    assert _session_keys(client, "late") == []


def test_an_agent_that_writes_to_an_expired_session_is_deleted_with_it(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """Once a session expired, an agent writing to it again is a participant again: delete() leaves nothing."""
    s = Session("expired", agent="A", client=client, ttl=600)
    s.private.notes = "first life"
    s.shared.topic = "first life"
    for key in _session_keys(client, "expired"):
        client.delete(key)  # as the expiry would
    s.private.notes = "second life"
    assert Session("expired", client=other_client).agents() == ["A"]
    Session("expired", client=other_client).delete()
    assert _session_keys(client, "expired") == []


def test_an_agent_deleted_by_another_process_and_written_again_is_deleted_with_the_session(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """After Session.delete() elsewhere, an agent's next write makes it a participant again."""
    s = Session("again", agent="A", client=client)
    s.private.notes = "before"
    Session("again", client=other_client).delete()
    s.private.notes = "after"
    assert Session("again", client=other_client).agents() == ["A"]
    Session("again", client=other_client).delete()
    assert _session_keys(client, "again") == []


def test_an_agent_with_a_shorter_ttl_never_shortens_the_participant_set(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """Opening or writing an agent's memory with a short ttl leaves the participant set's longer expiry alone."""
    long = Session("mixed", client=client, ttl=600)
    long.agent("A").notes = "a"
    agents_key = long.shared.key + ":agents"
    short = Session("mixed", client=other_client, ttl=5)
    short.agent("B").notes = "b"
    assert client.pttl(agents_key) > 500_000
    assert long.agents() == ["A", "B"]


def test_a_session_only_its_agents_wrote_is_listed_and_deleted_when_idle(client: redis.Redis) -> None:
    """A session whose agents wrote but whose shared memory never was is listed, counted and deleted when idle."""
    s = Session("agents-only", agent="A", client=client)
    s.private.notes = "x"
    assert Session.list_ids(client=client) == ["agents-only"]
    assert SessionMemory.count(client=client) == 1
    assert Session.delete_idle(0, client=client) == 1
    assert _session_keys(client, "agents-only") == []


def test_an_agent_writing_keeps_its_session_from_being_idle(client: redis.Redis) -> None:
    """A session is idle only when its shared memory and every agent's memory are: delete_idle spares it otherwise."""
    s = Session("busy", agent="A", client=client)
    s.shared.topic = "set long ago"
    time.sleep(1.1)
    s.private.notes = "fresh"
    client.zadd("rm:session:index", {"busy": 0})  # as an index score lagging behind would
    assert Session.list_ids(idle_for=1, client=client) == []
    assert Session.delete_idle(1, client=client) == 0
    assert Session("busy", agent="A", client=client).private.notes == "fresh"
    assert Session.list_ids(client=client) == ["busy"]
