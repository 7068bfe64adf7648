"""LangChain: ChatMessageHistory keeps a conversation's messages as OpenAI-style dicts, shared with other code."""

from __future__ import annotations

import asyncio
import multiprocessing

import pytest
import redis
from chains import history_chain
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from workers import langchain_turns

from redis_memory import ConversationMemory
from redis_memory.integrations.langchain import ChatMessageHistory


@pytest.mark.filterwarnings("ignore:RunnableWithMessageHistory is deprecated")
def test_runnable_with_message_history_over_three_turns_in_two_processes(real_url: str) -> None:
    """Turns 1 and 2 in a child process (sync invoke), turn 3 here (ainvoke): one history, seen by plain code."""
    ctx = multiprocessing.get_context("spawn")
    seen = ctx.Queue()
    child = ctx.Process(target=langchain_turns, args=(real_url, "lc-1", ["q1", "q2"], ["a1", "a2"], seen))
    child.start()
    child.join(120)
    assert child.exitcode == 0
    assert seen.get(timeout=5) == [1, 3]  # the second turn's prompt held the first turn

    chain, histories, counts = history_chain(real_url, ["a3"])

    async def third_turn() -> str:
        reply = await chain.ainvoke({"question": "q3"}, config={"configurable": {"session_id": "lc-1"}})
        for history in histories.values():
            await history.aclose()
        return str(reply.content)

    assert asyncio.run(third_turn()) == "a3"
    assert counts == [5]
    expected = [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"},
    ]  # fmt: skip
    assert ConversationMemory("lc-1", url=real_url).messages == expected
    with ChatMessageHistory("lc-1", url=real_url) as again:
        assert [m.content for m in again.messages] == ["q1", "a1", "q2", "a2", "q3", "a3"]


def test_tool_calls_and_results_round_trip(client: redis.Redis) -> None:
    """An AIMessage's tool calls and the ToolMessage answering them come back as they went in."""
    call = AIMessage(content="", tool_calls=[{"name": "weather", "args": {"city": "Paris"}, "id": "call_1"}])
    result = ToolMessage(content="sunny", tool_call_id="call_1")
    with ChatMessageHistory("tools", client=client) as history:
        history.add_messages([HumanMessage("weather in Paris?"), call, result])
    with ChatMessageHistory("tools", client=client) as history:
        human, call_back, result_back = history.messages
    assert human.content == "weather in Paris?"
    assert isinstance(call_back, AIMessage) and call_back.tool_calls == [
        {"name": "weather", "args": {"city": "Paris"}, "id": "call_1", "type": "tool_call"}
    ]
    assert isinstance(result_back, ToolMessage) and result_back.tool_call_id == "call_1"
    assert result_back.content == "sunny"


def test_async_methods_and_clear(client: redis.Redis) -> None:
    """aadd_messages, aget_messages and aclear; clear leaves the conversation's other attributes."""

    async def scenario() -> None:
        history = ChatMessageHistory("async-lc", client=client)
        assert await history.aget_messages() == []
        await history.aadd_messages([HumanMessage("hi"), AIMessage("hello")])
        assert [m.content for m in await history.aget_messages()] == ["hi", "hello"]
        other = ConversationMemory("async-lc", client=client)
        other.topic = "greeting"
        await history.aclear()
        assert await history.aget_messages() == []
        await history.aclose()
        assert ConversationMemory("async-lc", client=client).to_dict() == {"messages": [], "topic": "greeting"}

    asyncio.run(scenario())
    with ChatMessageHistory("async-lc", client=client) as history:
        history.add_messages([HumanMessage("again")])
        history.clear()
        assert history.messages == []
