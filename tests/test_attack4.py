"""Adversarial reproductions for ``with mem.batch():`` (each failed before its fix)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from conftest import Switch

from redis_memory import Memory, RedisMemoryError
from redis_memory.errors import ConnectionFailed


def fresh(client: redis.Redis, name: str) -> dict[str, Any]:
    return Memory(name, client=client).to_dict()


@pytest.fixture
def closing() -> Iterator[list[Memory]]:
    """Memories to close when the test ends, passed or not (their reconnect thread ends with them)."""
    opened: list[Memory] = []
    yield opened
    for mem in opened:
        mem.close()


# -- a batch of one statement ------------------------------------------------


def test_a_one_statement_batch_that_creates_a_container_leaves_it_usable(client: redis.Redis) -> None:
    """`with mem.batch(): mem.profile = {"tags": []}` - the most ordinary batch. For a call of
    one operation the server answers no per-operation results, so the client maps none of the
    provisional node ids it gave the new dict and list, and keeps the replica as exact. The
    next change to the new containers names ids the server never had: ContainerDeleted ("this
    list was deleted"), and again on every try until another writer makes this process
    reload. The change is lost."""
    mem = Memory("one", client=client)
    mem.seed = 0
    with mem.batch():
        mem.profile = {"tags": []}
    mem.profile["tags"].append("x")
    mem.profile["name"] = "n"
    assert fresh(client, "one") == {"seed": 0, "profile": {"tags": ["x"], "name": "n"}}


def test_a_one_statement_batch_appending_a_container_leaves_it_usable(client: redis.Redis) -> None:
    """The same through a held list: `with mem.batch(): mem.log.append({"steps": []})`, then
    `mem.log[-1]["steps"].append(1)` raises ContainerDeleted."""
    mem = Memory("one-append", client=client)
    mem.log = []
    with mem.batch():
        mem.log.append({"steps": []})
    mem.log[-1]["steps"].append(1)
    assert fresh(client, "one-append") == {"log": [{"steps": [1]}]}


def test_an_offline_one_statement_batch_keeps_the_changes_queued_after_it(
    switch: Switch, client: redis.Redis, closing: list[Memory]
) -> None:
    """Offline, `with mem.batch(): mem.tags = set()`, then `mem.tags.add("x")` (queued). On
    replay the batch is a group of one: the server answers no per-operation results for a
    call of one operation, so the set's provisional id is never mapped to the server's; the
    queued add names a node that never existed and is dropped ('gone'). "x" is lost; only
    status().dropped and a log line say so."""
    mem = Memory("one-off", client=switch.client())
    closing.append(mem)
    mem.seed = 0
    switch.cut()
    with mem.batch():
        mem.tags = set()
    mem.tags.add("x")
    switch.restore()
    assert mem.flush(timeout=10)
    assert mem.status().dropped == 0
    assert fresh(client, "one-off") == {"seed": 0, "tags": {"x"}}


# -- long lists -----------------------------------------------------------------


def test_a_batch_that_builds_a_long_list_then_reverses_it_lands(client: redis.Redis) -> None:
    """A batch stores a list of 1,500 items and then reverses it. The script's guard against a
    corrupt header ("a list longer than the hash", checked with HLEN) compares the new list's
    length with the hash as it was before the call (the batch's fields are written at the
    end): the user gets CorruptData about healthy data, and nothing is stored."""
    mem = Memory("long", client=client)
    mem.seed = 0
    with mem.batch():
        mem.big = list(range(1500))
        mem.big.reverse()
    assert fresh(client, "long") == {"seed": 0, "big": list(range(1499, -1, -1))}


def test_a_batch_that_builds_a_long_list_then_deletes_it_lands(client: redis.Redis) -> None:
    """Same guard, through a delete: `mem.big = list(range(1500)); del mem.big` in one batch
    finds the new list "corrupt" and will not drop it ('stale'): 20 attempts, full reloads,
    then ConcurrentModification with no other writer anywhere."""
    mem = Memory("long-del", client=client)
    mem.seed = 0
    with mem.batch():
        mem.big = list(range(1500))
        del mem.big
        mem.done = True
    assert fresh(client, "long-del") == {"seed": 0, "done": True}


# -- a statement that changes nothing on the server -------------------------


def test_a_batch_that_sets_a_key_to_its_value_then_clears_the_dict_lands(client: redis.Redis) -> None:
    """`cfg["a"] = 1` (already 1) then `cfg.clear()` in one batch. The first statement changes
    nothing on the server (its change count stays) but the batch counts it locally, so the
    clear's removal plan names a change count the server never reaches: every attempt is
    refused 'stale', and after 20 full reloads the user gets ConcurrentModification though no
    other writer exists. Online, the same two statements work."""
    mem = Memory("same", client=client)
    mem.cfg = {"a": 1, "b": 2}
    with mem.batch():
        mem.cfg["a"] = 1
        mem.cfg.clear()
    assert fresh(client, "same") == {"cfg": {}}


def test_a_sort_after_a_batch_that_rewrote_an_item_with_its_value_works(client: redis.Redis) -> None:
    """A batch writes `lst[0] = 3` where lst[0] already is 3 (nothing changes on the server).
    The batch still bumps the replica's change count of the list, and keeps the replica as
    exact: from then on every `lst.sort()` of this memory is refused 'stale' (its count is one
    ahead of the server's) and raises ConcurrentModification after 20 attempts."""
    mem = Memory("sorted", client=client)
    mem.lst = [3, 1, 2]
    with mem.batch():
        mem.lst[0] = 3
    mem.lst.sort()
    assert fresh(client, "sorted") == {"lst": [1, 2, 3]}


def test_a_batch_that_gives_up_leaves_the_local_view_as_redis_has_it(client: redis.Redis) -> None:
    """When the block's end cannot send the batch (here the server refuses every call), the
    local view must be Redis's again: it once kept the batch applied locally, and since the
    replica's version equals the server's it never reloaded."""
    from redis_memory import ServerRefused

    mem = Memory("ghost", client=client)
    mem.cfg = {"a": 1, "b": 2}
    store = mem._rm.store
    real = store.apply

    def refuse(*args: Any) -> Any:
        raise ServerRefused("refused for the test", key=mem.key)

    store.apply = refuse  # type: ignore[method-assign]
    try:
        with pytest.raises(RedisMemoryError), mem.batch():
            mem.cfg["a"] = 5
            mem.cfg.clear()
    finally:
        store.apply = real  # type: ignore[method-assign]
    assert mem.to_dict() == fresh(client, "ghost") == {"cfg": {"a": 1, "b": 2}}


# -- a refused batch, built again ------------------------------------------


def _stale_setup(mem: Memory, other: Memory) -> None:
    """Makes the batch that deletes mem.items[0] refused once: another writer changes that dict."""
    other.items[0]["inner"].append(2)


def test_a_refused_batch_keeps_the_changes_to_containers_it_created(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """A batch creates `profile = {"tags": []}`, appends to the new list, and deletes an item
    another writer changes meanwhile (the server refuses the batch: stale). Rebuilt from the
    fresh view, the append runs on the proxy made by the first attempt, which the reload
    killed: BatchIncomplete (ContainerDeleted) and "x" is lost, though nobody deleted the
    profile. The online path (or the same batch with no conflict) keeps it."""
    mem = Memory("created", client=client)
    mem.items = [{"inner": [1]}, "keep"]
    other = Memory("created", client=other_client)
    other.to_dict()
    with mem.batch():
        mem.profile = {"tags": []}
        mem.profile["tags"].append("x")
        del mem.items[0]
        _stale_setup(mem, other)
    assert fresh(client, "created") == {"items": ["keep"], "profile": {"tags": ["x"]}}


def test_a_refused_batch_does_not_pop_another_writers_item(client: redis.Redis, other_client: redis.Redis) -> None:
    """`mem.log.pop()` in a batch returns "b" (the last item seen) and is sent naming "b". The
    batch is refused for an unrelated stale delete; meanwhile another writer appended
    "theirs". Rebuilt on the fresh view, the pop now deletes "theirs": the user was handed "b"
    (which stays stored) and another writer's item is gone, silently."""
    mem = Memory("pop", client=client)
    mem.items = [{"inner": [1]}, "keep"]
    mem.log = ["a", "b"]
    other = Memory("pop", client=other_client)
    other.to_dict()
    with mem.batch():
        popped = mem.log.pop()
        del mem.items[0]
        _stale_setup(mem, other)
        other.log.append("theirs")
    assert popped == "b"
    assert fresh(client, "pop") == {"items": ["keep"], "log": ["a", "theirs"]}


def test_a_refused_batch_stores_each_value_as_it_was_at_its_statement(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """A statement stores the value as it is at that statement (the local view shows exactly
    that). When the batch is refused and rebuilt, each statement's value is encoded again from
    the user's object as it is at the block's end: a dict reused for two appends is stored
    twice with its last content, and the first message is silently changed."""
    mem = Memory("reuse", client=client)
    mem.items = [{"inner": [1]}, "keep"]
    mem.log = []
    other = Memory("reuse", client=other_client)
    other.to_dict()
    with mem.batch():
        row = {"n": 1, "tags": ["a"]}
        mem.log.append(row)
        row["n"] = 2
        mem.log.append(row)
        del mem.items[0]
        _stale_setup(mem, other)
    assert mem.to_dict()["log"] == [{"n": 1, "tags": ["a"]}, {"n": 2, "tags": ["a"]}]
    assert fresh(client, "reuse")["log"] == [{"n": 1, "tags": ["a"]}, {"n": 2, "tags": ["a"]}]


def test_a_refused_batch_keeps_its_change_to_a_message_another_writer_changed(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """A batch deletes an item another writer changes meanwhile (refused: stale, built again),
    and changes a message stored whole, which the other writer also changed (giving it fields
    of its own). On the reload the message's proxy is not kept (its birth changed from none
    to the other writer's token), so its statement "could no longer be made": BatchIncomplete
    says "this dict was deleted from ..." of a message nobody deleted, and the change is lost.
    A single write to that message (outside a batch) finds it and lands."""
    mem = Memory("msg-rebuilt", client=client)
    mem.items = [{"inner": [1]}, "keep"]
    mem.messages = [{"role": "user", "content": "a"}]
    other = Memory("msg-rebuilt", client=other_client)
    other.to_dict()
    with mem.batch():
        del mem.items[0]
        mem.messages[0]["seen"] = True
        _stale_setup(mem, other)
        other.messages[0]["content"] = "theirs"
    assert fresh(client, "msg-rebuilt") == {
        "items": ["keep"],
        "messages": [{"role": "user", "content": "theirs", "seen": True}],
    }


def test_setdefault_in_a_batch_returns_the_stored_container_as_online(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """`d.setdefault("k", []).append("x")` in a batch, while another writer set d["k"] to a list:
    online, the append goes to the list the server holds. Today the batch fails at the server
    (ServerRefused, a Lua error: see the next test). With that fixed, the setdefault is skipped
    ('x') and the append names the provisional default, which the server never made: the
    batch is refused, rebuilt, and the append raises BatchIncomplete (ContainerDeleted: "this
    list was deleted"); "x" is lost though nobody deleted anything."""
    mem = Memory("sd", client=client)
    mem.d = {}
    other = Memory("sd", client=other_client)
    with mem.batch():
        mem.d.setdefault("k", []).append("x")
        other.d["k"] = ["theirs"]
    assert fresh(client, "sd") == {"d": {"k": ["theirs", "x"]}}


def test_a_batch_goes_on_after_a_setdefault_that_finds_its_key(client: redis.Redis, other_client: redis.Redis) -> None:
    """Another writer sets d["k"] after this view was read; a batch does `d.setdefault("k", 0)`
    then `mem.n = 1`. The server finds the key ('exists', which a batch skips) and returns from
    the setdefault before reading its value's arguments: the next operation is parsed from
    the wrong arguments and the call dies on a Lua error ("attempt to compare nil with number"). The
    user gets ServerRefused, nothing of the batch is stored, and the local view keeps it all."""
    mem = Memory("sd-next", client=client)
    mem.d = {}
    other = Memory("sd-next", client=other_client)
    with mem.batch():
        other.d["k"] = 1  # after this view was read
        mem.d.setdefault("k", 0)
        mem.n = 1
    assert fresh(client, "sd-next") == {"d": {"k": 1}, "n": 1}
    assert mem.to_dict() == {"d": {"k": 1}, "n": 1}


def test_a_batch_changing_a_message_another_writer_changed_meanwhile_lands(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """A message stored whole is changed by another writer (which gives it fields of its own,
    a promotion) after this view was read; then the batch changes the same message. The
    batch's promotion finds the message promoted already and returns before reading its
    arguments: the dset after it is parsed from the promotion's leftovers and the call dies
    on a Lua error. The user gets ServerRefused and the change is not stored. (Two agents
    editing the same message is the ordinary case of a shared conversation.)"""
    mem = Memory("promoted", client=client)
    mem.messages = [{"role": "user", "content": "a"}]
    other = Memory("promoted", client=other_client)
    with mem.batch():
        other.messages[0]["content"] = "theirs"  # after this view was read
        mem.messages[0]["seen"] = True
    assert fresh(client, "promoted") == {"messages": [{"role": "user", "content": "theirs", "seen": True}]}


# -- offline ----------------------------------------------------------------


def test_an_offline_batch_changing_a_message_another_writer_changed_does_not_jam_the_queue(
    switch: Switch, client: redis.Redis, other_client: redis.Redis, closing: list[Memory]
) -> None:
    """Offline, a batch changes a message stored whole (queued: a promotion, then the dset);
    meanwhile another writer changes that message (promoting it). On replay the group call
    dies on the Lua error of the previous test, a ServerRefused that drain() does not handle
    for a group: the queue is stuck at its head, flush() fails, and the change (and anything
    queued after it) never lands."""
    mem = Memory("promoted-q", client=switch.client())
    closing.append(mem)
    mem.messages = [{"role": "user", "content": "a"}]
    switch.cut()
    with mem.batch():
        mem.messages[0]["seen"] = True
    mem.later = 1
    Memory("promoted-q", client=other_client).messages[0]["content"] = "theirs"
    switch.restore()
    assert mem.flush(timeout=10)
    assert fresh(client, "promoted-q") == {
        "messages": [{"role": "user", "content": "theirs", "seen": True}],
        "later": 1,
    }


def test_an_offline_batch_with_a_setdefault_that_finds_its_key_does_not_jam_the_queue(
    switch: Switch, client: redis.Redis, other_client: redis.Redis, closing: list[Memory]
) -> None:
    """Offline, a batch does `d.setdefault("k", 0)` then `mem.n = 1`; another writer sets d["k"]
    meanwhile. On replay the group call fails on the Lua error of the previous test; the
    group is never retried one by one (a ServerRefused leaves _replay_group unhandled): the
    queue is stuck at its head for good, flush() fails, and nothing queued after it lands."""
    mem = Memory("sd-jam", client=switch.client())
    closing.append(mem)
    mem.d = {}
    switch.cut()
    with mem.batch():
        mem.d.setdefault("k", 0)
        mem.n = 1
    mem.later = "queued after the batch"
    Memory("sd-jam", client=other_client).d["k"] = 1
    switch.restore()
    assert mem.flush(timeout=10)
    assert fresh(client, "sd-jam") == {"d": {"k": 1}, "n": 1, "later": "queued after the batch"}


def test_an_offline_batch_setdefault_that_finds_the_key_keeps_later_changes(
    switch: Switch, client: redis.Redis, other_client: redis.Redis, closing: list[Memory]
) -> None:
    """Offline, a batch does `d.setdefault("k", [])` and a later (queued) write appends to that
    list. Meanwhile another writer stored d["k"]. On replay the batch's setdefault is skipped
    ('x'), but, unlike a queued setdefault outside a batch, the default's provisional id is
    never mapped to the list the server holds: the later append names a node that never
    existed and is dropped ('gone'). "x" is lost (only status().dropped says so). (Today the
    replay first fails on the Lua error of test_a_batch_goes_on_after_a_setdefault_that_finds_its_key;
    with that fixed, status().dropped == 1.)"""
    mem = Memory("sdq", client=switch.client())
    closing.append(mem)
    mem.d = {}
    mem.n = 0
    switch.cut()
    with mem.batch():
        mem.d.setdefault("k", [])
        mem.n = 1
    mem.d["k"].append("x")
    Memory("sdq", client=other_client).d["k"] = ["theirs"]
    switch.restore()
    assert mem.flush(timeout=10)
    assert mem.status().dropped == 0
    assert fresh(client, "sdq") == {"d": {"k": ["theirs", "x"]}, "n": 1}


# -- nesting ----------------------------------------------------------------


def test_an_inner_batch_that_raised_sends_nothing_of_its_own(client: redis.Redis) -> None:
    """An inner `with mem.batch():` raises and the outer block catches it: the inner block's
    statements should not be sent (an exception inside a batch sends nothing). Today they stay
    in the outer batch and are committed with it."""
    mem = Memory("nested", client=client)
    mem.log = []
    with mem.batch():
        mem.log.append("outer")
        try:
            with mem.batch():
                mem.log.append("inner, abandoned")
                raise ValueError("inner fails")
        except ValueError:
            pass
    assert fresh(client, "nested") == {"log": ["outer"]}


# -- fork / threads ---------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_a_child_forked_while_another_thread_batches_writes_at_once(real_url: str) -> None:
    """Thread A is inside `with mem.batch():`; the main thread forks. The child has no thread A
    and never entered a batch, yet its writes join A's inherited batch: they are applied to
    its view, flush() returns True, and nothing ever reaches Redis."""
    mem = Memory("fork", url=real_url)
    mem.seed = 0
    inside, done = threading.Event(), threading.Event()

    def batching() -> None:
        with mem.batch():
            mem.a = 1
            inside.set()
            done.wait(10)

    t = threading.Thread(target=batching)
    t.start()
    inside.wait(10)
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            mem.child = "written"
            mem.flush(timeout=5)
            code = 0 if Memory("fork", url=real_url).to_dict().get("child") == "written" else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    done.set()
    t.join()
    assert os.waitstatus_to_exitcode(status) == 0
    assert Memory("fork", url=real_url).to_dict() == {"seed": 0, "a": 1, "child": "written"}


# -- the link breaking while the batch is on its way -------------------------


def _break_after_next_apply(mem: Memory, switch: Switch) -> None:
    """The next FCALL reaches Redis and is applied; then the link breaks before the reply."""
    store = mem._rm.store
    real = store._call_packed

    def once(packed: bytes, *rest: Any) -> Any:
        if b"FCALL" in packed[:40] and b"apply" in packed[:200]:
            store._call_packed = real  # type: ignore[method-assign]
            real(packed, *rest)
            switch.cut()
            raise ConnectionFailed("link broke before the reply")
        return real(packed, *rest)

    store._call_packed = once  # type: ignore[method-assign]


def test_a_resent_batch_with_a_skipped_setdefault_maps_the_right_nodes(
    switch: Switch, client: redis.Redis, other_client: redis.Redis, closing: list[Memory]
) -> None:
    """A batch's setdefault finds its key on the server (another writer set it: skipped, no
    node made) and the batch then creates `mem.new = []`. The link breaks after the call is
    applied, before the reply; a later offline append goes to mem.new. On resend the server
    answers 'dup', and the client counts node ids for the skipped default too: mem.new's
    provisional id is mapped one node too far, and the queued append is dropped ('gone').
    (Today the call first fails on the Lua error of
    test_a_batch_goes_on_after_a_setdefault_that_finds_its_key; with that fixed,
    status().dropped == 1.)"""
    mem = Memory("dupmap", client=switch.client())
    closing.append(mem)
    mem.d = {}
    other = Memory("dupmap", client=other_client)
    with mem.batch():
        mem.d.setdefault("k", {"default": True})
        mem.new = []
        other.d["k"] = {"theirs": True}
        _break_after_next_apply(mem, switch)
    mem.new.append("after")
    switch.restore()
    assert mem.flush(timeout=10)
    assert mem.status().dropped == 0
    assert fresh(client, "dupmap") == {"d": {"k": {"theirs": True}}, "new": ["after"]}


# -- memory-level calls inside the block ---------------------------------------


def test_delete_inside_a_batch_keeps_the_order_of_the_statements(client: redis.Redis) -> None:
    """`mem.a = 1; mem.delete(); mem.b = 2` in one batch: the delete ran at once (before the
    batch was sent) and the statement made before it was sent after it: Redis held {"a": 1,
    "b": 2} while this process showed {"b": 2}. delete() inside a batch is refused now
    (InsideBatch); the block then sends nothing."""
    from redis_memory import InsideBatch

    mem = Memory("del-inside", client=client)
    mem.seed = 0
    with pytest.raises(InsideBatch), mem.batch():
        mem.a = 1
        mem.delete()
    assert fresh(client, "del-inside") == {"seed": 0}
    assert mem.to_dict() == fresh(client, "del-inside")


def test_flush_inside_a_batch_does_not_claim_the_changes_are_in_redis(client: redis.Redis) -> None:
    """flush() is "wait until every change made so far is in Redis; True when it is". Inside a
    batch it returns True at once, while the batch's changes are in no Redis: a caller that
    flushes before telling another process to read (a helper called inside someone's batch)
    is told a lie. It raises InsideBatch now."""
    from redis_memory import InsideBatch

    mem = Memory("flush-inside", client=client)
    with mem.batch():
        mem.a = 1
        with pytest.raises(InsideBatch):
            mem.flush(timeout=0.5)
    assert fresh(client, "flush-inside") == {"a": 1}


@pytest.mark.parametrize("backend", ["redis7", "valkey"])  # fakeredis has no maxmemory
def test_a_batch_refused_for_lack_of_memory_leaves_the_local_view_as_redis_has_it(client: redis.Redis) -> None:
    """The server is out of memory (maxmemory, noeviction) when the batch is sent: the user
    gets ServerRefused (OOM) and nothing is written. A single statement leaves the local view
    as it was; the batch's statements, applied locally as they were made, stay: this process
    shows values stored nowhere, as exact, and never reloads them away."""
    mem = Memory("oom", client=client)
    mem.log = ["kept"]
    before = client.config_get("maxmemory")["maxmemory"]
    client.config_set("maxmemory", 1)
    try:
        with pytest.raises(RedisMemoryError), mem.batch():
            mem.log.append("new")
            mem.extra = "new"
    finally:
        client.config_set("maxmemory", str(before))
    assert mem.to_dict() == fresh(client, "oom") == {"log": ["kept"]}


# -- Redis coming back while the block runs ---------------------------------------


def test_a_batch_begun_offline_and_sent_after_redis_came_back_shows_its_changes(
    switch: Switch, client: redis.Redis, closing: list[Memory]
) -> None:
    """A change is queued offline; a batch begins (still offline); Redis comes back while the
    block runs. At the block's end the queue is replayed first, and that replay reloads the
    replica from Redis, wiping the batch's local changes; the batch is then sent, lands, and
    the replica (whose version now is the one the batch started from) is kept as exact. This
    process shows neither the batch's values nor its new list, which every other process
    sees, and the proxy the block made is dead."""
    mem = Memory("back", client=switch.client())
    closing.append(mem)
    mem.seed = 0
    switch.cut()
    mem.a = 1  # queued
    with mem.batch():
        mem.b = 2
        mem.c = [1]
        held = mem.c
        switch.restore()
        assert mem._rm.link.probe()  # the reconnect thread's probe: the link is back
    expected = {"seed": 0, "a": 1, "b": 2, "c": [1]}
    assert fresh(client, "back") == expected
    assert mem.to_dict() == expected
    held.append(2)
    assert fresh(client, "back")["c"] == [1, 2]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_a_fork_inside_a_batch_neither_sends_it_twice_nor_loses_the_childs_writes(real_url: str) -> None:
    """A process forks inside `with mem.batch():` and both processes leave the block. The
    child gets a writer id of its own and its seq restarts at 0, but it keeps the parent's
    batch: it sends it too (the parent's append lands twice), and under the child's writer
    id with the parent's seqs, so the server records seq N for the child. The child's own
    next writes have seqs 1, 2, ...: each is answered 'dup' (already applied) and silently
    dropped."""
    mem = Memory("fork-in", url=real_url)
    mem.log = []
    with mem.batch():
        mem.log.append("parent's batch")
        mem.n = 1
        pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            mem.child = "written"
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    stored = Memory("fork-in", url=real_url).to_dict()
    assert (stored["log"], stored.get("child")) == (["parent's batch"], "written")


def test_a_batch_whose_link_breaks_after_a_refusal_is_queued_not_lost(
    switch: Switch, client: redis.Redis, other_client: redis.Redis, closing: list[Memory]
) -> None:
    """The server refuses the batch (another writer made it stale) and the link breaks while
    the client reloads to build it again. An offline batch is queued ("offline, or if the link
    broke while the call was on its way, the operations are queued as one group"); here the
    ConnectionFailed of the reload escapes the block instead: nothing is queued, the user's
    changes are lost, and the local view keeps showing them."""
    mem = Memory("broke", client=switch.client())
    closing.append(mem)
    mem.items = [{"inner": [1]}, "keep"]
    other = Memory("broke", client=other_client)
    other.to_dict()
    store = mem._rm.store
    real = store.read_all

    def breaking() -> Any:
        store.read_all = real  # type: ignore[method-assign]
        switch.cut()
        return real()

    try:
        with mem.batch():
            del mem.items[0]
            mem.note = "mine"
            _stale_setup(mem, other)
            store.read_all = breaking  # type: ignore[method-assign]
    except ConnectionFailed:
        pass
    switch.restore()
    assert mem.flush(timeout=10)
    assert fresh(client, "broke") == {"items": ["keep"], "note": "mine"}


# -- a process killed while it queues a batch ---------------------------------------

KILLED_WHILE_QUEUING = r"""
import os, signal, struct, sys
from redis_memory import Memory, codec, queue
mem = Memory("transfer", url=sys.argv[1], spool=sys.argv[2])
mem.a, mem.b = 100, 0
print("ready", flush=True)
sys.stdin.readline()  # the link is cut now
real = queue.Spool._write

def write(self, writer, record):
    if record[0] == b"ops":  # the process dies half way through writing the batch to the spool
        data = codec.encode_record(record)
        frame = struct.pack(">I", len(data)) + data
        os.write(self._own(writer), frame[: len(frame) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real(self, writer, record)

queue.Spool._write = write
with mem.batch():
    mem.a = mem.a - 10
    mem.b = mem.b + 10
"""


@pytest.mark.parametrize("backend", ["redis7", "valkey"])
def test_a_batch_half_spooled_by_a_killed_process_is_never_replayed_in_half(
    switch: Switch, client: redis.Redis, tmp_path: Any
) -> None:
    """Offline with spool=, a batch moves 10 from a to b; the process is killed half way
    through writing the batch to the spool. The next process adopts the spool: the batch is
    all or none, never `a = 90` without `b = 10` (it was one record per operation, and the
    first one was replayed alone)."""
    assert switch.proxy is not None
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WHILE_QUEUING, switch.proxy.url, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    switch.cut()
    child.stdin.write("go\n")
    child.stdin.flush()
    assert child.wait(timeout=30) == -signal.SIGKILL
    switch.restore()
    mem = Memory("transfer", client=client, spool=str(tmp_path))
    try:
        mem.flush(timeout=10)
    finally:
        mem.close()
    assert fresh(client, "transfer") in ({"a": 100, "b": 0}, {"a": 90, "b": 10})


def test_a_group_replayed_one_by_one_then_cut_off_is_not_taken_as_applied_whole(
    switch: Switch, client: redis.Redis, other_client: redis.Redis, closing: list[Memory]
) -> None:
    """Offline, a batch of three is queued. On replay the server refuses the group (another
    writer made its second statement stale), so its operations go one by one; the first is
    applied, and the link breaks before its reply. Once back, the queue head is the whole
    group again, whose first seq the server has: it answers 'dup' for the call, and the
    client confirms all three. The second and third were never applied: lost, silently
    (status().dropped stays 0)."""
    mem = Memory("dup-group", client=switch.client())
    closing.append(mem)
    mem.items = [{"inner": [1]}, "keep"]
    switch.cut()
    with mem.batch():
        mem.note = "mine"
        del mem.items[0]
        mem.more = 1
    Memory("dup-group", client=other_client).items[0]["inner"].append(2)  # the group is refused: stale
    store = mem._rm.store
    real = store._call_packed
    calls = []

    def second_apply_breaks(packed: bytes, *rest: Any) -> Any:
        if b"apply" not in packed[:200]:
            return real(packed, *rest)
        calls.append(packed)
        if len(calls) != 2:
            return real(packed, *rest)
        real(packed, *rest)  # the first operation alone: applied...
        switch.cut()  # ...and the link breaks before the reply
        raise ConnectionFailed("link broke before the reply")

    store._call_packed = second_apply_breaks  # type: ignore[method-assign]
    switch.restore()
    mem.flush(timeout=1)
    # The group, then its first operation alone; an attempt after the cut (a flush or the
    # replay thread, as the threads run) reaches no server.
    arguments = [int(packed[1 : packed.index(b"\r\n")]) for packed in calls]
    assert len(arguments) >= 2 and arguments[0] > arguments[1]
    switch.restore()
    assert mem.flush(timeout=10)
    stored = fresh(client, "dup-group")
    assert (stored, mem.status().dropped) == ({"items": ["keep"], "note": "mine", "more": 1}, 0)
