"""ConversationMemory.add_message: dicts, OpenAI SDK objects and LangChain messages, stored as OpenAI-style dicts."""

from __future__ import annotations

import logging

import pytest
import redis
from conftest import Switch
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from openai.types.chat import ChatCompletionMessage

from redis_memory import ConversationMemory, UnsupportedValue


def test_sdk_objects_are_stored_without_their_none_fields(client: redis.Redis) -> None:
    """An OpenAI SDK reply is stored as its model_dump(exclude_none=True): no None field goes back to the API."""
    chat = ConversationMemory("sdk", client=client)
    chat.add_message({"role": "user", "content": "What's the weather?"})
    reply = ChatCompletionMessage(role="assistant", content="Sunny.")
    chat.add_message(reply)
    stored = ConversationMemory("sdk", client=client).messages
    assert stored == [{"role": "user", "content": "What's the weather?"}, {"role": "assistant", "content": "Sunny."}]
    assert None not in stored[1].values()


def test_langchain_messages_keep_tool_calls_and_results(client: redis.Redis) -> None:
    """A LangChain AIMessage's tool calls and the ToolMessage answering them are stored in OpenAI's shape."""
    chat = ConversationMemory("lc", client=client)
    chat.add_messages([
        HumanMessage("weather in Paris?"),
        AIMessage(content="", tool_calls=[{"name": "weather", "args": {"city": "Paris"}, "id": "call_1"}]),
        ToolMessage(content="sunny", tool_call_id="call_1"),
    ])  # fmt: skip
    user, call, result = ConversationMemory("lc", client=client).messages
    assert user == {"role": "user", "content": "weather in Paris?"}
    assert call["role"] == "assistant"
    assert call["tool_calls"] == [
        {"type": "function", "id": "call_1", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    ]
    assert result == {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}


def test_anything_else_is_refused_and_nothing_is_stored(client: redis.Redis) -> None:
    """A message of another type raises UnsupportedValue before anything is written."""
    chat = ConversationMemory("bad", client=client)
    chat.add_message({"role": "user", "content": "kept"})
    with pytest.raises(UnsupportedValue):
        chat.add_messages([{"role": "user", "content": "not this either"}, object()])
    assert ConversationMemory("bad", client=client).messages == [{"role": "user", "content": "kept"}]


def test_two_writers_starting_a_conversation_both_keep_their_message(
    client: redis.Redis, other_client: redis.Redis
) -> None:
    """The list is made by a setdefault: two memories that both saw no messages never overwrite each other."""
    first, second = ConversationMemory("new", client=client), ConversationMemory("new", client=other_client)
    assert first.to_dict() == second.to_dict() == {}
    first.add_message({"role": "user", "content": "one"})
    second.add_message({"role": "user", "content": "two"})
    assert [m["content"] for m in ConversationMemory("new", client=client).messages] == ["one", "two"]


def test_a_message_goes_to_the_list_another_writer_put_in_place(client: redis.Redis, other_client: redis.Redis) -> None:
    """add_message appends to the conversation's messages as they are now, not to a list another writer replaced."""
    reader, writer = ConversationMemory("moved", client=client), ConversationMemory("moved", client=other_client)
    writer.messages = [{"role": "user", "content": "old"}]
    assert len(reader.messages) == 1  # the reader holds the first list
    writer.messages = [{"role": "system", "content": "started over"}]
    reader.add_message({"role": "user", "content": "one"})
    writer.messages = []
    reader.add_messages([{"role": "user", "content": "two"}, {"role": "user", "content": "three"}])
    expected = [{"role": "user", "content": "two"}, {"role": "user", "content": "three"}]
    assert writer.messages == reader.messages == expected
    writer.messages = [{"role": "user", "content": "again"}]
    writer.title = "moved on"
    reader.add_message({"role": "user", "content": "four"})
    assert [m["content"] for m in ConversationMemory("moved", client=client).messages] == ["again", "four"]


def test_a_message_queued_offline_goes_to_the_list_put_in_place_meanwhile(
    switch: Switch, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """add_message made offline lands in the messages there at the replay, even if another writer replaced them.

    Online it would go to the list there now; so it does when replayed. A
    held list's append stays tied to that list, and is dropped (reported)
    with it; so is a message whose conversation lost its messages altogether.
    """
    chat = ConversationMemory("offline", client=switch.client())
    other = ConversationMemory("offline", client=client)
    chat.add_message({"role": "user", "content": "first"})
    held = chat.messages
    switch.cut()
    chat.add_message({"role": "user", "content": "queued"})
    chat.add_messages([{"role": "user", "content": "two"}, {"role": "user", "content": "three"}])
    other.messages = [{"role": "system", "content": "started over"}]
    switch.restore()
    assert chat.flush(timeout=10) is True
    expected = ["started over", "queued", "two", "three"]
    assert [m["content"] for m in ConversationMemory("offline", client=client).messages] == expected
    assert [m["content"] for m in chat.messages] == expected
    assert chat.status().dropped == 0

    held = chat.messages
    switch.cut()
    held.append({"role": "user", "content": "to the old list"})
    chat.add_message({"role": "user", "content": "by name"})
    other.messages = []
    switch.restore()
    with caplog.at_level(logging.WARNING, logger="redis_memory"):
        assert chat.flush(timeout=10) is False  # the held list's append was dropped
    assert [m["content"] for m in other.messages] == ["by name"]
    assert chat.status().dropped == 1

    switch.cut()
    chat.add_message({"role": "user", "content": "nowhere to go"})
    del other.messages
    switch.restore()
    assert chat.flush(timeout=10) is False
    assert chat.status().dropped == 2 and "messages" not in other.to_dict()
