"""Values a memory can be trusted with: nesting depth, canonical dict keys, tuples."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from typing import Any

import pytest
import redis

from redis_memory import ConversationMemory, Memory, UnsupportedValue

PERMISSIONS = frozenset({"read", "write", "admin", "audit", "billing", "export"})
# Run in a child process with its own hash seed, so its frozensets iterate in another order.
SET_PERMISSION = """
import sys
from redis_memory import Memory
mem = Memory("acl", url=sys.argv[1])
mem.perms[frozenset({"read", "write", "admin", "audit", "billing", "export"})] = sys.argv[2]
print(list(frozenset({"read", "write", "admin", "audit", "billing", "export"})))
"""


@pytest.mark.parametrize(
    "value",
    [(1, [2]), (1, {"a": 1}), (1, {2}), ((1, (2, [3])),), [(1, [2])], {"k": (1, {2: 3})}],
    ids=["list", "dict", "set", "deep-list", "in-a-list", "in-a-dict"],
)
def test_a_tuple_holding_a_list_dict_or_set_is_refused_and_nothing_written(client: redis.Redis, value: Any) -> None:
    """A tuple holding a list, dict or set at any depth raises UnsupportedValue; nothing is stored."""
    mem = Memory("m", client=client)
    mem.t = (1, 2)
    before = client.hgetall(mem.key)
    with pytest.raises(UnsupportedValue):
        mem.t = value
    with pytest.raises(UnsupportedValue):
        mem.other = value
    assert client.hgetall(mem.key) == before
    assert mem.t == (1, 2) and Memory("m", client=client).to_dict() == {"t": (1, 2)}


def test_a_message_holding_such_a_tuple_is_refused(client: redis.Redis) -> None:
    """A list item's dict (stored whole) whose tuple holds a list is refused too; the list is unchanged."""
    chat = ConversationMemory("c", client=client)
    chat.messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(UnsupportedValue):
        chat.messages.append({"role": "tool", "args": (1, [2])})
    with pytest.raises(UnsupportedValue):
        chat.messages[0]["args"] = ("x", {"y": 1})
    assert ConversationMemory("c", client=client).messages == [{"role": "user", "content": "hi"}]
    chat.messages.append({"role": "tool", "args": (1, (2, "three"))})
    assert ConversationMemory("c", client=client).messages[-1]["args"] == (1, (2, "three"))


def test_equal_frozenset_keys_from_processes_with_other_hash_seeds_are_one_entry(real_url: str) -> None:
    """Processes whose frozensets iterate in different orders store one entry, which del and clear remove."""
    Memory("acl", url=real_url).perms = {}
    orders = set()
    for seed in (1, 2, 3):
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        done = subprocess.run(
            [sys.executable, "-c", SET_PERMISSION, real_url, f"seed {seed}"],
            env=env, capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        orders.add(done.stdout)
    assert len(orders) > 1  # the seeds did give different iteration orders
    reader = Memory("acl", url=real_url)
    assert reader.perms == {PERMISSIONS: "seed 3"} and len(reader.perms) == 1
    del reader.perms[PERMISSIONS]
    assert Memory("acl", url=real_url).perms == {}
    reader.perms[PERMISSIONS] = "again"
    reader.perms.clear()
    assert Memory("acl", url=real_url).perms == {}


@pytest.mark.parametrize(
    "key",
    [(1.0,), (True,), ("a", (2, 1.5)), frozenset({1.5}), frozenset({False}), dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
     (dt.datetime(2024, 1, 1, tzinfo=dt.UTC),)],
    ids=["float-in-tuple", "bool-in-tuple", "nested-float", "float-in-frozenset", "bool-in-frozenset", "aware",
         "aware-in-tuple"],
)  # fmt: skip
def test_keys_that_equal_other_keys_in_another_encoding_are_refused(client: redis.Redis, key: Any) -> None:
    """A key holding a float or bool ((1.0,) == (1,)), or an aware datetime, raises UnsupportedValue; nothing stored."""
    mem = Memory("m", client=client)
    mem.d = {(1,): "one"}
    with pytest.raises(UnsupportedValue):
        mem.d[key] = 1
    with pytest.raises(UnsupportedValue):
        mem.other = {key: 1}
    with pytest.raises(UnsupportedValue):
        mem.messages = [{key: 1}]  # a list item's dict, stored whole
    assert Memory("m", client=client).to_dict() == {"d": {(1,): "one"}}


def test_naive_datetimes_equal_but_for_fold_are_one_key(client: redis.Redis) -> None:
    """A naive datetime key with fold=1 is the same key as with fold=0, as in Python: one del removes it."""
    mem = Memory("m", client=client)
    when = dt.datetime(2024, 11, 3, 1, 30)
    mem.d = {when: 1, (when, "x"): 1}
    mem.d[when.replace(fold=1)] = 2
    mem.d[(when.replace(fold=1), "x")] = 2
    assert Memory("m", client=client).d == {when: 2, (when, "x"): 2}
    del mem.d[when]
    del mem.d[(when, "x")]
    assert Memory("m", client=client).d == {}
