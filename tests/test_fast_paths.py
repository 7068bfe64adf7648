"""The apply function's fast paths change, answer and publish what its general path does, field for field.

Each case runs one operation through the library as a user would, which
records the call it sends. The hash is then put back as it was before, and
the same call is sent to two variants of the library: one without the fast
paths, and one that has only them (it answers 'general' where the general
path would have had to run). The fast path's hash, reply and change event
must equal the general path's; where the fast path declines, it must have
written nothing.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from redis_memory import ConversationMemory, CorruptData, Memory, Session, store

DISPATCH = re.compile(
    r"  if ARGV\[6\] == '1' and ARGV\[12\] == '0' and ARGV\[13\] == '0' then\n"
    r"    local reply = fast\(KEYS, ARGV\)\n    if reply then return reply end\n  end\n"
)
FAST = "  do return ARGV[6] == '1' and ARGV[12] == '0' and ARGV[13] == '0' and fast(KEYS, ARGV) or {'general'} end\n"
VARIANTS = {"general": "", "fast": FAST, "lean": FAST}
#: Where the fast path tries the lean one; in the lean variant, nothing else is tried.
LEAN_CALL = "(name == 'lappend' and lean_append or lean_set)(KEYS, ARGV, K, meta, hf, wf)"
LEAN_DISPATCH = f"    local reply = {LEAN_CALL}\n    if reply then return reply end\n  end\n"
LEAN_ONLY = f"    return {LEAN_CALL} or {{'general'}}\n  end\n  do return {{'general'}} end\n"


def _variant_source(name: str) -> str:
    source = store.LIBRARY
    digest = source.splitlines()[0].removeprefix("#!lua name=redis_memory_")
    assert len(DISPATCH.findall(source)) == 1, "the fast path's dispatch in lua/apply.lua changed: update this test"
    assert source.count(LEAN_DISPATCH) == 1, "the lean path's dispatch in lua/apply.lua changed: update this test"
    if name == "lean":
        source = source.replace(LEAN_DISPATCH, LEAN_ONLY)
    return DISPATCH.sub(VARIANTS[name], source).replace(digest, f"t{name}")


def _commands(packed: bytes) -> list[list[bytes]]:
    """The commands of a RESP request (arrays of bulk strings)."""
    commands, pos = [], 0
    while pos < len(packed):
        end = packed.index(b"\r\n", pos)
        count, pos, args = int(packed[pos + 1 : end]), end + 2, []
        for _ in range(count):
            end = packed.index(b"\r\n", pos)
            size = int(packed[pos + 1 : end])
            args.append(packed[end + 2 : end + 2 + size])
            pos = end + 4 + size
        commands.append(args)
    return commands


@pytest.fixture
def variants(client: Any) -> None:
    """The two variants, loaded on the server (every master of a cluster).

    They stay loaded for the next tests (FLUSHALL keeps functions): a load
    of a library already there is refused before its code is compiled.
    """
    for name in VARIANTS:
        source = _variant_source(name)
        if isinstance(client, redis.RedisCluster):
            client.execute_command("FUNCTION", "LOAD", "REPLACE", source, target_nodes=redis.RedisCluster.PRIMARIES)
            continue
        try:
            client.function_load(source)
        except redis.ResponseError as exc:
            if "already exists" not in str(exc):
                raise


def _memory(kind: str, client: Any) -> Memory:
    if kind == "plain":
        return Memory("fast", client=client)
    if kind == "expiring, with an author":
        return Memory("fast", client=client, ttl=600, author="agent-a")
    if kind == "bounded":
        return ConversationMemory("fast", client=client, max_messages=5)
    if kind == "bounded, full":
        return ConversationMemory("fast", client=client, max_messages=3)
    return Session("fast", client=client, agent="planner", ttl=600).private  # shares the participant set's expiry


#: name -> (kind of memory, the operation, whether the fast path takes it)
CASES: dict[str, tuple[str, Callable[[Memory], object], bool]] = {
    "append a scalar": ("plain", lambda m: m.messages.append("z"), True),
    "append a dict": ("plain", lambda m: m.messages.append({"role": "user", "content": "hi"}), True),
    "extend with scalars and dicts": ("plain", lambda m: m.messages.extend(["p", {"q": 1}, 3, {"r": "s"}]), True),
    "append to an expiring memory with an author": ("expiring, with an author", lambda m: m.messages.append(1), True),
    "append in a session (a shared expiry)": ("session", lambda m: m.messages.append({"a": 1}), True),
    "append to a bounded list with room": ("bounded", lambda m: m.messages.append({"n": 1}), True),
    "append that trims a bounded list": ("bounded", lambda m: m.messages.extend([{"n": n} for n in range(4)]), False),
    "append of one that trims a bounded list": ("bounded, full", lambda m: m.messages.append({"n": 1}), False),
    "append of a list": ("plain", lambda m: m.messages.append([1, 2]), False),
    "change a root key": ("plain", lambda m: setattr(m, "title", "new title"), True),
    "add a root key": ("plain", lambda m: setattr(m, "subtitle", "more"), True),
    "set a root key on an expiring memory": ("expiring, with an author", lambda m: setattr(m, "title", "t2"), True),
    "set a root key to what it holds": ("plain", lambda m: setattr(m, "title", "title"), False),
    "replace a dict by a scalar": ("plain", lambda m: setattr(m, "profile", "none"), False),
    "add a key to a nested dict": ("plain", lambda m: m.profile.__setitem__("age", 3), True),
    "change a key of a nested dict": ("expiring, with an author", lambda m: m.profile.__setitem__("name", "Bo"), True),
    "set a nested dict's key to what it holds": ("plain", lambda m: m.profile.__setitem__("name", "Ada"), False),
    "set a key of a nested dict to a dict": ("plain", lambda m: m.profile.__setitem__("home", {"city": "X"}), False),
    "set two keys of a nested dict": ("plain", lambda m: m.profile.update(a=1, b=2), False),
}


#: The cases the lean path takes (an append of one item or a scalar set of one key, sent with what it writes).
LEAN = {
    "append a scalar", "append a dict", "append to an expiring memory with an author",
    "append in a session (a shared expiry)", "append to a bounded list with room", "change a root key",
    "add a root key", "set a root key on an expiring memory", "add a key to a nested dict",
    "change a key of a nested dict",
}  # fmt: skip
#: Cases sent with what they write, which the lean path declines (the server holds the value already).
LEAN_DECLINES = {"set a root key to what it holds", "set a nested dict's key to what it holds"}


def _large_counts(client: Any, key: str) -> None:
    """Valid stored numbers of 15 digits: the version, the node counter, a list's and the root's counts."""
    stamp = client.hget(key, "v").split(b" ")[1]
    client.hset(key, mapping={"v": b"99999999999999 " + stamp, "c": b"99999999999999"})
    for field, header in client.hgetall(key).items():
        kind, *numbers = header.split(b" ")
        if field.startswith(b"h") and kind == b"l":
            client.hset(key, field, b" ".join([kind, numbers[0], numbers[1], b"99999999999999", *numbers[3:]]))
        elif field.startswith(b"h") and kind == b"d":  # the root, or a nested dict (with its birth)
            client.hset(key, field, b" ".join([kind, numbers[0], b"99999999999999", b"99999999999999", *numbers[3:]]))


def _leading_zeros(client: Any, key: str) -> None:
    """Stored numbers with leading zeros (read as numbers, written back without them)."""
    client.hset(key, "c", b"0" + client.hget(key, "c"))
    for field, entry in client.hgetall(key).items():
        if field.startswith(b"h") and entry.startswith(b"d "):  # the root, or a nested dict (with its birth)
            _kind, count, next_seq, changes, *birth = entry.split(b" ")
            client.hset(key, field, b" ".join([b"d", b"0" + count, b"0" + next_seq, b"0" + changes, *birth]))
        elif field.startswith(b"w"):  # a writer's '<seq> <index time> <result>'
            seq, indexed, rest = entry.split(b" ", 2)
            client.hset(key, field, b"0%s 0%s %s" % (seq, indexed, rest))


def _births(client: Any, key: str, birth: Callable[[bytes], bytes]) -> None:
    """Each node header's birth (of a list or nested dict) made ``birth(it)``; a new version, which replicas reload."""
    count, stamp = client.hget(key, "v").split(b" ")
    client.hset(key, "v", b"%d %s" % (int(count) + 1000, stamp))
    for field, header in client.hgetall(key).items():
        parts = header.split(b" ")
        if field.startswith(b"h") and field != b"h0" and len(parts) == 5:
            client.hset(key, field, b" ".join([*parts[:4], birth(parts[4])]))


def _odd_births(client: Any, key: str) -> None:
    """Node births holding a zero byte (a birth is any bytes without a space)."""
    _births(client, key, lambda birth: birth + b"\x00z")


def _odd_incarnation(client: Any, key: str) -> None:
    """An incarnation holding a zero byte (any bytes without a space), which a change event carries whole."""
    client.hset(key, "i", client.hget(key, "i") + b"\x00z")


def _empty_births(client: Any, key: str) -> None:
    """Node headers whose birth is empty (a space after the counts)."""
    _births(client, key, lambda birth: b"")


def _long_version(client: Any, key: str) -> None:
    """A version count of 16 digits, past what the server's numbers hold exactly (replicas reload)."""
    stamp = client.hget(key, "v").split(b" ")[1]
    client.hset(key, "v", b"9007199254740993 " + stamp)


#: name -> how the hash is changed before the operation (valid data, oddly written)
STATES: dict[str, Callable[[Any, str], None] | None] = {
    "as written": None,
    "large counts": _large_counts,
    "leading zeros": _leading_zeros,
    "odd births": _odd_births,
    "odd incarnation": _odd_incarnation,
    "empty births": _empty_births,
    "a version of 16 digits": _long_version,
}


def _expected(case: str, state: str) -> tuple[bool, bool, bool]:
    """Whether, in ``state``, the fast path takes ``case``; whether the call sends what it writes; and whether the
    lean path takes that."""
    on_a_node = any(word in case for word in ("append", "extend", "nested"))  # a header with a birth
    fast = CASES[case][2] and not (state == "empty births" and on_a_node)  # the fast paths read a header's birth
    sends = case in LEAN | LEAN_DECLINES and state != "a version of 16 digits"  # a count the client cannot add to
    lean = sends and case in LEAN and not (state == "empty births" and on_a_node)  # (a header written otherwise)
    # Neither is a dict header written with leading zeros, which the client makes from the numbers it read.
    return fast, sends, lean and not (state == "leading zeros" and not case.startswith("append"))


def _normalized(fields: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """The hash without the activity time (ms), checked apart."""
    return {f: v for f, v in fields.items() if f != b"ta"}


def _events(pubsub: Any, wait: float = 2.0) -> list[bytes]:
    """The change events received within ``wait`` seconds, with their time (ms) blanked."""
    lines = []
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.05)
        if message is None:
            if lines:
                break
            continue
        if message["type"] == "message":
            for line in message["data"].split(b"\n"):
                parts = line.split(b" ")
                lines.append(b" ".join([parts[0], b"<ms>", *parts[2:]]))
    return lines


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("case", CASES)
def test_the_fast_path_writes_what_the_general_path_writes(
    client: Any, variants: None, monkeypatch: pytest.MonkeyPatch, case: str, state: str
) -> None:
    kind, operation, _ = CASES[case]
    takes_it, sends_them, lean_takes_them = _expected(case, state)
    mem = _memory(kind, client)
    mem.messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    mem.title = "title"
    mem.profile = {"name": "Ada"}
    mem.messages.append({"role": "user", "content": "c"})  # the writer has written a moment ago: its index is fresh
    key = mem.key
    prepare = STATES[state]
    if prepare is not None:
        prepare(client, key)
        mem = _memory(kind, client)  # a memory loading the state as it is
        mem.messages  # noqa: B018  (loaded)
    before = client.hgetall(key)

    sent: list[tuple[list[bytes], object]] = []
    original = store.Store._call_packed

    def recording(self: store.Store, packed: bytes, replies: int = 1, on_first: Any = None) -> Any:
        reply = original(self, packed, replies, on_first)
        command = _commands(packed)[0]
        if command[0] == b"FCALL" and command[1].endswith(b"_apply"):
            sent.append((command, reply))
        return reply

    pubsub = None if isinstance(client, redis.RedisCluster) else client.pubsub(ignore_subscribe_messages=True)
    if pubsub is not None:
        pubsub.subscribe(key + store.FEED_SUFFIX)
        pubsub.get_message(timeout=1)
    monkeypatch.setattr(store.Store, "_call_packed", recording)
    operation(mem)
    monkeypatch.undo()
    assert len(sent) == 1, "one call"
    command, library_reply = sent[0]
    library_fields = client.hgetall(key)
    library_events = _events(pubsub) if pubsub is not None else []

    def replay(variant: str, call: list[bytes] = command) -> Any:
        client.delete(key)
        client.hset(key, mapping=before)
        name = re.sub(rb"^rm_[0-9a-f]+_apply$", f"rm_t{variant}_apply".encode(), call[1])
        return client.execute_command("FCALL", name, *call[2:])

    general_reply = replay("general")
    general_fields = client.hgetall(key)
    general_events = _events(pubsub) if pubsub is not None else []
    fast_reply = replay("fast")
    fast_fields = client.hgetall(key)
    if pubsub is not None:
        _events(pubsub, wait=0.3)  # the fast variant's, if any (it answers at once)

    if takes_it:
        assert fast_reply[0] != b"general", "the fast path takes this call"
        assert library_reply == general_reply == fast_reply
        assert _normalized(library_fields) == _normalized(general_fields) == _normalized(fast_fields)
        times = [int(fields[b"ta"]) for fields in (library_fields, general_fields, fast_fields)]
        assert all(len(str(t)) == 13 for t in times) and max(times) - min(times) < 10_000
        assert library_events == general_events and len(library_events) == (pubsub is not None)
        if kind in ("expiring, with an author", "session"):
            assert 0 < client.pttl(key) <= 600_000
    else:
        assert fast_reply == [b"general"], "the fast path declines this call"
        assert fast_fields == before, "and has written nothing"
        assert library_reply == general_reply
        assert _normalized(library_fields) == _normalized(general_fields)

    # An append of one item or a scalar set comes with what it writes (the caller's view is fresh): the lean path
    # uses it.
    argv = command[3 + int(command[2]) :]
    own = 13 + max(0, int(argv[12]))  # the op's argument count, after its removal plan
    sends_hints = len(argv) > own + 2 + int(argv[own])  # beyond the op's own arguments and the caller's version
    assert sends_hints == sends_them, "what the call sends beyond its version"
    if sends_hints and not lean_takes_them:
        assert replay("lean") == [b"general"] and client.hgetall(key) == before
    elif lean_takes_them:
        lean_reply = replay("lean")
        assert lean_reply[0] != b"general", "the lean path takes this call"
        assert lean_reply == general_reply and _normalized(client.hgetall(key)) == _normalized(general_fields)
        # Made from a view the server does not hold (another header, another
        # version): the fast path does not use it, and writes what the general path writes.
        head = command[: 3 + int(command[2])]
        for at, wrong in ((19, b"l 0 0 0 other"), (18, b"1 another")):
            call = [*head, *argv[:at], wrong, *argv[at + 1 :]]
            assert replay("lean", call) == [b"general"] and client.hgetall(key) == before
            expected = replay("general", call), _normalized(client.hgetall(key))
            assert (replay("fast", call), _normalized(client.hgetall(key))) == expected
        if pubsub is not None:
            _events(pubsub, wait=0.3)
    assert library_events == general_events
    if pubsub is not None:
        pubsub.close()


@pytest.mark.parametrize("node", ["dict", "list"])
def test_a_header_at_the_limit_of_its_counts_is_refused_after_it_fills(
    client: Any, other_client: Any, node: str
) -> None:
    """A node whose header reached 16 digits is corrupt for every path, the one writer's own included."""
    mem = Memory("limit", client=client)
    mem.p, mem.l = {"k": 0}, [0]
    key = mem.key
    if node == "dict":
        client.hset(key, b"h" + mem.p._rm_nid, b"d 1 999999999999999 5 " + mem.p._rm_birth)
    else:
        nid, lo = mem.l._rm_nid, 999999999999998
        client.hset(key, b"e%s:%d" % (nid, lo), client.hget(key, b"e%s:0" % nid))
        client.hdel(key, b"e%s:0" % nid)
        client.hset(key, b"h" + nid, b"l %d %d 5 %s" % (lo, lo + 1, mem.l._rm_birth))
    writer = Memory("limit", client=other_client)
    writer.to_dict()  # loaded: 15 digits fit

    def write(n: int) -> None:
        if node == "dict":
            writer.p[f"new{n}"] = n  # a new key takes the next seq
        else:
            writer.l.append(n)

    write(1)  # the counts reach 16 digits
    version = client.hget(key, "v")
    with pytest.raises(CorruptData):
        write(2)
    assert client.hget(key, "v") == version  # nothing written


def test_a_change_event_names_the_incarnation_the_server_holds(client: Any) -> None:
    """A root set whose memory's incarnation was rewritten behind the replica's back publishes the server's."""
    mem = Memory("incarnation", client=client)
    mem.t = 1
    client.hset(mem.key, "i", "another")
    channel = mem.key + store.FEED_SUFFIX
    if isinstance(client, redis.RedisCluster):  # published with SPUBLISH, on the memory's shard
        pubsub = client.pubsub()
        pubsub.ssubscribe(channel)
        pubsub.get_sharded_message(timeout=1)
        mem.t = 2
        message = pubsub.get_sharded_message(timeout=2)
        lines = [message["data"]] if message else []
    else:
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(channel)
        pubsub.get_message(timeout=1)
        mem.t = 2
        lines = _events(pubsub)
    pubsub.close()
    assert [line.split(b" ")[5] for line in lines] == [b"another"]
