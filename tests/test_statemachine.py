"""Random mutation sequences through three memories on one id, against a model."""

from __future__ import annotations

import copy
import multiprocessing
import os
import time
from multiprocessing.connection import Connection
from typing import Any

import pytest
import redis
from conftest import Switch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from strategies import keys, near_depth_limit, same, values

from redis_memory import Memory, ObservedDict, ObservedList, ObservedSet, UnsupportedValue, codec
from redis_memory.replica import Replica

spawn = multiprocessing.get_context("spawn")

NAMES = ["a", "b", "c"]


def walk(root: Any, path: list[Any]) -> Any:
    for step in path:
        root = root[step]
    return root


def container_paths(value: Any, path: list[Any]) -> list[list[Any]]:
    found = [path] if path else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if isinstance(v, (list, dict, set)):
            found += container_paths(v, [*path, k])
    return found


def check_bookkeeping(local: Any, fresh: Any) -> None:
    """A replica's node ids, slots, counters and storage equal those of a fresh load."""
    assert type(local) is type(fresh)
    if isinstance(local, (ObservedList, ObservedDict, ObservedSet)):
        assert local._rm_birth == fresh._rm_birth
    if isinstance(local, ObservedSet):
        assert (local._rm_nid, local._rm_mod) == (fresh._rm_nid, fresh._rm_mod)
    if isinstance(local, (ObservedList, ObservedDict)):
        assert local._rm_nid == fresh._rm_nid
        assert local._rm_mod == fresh._rm_mod
        if isinstance(local, ObservedList):
            assert local._rm_lo == fresh._rm_lo
            for x, y in zip(local, fresh, strict=False):
                check_bookkeeping(x, y)
        else:
            assert local._rm_next == fresh._rm_next
            # Stored whole (in the same list) or with fields of its own, as the server has it.
            assert [up._rm_nid for up in (local._rm_up,) if up is not None] == [
                up._rm_nid for up in (fresh._rm_up,) if up is not None
            ]
            for k in fresh:
                check_bookkeeping(local[k], fresh[k])


class MemoryMachine(RuleBasedStateMachine):
    """The first memory reaches the server through a switch that rules cut and restore.

    While it is cut off, only it writes (to its replica and queue); the
    others, still online, must keep showing the state from before the cut.
    Once restored and flushed, all three must equal the model again.
    """

    client: redis.Redis
    switch: Switch
    #: Writers in processes of their own, each with another PYTHONHASHSEED (real servers only).
    seeded: list[Connection] = []
    runs = 0
    #: How often the rarer rules ran, so the test can tell they were exercised.
    hits: dict[str, int] = {}

    def __init__(self) -> None:
        super().__init__()
        MemoryMachine.runs += 1
        self.client.flushall()
        # The third is tracked (tracking=True): it must show every change without checking the version.
        self.mems = [Memory("sm", client=self.switch.client()), Memory("sm", client=self.client),
                     Memory("sm", client=self.client, tracking=True)]  # fmt: skip
        self.model: dict[str, Any] = {}
        self.before_cut: dict[str, Any] | None = None
        self.snapshot: tuple[dict[str, Any], dict[str, Any]] | None = None

    def writer(self, data: st.DataObject) -> Memory:
        return self.mems[0] if self.before_cut is not None else data.draw(st.sampled_from(self.mems))

    def target(self, data: st.DataObject, kind: type) -> tuple[Memory, list[Any]] | None:
        paths = [p for p in container_paths(self.model, []) if isinstance(walk(self.model, p), kind)]
        if not paths:
            return None
        mem = self.writer(data)
        return mem, data.draw(st.sampled_from(paths))

    @precondition(lambda self: self.before_cut is None)
    @rule()
    def cut_off_the_first_memory(self) -> None:
        self.mems[0].to_dict()  # its replica is loaded, as a user's would be
        self.switch.cut()
        self.before_cut = copy.deepcopy(self.model)

    @precondition(lambda self: self.before_cut is not None)
    @rule()
    def reconnect_the_first_memory(self) -> None:
        self.switch.restore()
        assert self.mems[0].flush(timeout=20), self.mems[0].status()
        assert self.mems[0].status().dropped == 0
        # Until the background probe finds the server back, writes would still queue.
        deadline = time.monotonic() + 20
        while not self.mems[0].status().online:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        self.before_cut = None

    def teardown(self) -> None:
        self.switch.restore()
        assert self.mems[0].flush(timeout=20)
        for mem in self.mems:
            mem.close()

    @precondition(lambda self: self.before_cut is None and self.snapshot is None)
    @rule()
    def take_a_snapshot(self) -> None:
        """What a server restarted from an older snapshot would come back with."""
        key = self.mems[0].key
        saved = {key: self.client.hgetall(key), key + ":w": self.client.zrange(key + ":w", 0, -1, withscores=True)}
        self.snapshot = (saved, copy.deepcopy(self.model))

    @precondition(lambda self: self.before_cut is None and self.snapshot is not None)
    @rule()
    def restart_the_server_from_the_snapshot(self) -> None:
        """The server loses every write since the snapshot; writes made after it must never pass for lost ones."""
        assert self.snapshot is not None
        saved, model = self.snapshot
        for key, content in saved.items():
            self.client.delete(key)
            if content and isinstance(content, dict):
                self.client.hset(key, mapping=content)
            elif content:
                self.client.zadd(key, dict(content))
        self.model, self.snapshot = model, None
        MemoryMachine.hits["rollback"] = MemoryMachine.hits.get("rollback", 0) + 1

    @rule(data=st.data(), name=st.sampled_from(NAMES), drawn=near_depth_limit)
    def set_a_value_near_the_depth_limit(self, data: st.DataObject, name: str, drawn: tuple[Any, int]) -> None:
        value, depth = drawn
        mem = self.writer(data)
        if depth > codec.MAX_DEPTH:
            before = mem.status().pending
            with pytest.raises(UnsupportedValue):
                setattr(mem, name, value)
            assert mem.status().pending == before
        else:
            setattr(mem, name, value)
            self.model[name] = copy.deepcopy(value)

    @precondition(lambda self: self.seeded and self.before_cut is None)
    @rule(data=st.data(), name=st.sampled_from(NAMES), key=keys, value=values)
    def dict_set_from_a_process_with_another_hash_seed(
        self, data: st.DataObject, name: str, key: Any, value: Any
    ) -> None:
        paths = [p for p in container_paths(self.model, []) if isinstance(walk(self.model, p), dict)]
        path = data.draw(st.sampled_from(paths)) if paths else []  # none: a new dict attribute
        worker = data.draw(st.sampled_from(self.seeded))
        worker.send((path, name, key, value))
        assert worker.poll(30), "the seeded writer did not answer"
        assert worker.recv() == "ok"
        if paths:
            walk(self.model, path)[key] = copy.deepcopy(value)
        else:
            self.model[name] = {key: copy.deepcopy(value)}
        MemoryMachine.hits["seeded"] = MemoryMachine.hits.get("seeded", 0) + 1

    @rule(data=st.data(), name=st.sampled_from(NAMES), value=values)
    def set_attribute(self, data: st.DataObject, name: str, value: Any) -> None:
        setattr(self.writer(data), name, value)
        self.model[name] = copy.deepcopy(value)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete_attribute(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.model)))
        delattr(self.writer(data), name)
        del self.model[name]

    @rule(data=st.data(), key=keys, value=values)
    def dict_set(self, data: st.DataObject, key: Any, value: Any) -> None:
        found = self.target(data, dict)
        if found:
            mem, path = found
            walk(mem, path)[key] = value
            walk(self.model, path)[key] = copy.deepcopy(value)

    @rule(data=st.data(), op=st.sampled_from(["del", "pop", "popitem", "clear"]))
    def dict_remove(self, data: st.DataObject, op: str) -> None:
        found = self.target(data, dict)
        if not found:
            return
        mem, path = found
        proxy, model = walk(mem, path), walk(self.model, path)
        if op == "clear":
            proxy.clear()
            model.clear()
        elif op == "popitem":
            if model:
                assert same(proxy.popitem(), model.popitem())
        elif model:
            key = data.draw(st.sampled_from(list(model)))
            if op == "del":
                del proxy[key]
                del model[key]
            else:
                assert same(proxy.pop(key), model.pop(key))

    @rule(data=st.data(), items=st.dictionaries(keys, values, max_size=3), default=values)
    def dict_update(self, data: st.DataObject, items: dict[Any, Any], default: Any) -> None:
        found = self.target(data, dict)
        if found:
            mem, path = found
            proxy, model = walk(mem, path), walk(self.model, path)
            proxy.update(items)
            model.update(copy.deepcopy(items))
            key = data.draw(keys)
            assert same(proxy.setdefault(key, default), model.setdefault(key, copy.deepcopy(default)))

    @rule(data=st.data(), value=values, index=st.integers(-4, 4),
          op=st.sampled_from(["append", "insert", "set", "extend", "iadd"]))  # fmt: skip
    def list_add(self, data: st.DataObject, value: Any, index: int, op: str) -> None:
        found = self.target(data, list)
        if not found:
            return
        mem, path = found
        proxy, model = walk(mem, path), walk(self.model, path)
        if op == "append":
            proxy.append(value)
            model.append(copy.deepcopy(value))
        elif op == "insert":
            proxy.insert(index, value)
            model.insert(index, copy.deepcopy(value))
        elif op == "extend":
            proxy.extend([value, value])
            model.extend([copy.deepcopy(value), copy.deepcopy(value)])
        elif op == "iadd":
            walk(mem, path[:-1])[path[-1]] += [value]
            model += [copy.deepcopy(value)]
        elif -len(model) <= index < len(model):
            proxy[index] = value
            model[index] = copy.deepcopy(value)

    @rule(data=st.data(), index=st.integers(-4, 4),
          op=st.sampled_from(["del", "pop", "remove", "clear", "sort", "reverse",
                              "slice_set", "slice_del", "imul"]))  # fmt: skip
    def list_change(self, data: st.DataObject, index: int, op: str) -> None:
        found = self.target(data, list)
        if not found:
            return
        mem, path = found
        proxy, model = walk(mem, path), walk(self.model, path)
        inside = -len(model) <= index < len(model)
        if op == "del" and inside:
            del proxy[index]
            del model[index]
        elif op == "pop" and inside:
            assert same(proxy.pop(index), model.pop(index))
        elif op == "remove" and model:
            value = copy.deepcopy(data.draw(st.sampled_from(model)))
            proxy.remove(value)
            model.remove(value)
        elif op == "clear":
            proxy.clear()
            model.clear()
        elif op == "sort":
            proxy.sort(key=repr, reverse=index > 0)
            model.sort(key=repr, reverse=index > 0)
        elif op == "reverse":
            proxy.reverse()
            model.reverse()
        elif op == "slice_set":
            new = data.draw(st.lists(values, max_size=3))
            proxy[index:] = new
            model[index:] = copy.deepcopy(new)
        elif op == "slice_del":
            del proxy[:index:2]
            del model[:index:2]
        elif op == "imul":
            times = abs(index) % 3
            holder = walk(mem, path[:-1])
            holder[path[-1]] *= times
            model[:] = [copy.deepcopy(x) for x in model * times]

    @rule(data=st.data(), elements=st.sets(st.text(max_size=2), max_size=3),
          op=st.sampled_from(["add", "discard", "remove", "pop", "clear", "update", "ior", "iand", "isub", "ixor",
                              "difference_update", "intersection_update", "symmetric_difference_update"]))  # fmt: skip
    def set_change(self, data: st.DataObject, elements: set[str], op: str) -> None:
        found = self.target(data, set)
        if not found:
            return
        mem, path = found
        proxy, model = walk(mem, path), walk(self.model, path)
        one = data.draw(st.sampled_from(sorted(model | elements))) if model | elements else "x"
        if op in ("add", "discard"):
            getattr(proxy, op)(one)
            getattr(model, op)(one)
        elif op == "remove":
            if one in model:
                proxy.remove(one)
                model.remove(one)
        elif op == "pop":
            if model:
                model.remove(proxy.pop())
        elif op == "clear":
            proxy.clear()
            model.clear()
        elif op in ("ior", "iand", "isub", "ixor"):
            getattr(proxy, f"__{op}__")(elements)
            getattr(model, f"__{op}__")(elements)
        else:
            getattr(proxy, op)(elements)
            getattr(model, op)(elements)

    @invariant()
    def all_memories_match_the_model(self) -> None:
        fresh = Replica(self.mems[0]._rm)
        fresh.load(self.client.hgetall(self.mems[0].key))
        online = self.mems if self.before_cut is None else self.mems[1:]
        for mem in online:
            assert same(mem.to_dict(), self.model if self.before_cut is None else self.before_cut)
            check_bookkeeping(mem._rm.replica.root, fresh.root)
        if self.before_cut is not None:
            assert same(self.mems[0].to_dict(), self.model)


def seeded_writer(url: str, requests: Connection) -> None:
    """In a process of its own: set ``walk(mem, path)[key] = value`` (no path: ``mem[name] = {key: value}``)."""
    mem = Memory("sm", url=url)
    while True:
        request = requests.recv()
        if request is None:
            mem.close()
            return
        path, name, key, value = request
        try:
            if path:
                walk(mem, path)[key] = value
            else:
                mem[name] = {key: value}
            requests.send("ok")
        except Exception as exc:  # reported to the test, which fails on it
            requests.send(repr(exc))


def start_seeded_writers(url: str, seeds: list[int]) -> tuple[list[Connection], list[Any]]:
    connections, processes = [], []
    for seed in seeds:
        mine, theirs = spawn.Pipe()
        old = os.environ.get("PYTHONHASHSEED")
        os.environ["PYTHONHASHSEED"] = str(seed)  # read by the child's interpreter as it starts
        try:
            process = spawn.Process(target=seeded_writer, args=(url, theirs), daemon=True)
            process.start()
        finally:
            if old is None:
                del os.environ["PYTHONHASHSEED"]
            else:
                os.environ["PYTHONHASHSEED"] = old
        connections.append(mine)
        processes.append(process)
    return connections, processes


@pytest.mark.parametrize("backend", ["fakeredis", "redis7", "valkey"], indirect=True)
def test_random_mutations_match_a_plain_model(
    client: redis.Redis, switch: Switch, servers: dict[str, Any], backend: str
) -> None:
    """Three memories on one id (the third tracked), driven through random mutations at random
    depths, always equal a plain Python model, and their replicas equal a
    fresh load down to node ids, births and counters. The first memory goes
    offline and comes back at random; its queued changes replay to the same
    state. Sets, tuples, frozensets, values near the depth limit and keys of
    every type are drawn; on real servers, processes with other hash seeds
    set dict keys too; and the server comes back from an older snapshot."""
    MemoryMachine.client = client
    MemoryMachine.switch = switch
    MemoryMachine.runs = 0
    MemoryMachine.hits = {}
    processes: list[Any] = []
    MemoryMachine.seeded = []
    if backend != "fakeredis":
        MemoryMachine.seeded, processes = start_seeded_writers(servers[backend].url, [1, 2])
    try:
        MemoryMachine.TestCase().runTest()
    finally:
        for connection in MemoryMachine.seeded:
            connection.send(None)
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
        MemoryMachine.seeded = []
    assert MemoryMachine.runs >= settings.default.max_examples
    assert MemoryMachine.hits.get("rollback", 0) > 0
    if backend != "fakeredis":
        assert MemoryMachine.hits.get("seeded", 0) > 0
