"""ConversationMemory.add_message: dicts, OpenAI SDK objects and LangChain messages, stored as OpenAI-style dicts."""

from __future__ import annotations

import logging
import time

import pytest
import redis
from conftest import Switch
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from openai.types.chat import ChatCompletionMessage

from redis_memory import ConversationMemory, UnsupportedValue, store


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


def test_a_message_after_the_link_is_back_goes_to_the_list_made_offline(switch: Switch, client: redis.Redis) -> None:
    """The messages list made offline gets the server's id on the replay that the next add_message runs first."""
    chat = ConversationMemory("back", client=switch.client())
    chat.title = "t"
    switch.cut()
    chat.add_message({"role": "user", "content": "offline"})
    with chat._rm.lock:  # this thread goes first, before the reconnect thread replays the queue
        switch.restore()
        deadline = time.monotonic() + 10
        while not chat._rm.link.online and time.monotonic() < deadline:
            time.sleep(0.01)
        chat.add_message({"role": "user", "content": "online"})
    assert chat.flush(timeout=10) is True
    assert [m["content"] for m in ConversationMemory("back", client=client).messages] == ["offline", "online"]


def test_messages_queued_on_no_conversation_go_to_the_one_another_writer_created(
    switch: Switch, client: redis.Redis
) -> None:
    """Offline on a conversation nobody had started, while another process starts it: both keep their messages."""
    chat = ConversationMemory("started", client=switch.client())
    chat.to_dict()  # loaded: there is no such conversation yet
    switch.cut()
    chat.add_message({"role": "user", "content": "h1"})
    chat.add_message({"role": "user", "content": "h2"})
    ConversationMemory("started", client=client).add_message({"role": "system", "content": "S"})
    switch.restore()
    assert chat.flush(timeout=10) is True and chat.status().dropped == 0
    assert [m["content"] for m in ConversationMemory("started", client=client).messages] == ["S", "h1", "h2"]


def test_messages_with_no_list_to_go_to_are_dropped_after_one_look(
    switch: Switch, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queued messages whose list was replaced by something else: the replay reads the memory once, not per message."""
    chat = ConversationMemory("nowhere", client=switch.client())
    other = ConversationMemory("nowhere", client=client)
    chat.add_message({"role": "user", "content": "first"})
    switch.cut()
    for i in range(40):
        chat.add_message({"role": "user", "content": f"q{i}"})
    other.messages = "not a list"
    reads = []
    real = store.Store.read_all
    monkeypatch.setattr(store.Store, "read_all", lambda self: reads.append(1) or real(self))
    switch.restore()
    assert chat.flush(timeout=10) is False
    assert chat.status().dropped == 40 and other.messages == "not a list"
    assert len(reads) <= 3  # the look for a list, and the replica's reload after the replay
