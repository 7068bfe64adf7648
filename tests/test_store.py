"""Key layout, the server scripts, operation ids and the journal."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from conftest import Switch, Trips, all_keys

from redis_memory import ConnectionFailed, ConversationMemory, Memory, ops
from redis_memory.store import JOURNAL_SIZE, Step, Store, escape_id, memory_key, version_number


@pytest.mark.parametrize("identifier", ["a:b", "*", "{x}", "ü", "with space", "a%3Ab", "x}{y", "🙂"])
def test_escaped_ids_hold_no_special_characters(identifier: str) -> None:
    """Escaped ids contain only [A-Za-z0-9-_.~%], so no key can reach into another's tag."""
    escaped = escape_id(identifier)
    assert set(escaped) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~%")
    assert memory_key("rm", "conversation", identifier) == f"rm:conversation:{{{escaped}}}"


def test_escaping_is_injective() -> None:
    """Different ids always give different keys."""
    ids = ["a", "A", "a:b", "a%3Ab", "a%253Ab", "%", "%25", " ", "_", "{", "}", "*"]
    assert len({escape_id(i) for i in ids}) == len(ids)
    with pytest.raises(ValueError):
        escape_id("")


def test_memory_lives_in_one_hash(client: redis.Redis) -> None:
    """A memory's data is one Redis hash; its writer index shares the hash tag; delete() removes both."""
    mem = ConversationMemory("one", client=client)
    mem.messages = [{"role": "user", "content": "x"}]
    mem.profile = {"a": {"b": [1, 2]}}
    assert sorted(all_keys(client, "*{one}*")) == [mem.key.encode(), (mem.key + ":w").encode()]
    index = ConversationMemory._rm_catalog(client, "rm").part_of("one").encode()  # type: ignore[union-attr]
    assert sorted(all_keys(client)) == sorted([index, *all_keys(client, "*{one}*")])
    assert client.type(mem.key) == b"hash"
    assert client.type(mem.key + ":w") == b"zset"
    mem.delete()
    assert all_keys(client) == []


def test_operation_ids_of_long_silent_writers_are_pruned(client: redis.Redis, other_client: redis.Redis) -> None:
    """A writer silent for longer than the retention is forgotten when others write; active ones stay."""
    mem = Memory("prune", client=client)
    mem.x = 1
    client.hset(mem.key, "wgone", b"7 0 ")
    client.zadd(mem.key + ":w", {"gone": 0})
    Memory("prune", client=other_client).y = 2  # a new writer (another process) indexes itself and prunes
    assert client.hget(mem.key, "wgone") is None
    assert client.zscore(mem.key + ":w", "gone") is None
    writers = [f for f in client.hkeys(mem.key) if f.startswith(b"w")]
    assert len(writers) == 2 and client.zcard(mem.key + ":w") == 2


def test_layout_is_as_documented(client: redis.Redis) -> None:
    """The fields of a small memory match the layout described in store.py and the README."""
    mem = Memory("layout", client=client)
    mem.messages = ["hi"]
    fields = client.hgetall(mem.key)
    count, token = fields[b"v"].split(b" ")
    assert count == b"1" and fields[b"c"] == b"1" and len(fields[b"i"]) > 0
    assert fields[b"h0"] == b"d 1 2 1"
    assert fields[b"e0:\xa8messages"] == b"1:\xc11"
    assert fields[b"h1"] == b"l 0 1 0 " + token  # born of the operation that made version 1
    assert fields[b"e1:0"] == b"\xa2hi"
    mem.messages.append("there")
    fields = client.hgetall(mem.key)
    assert fields[b"h1"] == b"l 0 2 1 " + token and fields[b"e1:1"] == b"\xa5there"
    assert fields[b"v"].split(b" ")[0] == b"2" and fields[b"v"] != b"2 " + token


def test_append_touches_the_same_fields_whatever_the_size(client: redis.Redis) -> None:
    """Append is O(1): the 1000th append writes as many fields as the 3rd."""
    mem = Memory("big", client=client)
    mem.items = []

    def fields_touched_by_next_append() -> list[bytes]:
        mem.items.append({"role": "user", "content": "x"})
        version = version_number(client.hget(mem.key, "v"))
        entry: bytes = client.hget(mem.key, f"j{version % JOURNAL_SIZE}").split(b" ", 2)[2]
        fields, pos = [], 0
        while pos < len(entry):
            colon = entry.index(b":", pos)
            size = int(entry[pos:colon])
            fields.append(entry[colon + 1 : colon + 1 + size])
            pos = colon + 1 + size
        return fields

    small = [fields_touched_by_next_append() for _ in range(3)][-1]
    mem.items.extend([{"role": "user", "content": "x"}] * 1000)
    large = fields_touched_by_next_append()
    assert len(small) == len(large) == 2  # list slot (the message stored whole) + list header


def test_an_operation_id_is_applied_once(client: redis.Redis) -> None:
    """Resending an operation with the same (writer, seq), as a retry after a lost reply would, applies it once."""
    mem = Memory("dedupe", client=client)
    mem.items = []
    store = Store(client, mem.key)
    incarnation = client.hget(mem.key, "i")
    nid = mem.items._rm_nid
    call = [b"retrying-writer", incarnation, b"0", b""]

    def append(seq: int, value: int) -> Step:
        args = ops.ListAppend(nid, [value]).args()
        return Step(seq, b"tok%d" % seq, b"lappend", nid, mem.items._rm_birth, [], {}, args)

    first = store.apply(call, [append(1, 7)])
    again = store.apply(call, [append(1, 7)])
    assert (first.status, again.status) == ("ok", "dup")
    assert mem.items == [7]
    assert store.apply(call, [append(2, 8)]).status == "ok"
    assert mem.items == [7, 8]


def test_reader_far_behind_reloads_everything(client: redis.Redis, other_client: redis.Redis) -> None:
    """A replica more versions behind than the journal holds reloads in full and is exact."""
    reader = Memory("far", client=other_client)
    writer = Memory("far", client=client)
    writer.items = []
    assert reader.items == []
    held = reader.items
    for i in range(JOURNAL_SIZE + 5):
        writer.items.append(i)
    assert reader.items == list(range(JOURNAL_SIZE + 5))
    assert reader.items is held


def test_reader_catches_up_through_the_journal(client: redis.Redis, other_client: redis.Redis) -> None:
    """A replica a few versions behind fetches only the changed fields and keeps its proxies."""
    reader = Memory("near", client=other_client)
    writer = Memory("near", client=client)
    writer.log = [{"n": 0}]
    first = reader.log[0]
    writer.log.append({"n": 1})
    writer.log[0]["seen"] = True
    writer.log.insert(0, {"n": -1})
    assert reader.log == [{"n": -1}, {"n": 0, "seen": True}, {"n": 1}]
    assert reader.log[1] is first
    store = Store(other_client, reader.key)
    version = version_number(client.hget(reader.key, "v"))
    previous = b" ".join(client.hget(reader.key, f"j{(version - 1) % JOURNAL_SIZE}").split(b" ")[:2])
    sync = store.sync(previous, client.hget(reader.key, "i"))
    assert sync.kind == "delta" and 0 < len(sync.changes) <= 4


def test_memory_recreated_elsewhere_is_noticed(client: redis.Redis, other_client: redis.Redis) -> None:
    """If another process deletes and rebuilds a memory, a replica does not mistake it for the old one."""
    mine = Memory("again", client=client)
    mine.items = [1]
    held = mine.items
    theirs = Memory("again", client=other_client)
    theirs.delete()
    theirs.items = [2]
    assert mine.items == [2]
    assert not held._rm_live


def test_a_resent_pop_returns_the_removed_value(client: redis.Redis) -> None:
    """If the first copy of a pop was applied but its reply lost, the resent copy still returns the item."""
    mem = Memory("resent", client=client)
    mem.items = ["a", "b", "c"]
    items = mem.items
    store = mem._rm.store
    real_apply = store.apply

    def apply_twice(*args: object, **kwargs: object) -> object:
        real_apply(*args, **kwargs)  # applied, reply "lost"
        return real_apply(*args, **kwargs)  # the resend is answered 'dup'

    store.apply = apply_twice  # type: ignore[method-assign]
    try:
        assert items.pop() == "c"
        assert items.pop(0) == "a"
    finally:
        store.apply = real_apply  # type: ignore[method-assign]
    assert Memory("resent", client=client).items == ["b"]
    assert items == ["b"]


def test_the_server_code_is_loaded_again_when_the_server_lost_it(client: redis.Redis) -> None:
    """A server that lost the functions library (FUNCTION FLUSH, a restart without data) gets it again
    on the next write, read or delete."""
    mem = Memory("reload", client=client)
    mem.log = []
    for step in range(3):
        client.function_flush()
        mem.log.append(step)  # apply
        client.function_flush()
        other = Memory("reload", client=client)
        assert other.log == list(range(step + 1))
        other.note = step  # another writer's change, so the next read syncs
        client.function_flush()
        assert mem.log == list(range(step + 1))  # sync
    client.function_flush()
    mem.delete()  # delete
    assert client.exists(mem.key) == 0


def test_the_library_is_named_after_its_source() -> None:
    """Each command is a function of one library whose name carries a digest of the source, and the
    library holds every command's code with its includes, once."""
    from redis_memory import store

    source, names = store.library()
    digest = source.splitlines()[0].removeprefix("#!lua name=redis_memory_")
    assert len(digest) == 12 and set(store.COMMANDS) <= set(names)
    assert all(name == f"rm_{digest}_{command}" for command, name in names.items())
    assert source.count("local function begin(") == 1
    assert "@include" not in source and "@JOURNAL_SIZE@" not in source


def test_one_append_of_thousands_of_items_lands_whole(client: redis.Redis, other_client: redis.Redis) -> None:
    """An append of more items than Lua unpacks at once (about 8,000 values), by a writer that wrote a
    moment before (so the apply function's fast path takes it), lands whole, scalars and dicts alike."""
    mem = Memory("many", client=client)
    mem.items = []
    mem.items.extend(range(1, 4001))
    mem.items.extend({"n": n} for n in range(4001))
    fresh = Memory("many", client=other_client).items
    assert fresh[:4000] == list(range(1, 4001))
    assert fresh[4000:] == [{"n": n} for n in range(4001)]
    assert mem.items == fresh


def test_a_write_after_others_changes_brings_them_in_its_own_reply(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """A writer whose replica is behind (another process wrote since) learns of the others' changes from its
    write's reply: one round trip, no sync after it, and the replica, read as it is, equals a fresh load."""
    mem = ConversationMemory("behind", client=client)
    mem.messages = [{"role": "user", "content": "a"}]
    mem.profile = {"tags": ["x"]}
    held, tags = mem.messages, mem.profile["tags"]
    other = ConversationMemory("behind", client=other_client)
    other.messages.append({"role": "assistant", "content": "b"})
    other.title = "theirs"
    trips = Trips(mem)
    held.append({"role": "user", "content": "c"})  # the fast path
    assert trips.count == 1
    assert [m["content"] for m in held] == ["a", "b", "c"]
    other.profile["tags"].append("y")
    tags.append("z")  # the general path (a nested list, by a held proxy)
    assert trips.count == 2
    assert list(tags) == ["x", "y", "z"]
    assert mem._rm.replica.root == ConversationMemory("behind", client=other_client).to_dict()
    assert mem.to_dict() == ConversationMemory("behind", client=other_client).to_dict()


def test_reads_between_others_writes_take_one_round_trip(client: redis.Redis, other_client: redis.Redis) -> None:
    """While another writer keeps changing a memory, each read costs one round trip (a sync, with no version
    check before it); once nothing changes, each read is one round trip still; every read is fresh."""
    mem = Memory("busy", client=client)
    mem.n = 0
    other = Memory("busy", client=other_client)
    other.n = 1
    assert mem.n == 1
    trips = Trips(mem)
    for i in range(2, 12):
        other.n = i
        assert mem.n == i
    assert trips.count == 10
    for _ in range(5):
        assert mem.n == 11
    assert trips.count == 15
    other.n = 12
    assert mem.n == 12


def test_the_write_that_creates_a_memory_journals_no_fields(client: redis.Redis, other_client: redis.Redis) -> None:
    """The creating write's journal entry lists no fields (nobody syncs across it: a replica of the memory before
    has another incarnation), yet a replica loaded at that version still catches up by a delta: a version check
    and a sync, no full read."""
    mem = ConversationMemory("created", client=client)
    mem.messages = [{"role": "user", "content": f"m{i}"} for i in range(50)]
    stamp = client.hget(mem.key, "v")
    assert client.hget(mem.key, b"j%d" % version_number(stamp)) == stamp + b" *"
    reader = ConversationMemory("created", client=other_client)
    assert len(reader.messages) == 50
    mem.messages.append({"role": "user", "content": "m50"})
    trips = Trips(reader)
    assert reader.messages[-1] == {"role": "user", "content": "m50"}
    assert trips.count == 2


def test_reads_of_a_memory_deleted_elsewhere_are_one_round_trip_each(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """Once another writer deleted the memory, each read of it here is one version check: no sync, no reload."""
    mem = Memory("deleted-elsewhere", client=other_client)
    reader = Memory("deleted-elsewhere", client=client)
    mem.x = 1
    assert reader.x == 1
    mem.delete()
    assert not hasattr(reader, "x")
    loads = reader._rm.replica.loads
    trips = Trips(reader)
    for _ in range(5):
        assert not hasattr(reader, "x")
    assert trips.count == 5
    assert reader._rm.replica.loads == loads


@pytest.mark.parametrize("backend", ["redis7", "valkey"])
@pytest.mark.parametrize(
    "reply", [b"*1\r\n:1\r\n", b"+OK\r\n", b"_\r\n", b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n", b"*0\r\n"]
)  # (*0: RESP3 answers an empty hash with a map, %0)
def test_a_reply_of_the_wrong_shape_is_a_connection_failure_never_data(
    client: redis.Redis, switch: Switch, reply: bytes
) -> None:
    """A reply Redis never sends to the command (a peer that is not Redis, or one out of step) raises
    ConnectionFailed and closes the connection: an HGETALL so answered is not an empty memory (a write over it
    would replace the real data), a version check not a version, a write's reply not an outcome."""
    writer = ConversationMemory("shaped", client=client)
    writer.messages = [{"role": "user", "content": "kept"}]

    def back_online(mem: ConversationMemory) -> None:  # the reconnect thread finds Redis again
        deadline = time.monotonic() + 10
        while not mem.status().online:
            assert time.monotonic() < deadline
            time.sleep(0.02)

    with ConversationMemory("shaped", client=switch.client()) as mem:
        mem.ttl()  # the connection is open; nothing loaded yet
        switch.inject(reply)  # read as the reply to the next command, the load
        with pytest.raises(ConnectionFailed):
            hasattr(mem, "messages")
        back_online(mem)
        assert mem.messages == [{"role": "user", "content": "kept"}]
        writer.title = "changed"
        switch.inject(reply)  # now the version check's
        assert mem.messages == [{"role": "user", "content": "kept"}]  # served as it is, as in an outage
        back_online(mem)
        assert mem.title == "changed"
        switch.inject(reply)  # now the append's: it may have been applied, so it is queued with its id
        mem.messages.append({"role": "user", "content": "once"})
        assert mem.flush(timeout=10)
    contents = [m["content"] for m in ConversationMemory("shaped", client=client).messages]
    assert contents == ["kept", "once"]


@pytest.mark.parametrize("backend", ["redis7", "valkey"])
def test_a_client_speaking_resp2_reads_and_writes_as_any(
    servers: dict[str, Any], backend: str, client: redis.Redis
) -> None:
    """A client made with protocol=2 gets RESP2's flat lists: loads, catch-ups and writes work the same."""
    resp2 = redis.Redis.from_url(servers[backend].url, protocol=2)
    writer = ConversationMemory("resp2", client=client)
    writer.messages = [{"role": "user", "content": "one"}]
    mem = ConversationMemory("resp2", client=resp2)
    assert mem.messages == [{"role": "user", "content": "one"}]
    writer.messages.append({"role": "user", "content": "two"})
    writer.title = "t"
    assert len(mem.messages) == 2 and mem.title == "t"
    mem.messages.append({"role": "user", "content": "three"})
    assert [m["content"] for m in writer.messages] == ["one", "two", "three"]
    assert ConversationMemory("resp2-empty", client=resp2).to_dict() == {}


@pytest.mark.parametrize("backend", ["redis7", "valkey"])
def test_calls_that_need_the_server_refuse_a_reply_of_another_shape(client: redis.Redis, switch: Switch) -> None:
    """metadata(), ttl() and stats() so answered raise ConnectionFailed, and close the connection: the real
    reply, still on its way, is not read by the next command (another memory's load on the same client)."""
    ConversationMemory("shaped-b", client=client).messages = [{"role": "user", "content": "b"}]
    for call in ("metadata", "ttl", "stats"):
        through = switch.client()
        with ConversationMemory("shaped-a", client=through) as mem:
            mem.messages = [{"role": "user", "content": "a"}]
            switch.inject(b"+OK\r\n")
            with pytest.raises(ConnectionFailed):
                getattr(mem, call)()
            deadline = time.monotonic() + 10
            while not mem.status().online:  # the reconnect thread finds Redis again
                assert time.monotonic() < deadline
                time.sleep(0.02)
            with ConversationMemory("shaped-b", client=through) as other:
                assert other.messages == [{"role": "user", "content": "b"}]
