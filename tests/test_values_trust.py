"""Values a memory can be trusted with: nesting depth, canonical dict keys, tuples."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from redis_memory import ConversationMemory, Memory, UnsupportedValue


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
