"""Batches: ``with mem.batch():`` sends its changes in one call, in order, all or none."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import redis
from conftest import Switch, Trips

from redis_memory import BatchIncomplete, ConversationMemory, Memory
from redis_memory.store import version_number


def version(client: redis.Redis, mem: Memory) -> int:
    return version_number(client.hget(mem.key, "v") or b"")


def test_a_batch_is_one_round_trip_and_one_version(client: redis.Redis) -> None:
    """1,000 attribute sets in a batch reach Redis in at most 3 round trips, as one change (one version)."""
    mem = Memory("b", client=client)
    mem.seed = 0
    before = version(client, mem)
    trips = Trips(mem)
    with mem.batch():
        for i in range(1000):
            mem[f"k{i}"] = i
    assert trips.count <= 3
    assert version(client, mem) == before + 1
    assert Memory("b", client=client).to_dict() == {"seed": 0, **{f"k{i}": i for i in range(1000)}}


def test_statements_apply_locally_at_once_and_in_order(client: redis.Redis) -> None:
    """Inside the block each change shows at once (without a round trip); at its end Redis holds them, in order,
    containers made inside the block included."""
    mem = ConversationMemory("order", client=client)
    mem.messages = []
    trips = Trips(mem)
    with mem.batch():
        mem.messages.append({"role": "user", "content": "hi"})
        mem.profile = {"tags": ["a"], "seen": {"x"}}
        mem.profile["tags"].append("b")
        mem.profile["seen"].add("y")
        mem.profile["nested"] = {"list": [1]}
        mem.profile["nested"]["list"].insert(0, 0)
        mem.messages.append({"role": "assistant", "content": "hello"})
        mem.messages[0]["content"] = "hi!"  # a message stored whole, changed: promoted first
        mem.tmp = [1, 2]
        del mem.tmp
        mem.x = 1
        mem.x = 2
        inside = mem.to_dict()
        assert trips.count == 1  # the version check when the block began
    expected = {
        "messages": [{"role": "user", "content": "hi!"}, {"role": "assistant", "content": "hello"}],
        "profile": {"tags": ["a", "b"], "seen": {"x", "y"}, "nested": {"list": [0, 1]}},
        "x": 2,
    }
    assert inside == expected
    assert mem.to_dict() == expected
    assert ConversationMemory("order", client=client).to_dict() == expected
    # the proxies made inside the block are the stored containers now
    mem.profile["tags"].append("c")
    assert ConversationMemory("order", client=client).profile["tags"] == ["a", "b", "c"]


def test_an_exception_sends_nothing_and_restores_the_view(client: redis.Redis) -> None:
    """A block that raises sends nothing: Redis and the local view stay as they were."""
    mem = Memory("undo", client=client)
    mem.log = [1]
    mem.d = {"a": 1}
    before = version(client, mem)
    with pytest.raises(KeyError), mem.batch():
        mem.log.append(2)
        mem.d["b"] = 2
        mem.new = [3]
        raise KeyError("boom")
    assert version(client, mem) == before
    assert mem.to_dict() == {"log": [1], "d": {"a": 1}}
    assert Memory("undo", client=client).to_dict() == {"log": [1], "d": {"a": 1}}
    mem.log.append(4)  # the memory goes on working
    assert Memory("undo", client=client).log == [1, 4]


def test_a_nested_batch_joins_the_outer_one(client: redis.Redis, other_client: redis.Redis) -> None:
    """The inner block's end sends nothing; the outer block's end sends both as one change."""
    mem = Memory("nest", client=client)
    mem.seed = 0
    before = version(client, mem)
    with mem.batch():
        mem.a = 1
        with mem.batch():
            mem.b = 2
        assert version(client, mem) == before
        assert Memory("nest", client=other_client).to_dict() == {"seed": 0}
        mem.c = 3
    assert version(client, mem) == before + 1
    assert Memory("nest", client=client).to_dict() == {"seed": 0, "a": 1, "b": 2, "c": 3}


def test_sets_of_scalars_on_one_dict_go_as_one_operation(client: redis.Redis, other_client: redis.Redis) -> None:
    """Consecutive sets of scalars on one dict are sent as one operation, with the outcome of setting them one by
    one: a key set twice keeps its place and its last value. The dict's change count stays the server's, so a
    later change that checks it (replacing the dict) is not refused as stale: one round trip."""
    mem = Memory("merge", client=client)
    mem.profile = {"name": "Ada", "old": {"x": 1}}
    with mem.subscribe() as feed:
        with mem.batch():
            mem.profile["a"] = 1
            mem.profile["b"] = 2
            mem.profile["a"] = 3
            mem.profile.update(c=4, name="Grace")
            mem.top = "t"
            mem.profile["d"] = 5
        events = []
        while (event := feed.get(timeout=2)) is not None and len(events) < 20:
            events.append(event)
    expected = {"profile": {"name": "Grace", "old": {"x": 1}, "a": 3, "b": 2, "c": 4, "d": 5}, "top": "t"}
    fresh = Memory("merge", client=other_client)
    assert mem.to_dict() == fresh.to_dict() == expected
    assert list(fresh.profile) == list(mem.profile) == ["name", "old", "a", "b", "c", "d"]
    # one event per key set, once each, in the order of the operations sent
    assert [e.path for e in events] == [("profile", k) for k in ("a", "b", "c", "name")] + [("top",), ("profile", "d")]
    trips = Trips(mem)
    mem.profile = None  # removes the dict, as seen at its change count
    assert trips.count == 1
    assert Memory("merge", client=other_client).to_dict() == {"profile": None, "top": "t"}


def test_a_nested_batch_that_raises_takes_back_sets_it_would_merge(client: redis.Redis) -> None:
    """A nested block's sets are never merged into an operation made before it: if it raises, none of them is
    sent, while the outer block's own sets, before and after it, are."""
    mem = Memory("nest-merge", client=client)
    mem.seed = 0
    with mem.batch():
        mem.a = 1
        with pytest.raises(KeyError), mem.batch():
            mem.b = 2
            mem.a = 20
            raise KeyError("inner")
        mem.c = 3
    assert Memory("nest-merge", client=client).to_dict() == {"seed": 0, "a": 1, "c": 3}
    assert mem.to_dict() == {"seed": 0, "a": 1, "c": 3}


def test_merged_sets_left_out_are_reported_one_by_one(
    client: redis.Redis, other_client: redis.Redis, switch: Switch
) -> None:
    """Sets merged into one operation and left out (another writer deleted their dict) are each named: online in
    BatchIncomplete.failures, offline in status().dropped."""
    mem = Memory("merged-gone", client=client)
    mem.keep = 0
    mem.d = {"x": 0}
    with pytest.raises(BatchIncomplete) as raised, mem.batch():
        mem.d["a"] = 1
        mem.d["b"] = 2
        mem.d["c"] = 3
        mem.keep = 1
        del Memory("merged-gone", client=other_client).d
    assert len(raised.value.failures) == 3
    assert Memory("merged-gone", client=client).to_dict() == {"keep": 1}

    offline = Memory("merged-offline", client=switch.client())
    offline.d = {"x": 0}
    held = offline.d
    switch.cut()
    with offline.batch():
        held["a"] = 1
        held["b"] = 2
        held["c"] = 3
    del Memory("merged-offline", client=client).d
    switch.restore()
    assert offline.flush(timeout=10) is False  # the three sets were dropped
    assert offline.status().dropped == 3
    assert Memory("merged-offline", client=client).to_dict() == {}


def test_a_stale_view_is_built_again_and_the_batch_applied(client: redis.Redis, other_client: redis.Redis) -> None:
    """Another writer changes a container the batch removes, while the block runs: the server refuses the
    batch whole, and the statements are made again from the fresh view; nothing of anyone's is lost."""
    mem = Memory("stale", client=client)
    mem.items = [{"inner": [1]}, "keep"]
    mem.other = 0
    other = Memory("stale", client=other_client)
    trips = Trips(mem)
    with mem.batch():
        del mem.items[0]  # removes a dict node as this view saw it
        mem.other = 1
        other.items[0]["inner"].append(2)  # changes that node before the batch is sent
        other.extra = "theirs"
    # the version check, the refused call, the reload, the call made again (and the reload after it)
    assert trips.count >= 4
    assert Memory("stale", client=client).to_dict() == {"items": ["keep"], "other": 1, "extra": "theirs"}
    assert mem.to_dict() == {"items": ["keep"], "other": 1, "extra": "theirs"}


def test_an_operation_that_can_no_longer_apply_is_named_and_the_rest_lands(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """A container deleted by another writer while the block runs: its change is left out and named in
    BatchIncomplete; the batch's other changes are in Redis."""
    mem = Memory("gone", client=client)
    mem.log = []
    held = mem.log
    other = Memory("gone", client=other_client)
    with pytest.raises(BatchIncomplete) as raised, mem.batch():
        held.append("lost")
        mem.note = "kept"
        del other.log
    assert len(raised.value.failures) == 1
    assert Memory("gone", client=client).to_dict() == {"note": "kept"}
    assert mem.to_dict() == {"note": "kept"}


def test_offline_a_batch_is_queued_and_replayed_as_one_call(switch: Switch, client: redis.Redis) -> None:
    """Made offline, a batch waits in the queue; once Redis is back it lands as one change (one version)."""
    mem = Memory("q", client=switch.client())
    mem.log = []
    before = version(client, mem)
    switch.cut()
    with mem.batch():
        mem.log.append(1)
        mem.profile = {"tags": []}
        mem.profile["tags"].append("x")
    assert mem.status().pending == 3
    assert mem.to_dict() == {"log": [1], "profile": {"tags": ["x"]}}
    switch.restore()
    assert mem.flush(timeout=10)
    assert version(client, mem) == before + 1
    assert Memory("q", client=client).to_dict() == {"log": [1], "profile": {"tags": ["x"]}}
    mem.profile["tags"].append("y")  # the containers made offline have their server ids
    assert Memory("q", client=client).profile == {"tags": ["x", "y"]}


def test_every_change_of_a_batch_reaches_a_subscriber(client: redis.Redis) -> None:
    """A batch publishes one message; a subscriber gets one event per change in it, in order, one version."""
    mem = Memory("feed", client=client)
    mem.log = []
    with mem.subscribe() as feed:
        with mem.batch():
            mem.log.append("a")
            mem["key with spaces\nand a newline"] = 1
            mem.log.append("b")
        events = [feed.get(timeout=10) for _ in range(3)]
        assert feed.get(timeout=0.3) is None
    assert [(e.op, e.path) for e in events if e is not None] == [
        ("append", ("log", 0)),
        ("set", ("key with spaces\nand a newline",)),
        ("append", ("log", 1)),
    ]
    assert len({e.version for e in events if e is not None}) == 1


READER = """
import sys
from redis_memory import Memory
mem = Memory("atomic", url=sys.argv[1])
torn = 0
for _ in range(400):
    d = mem.to_dict()
    if d.get("a") != d.get("b") or len(d.get("log", [])) != d.get("a", 0):
        torn += 1
print(torn)
"""


@pytest.fixture
def atomic_writer(real_url: str) -> Iterator[Memory]:
    mem = Memory("atomic", url=real_url)
    mem.a, mem.b, mem.log = 0, 0, []
    yield mem
    mem.close()


def test_no_other_process_ever_sees_half_a_batch(atomic_writer: Memory, real_url: str) -> None:
    """While one process sends batches that keep a == b == len(log), a reader in another process never sees
    them disagree."""
    reader = subprocess.Popen([sys.executable, "-c", READER, real_url], stdout=subprocess.PIPE, text=True)
    mem = atomic_writer
    n = 0
    while reader.poll() is None and n < 5000:
        n += 1
        with mem.batch():
            mem.a = n
            mem.log.append(n)
            mem.b = n
    out, _ = reader.communicate(timeout=60)
    assert int(out) == 0
    assert n > 20  # the reader read while batches landed
    assert Memory("atomic", url=real_url).to_dict() == {"a": n, "b": n, "log": list(range(1, n + 1))}
