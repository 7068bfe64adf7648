"""OpenAI Agents SDK: AgentsSession meets the SDK's Session protocol and behaves as its own SQLiteSession."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import redis
from agents import Agent, RunConfig, Runner, SQLiteSession
from agents.memory import Session, SessionSettings
from fake_agents_model import FakeModel

from redis_memory import ConversationMemory
from redis_memory.integrations.openai_agents import AgentsSession

NO_TRACING = RunConfig(tracing_disabled=True)


def test_runner_keeps_three_turns_and_the_next_run_sees_them(client: redis.Redis) -> None:
    """Runner.run over 3 turns with a fake model; a new session object on the same id gives the next run all of it."""

    async def scenario() -> None:
        model = FakeModel()
        agent = Agent(name="assistant", model=model)
        async with AgentsSession("agents-1", client=client) as session:
            assert isinstance(session, Session)
            for question in ("q1", "q2", "q3"):
                await Runner.run(agent, question, session=session, run_config=NO_TRACING)
        assert [len(given) for given in model.inputs] == [1, 3, 5]
        async with AgentsSession("agents-1", client=client) as later:
            result = await Runner.run(agent, "q4", session=later, run_config=NO_TRACING)
        assert result.final_output == "reply 4"
        seen = model.inputs[-1]
        assert [item.get("content") for item in seen[::2]] == ["q1", "q2", "q3", "q4"]
        assert [item["content"][0]["text"] for item in seen[1::2]] == ["reply 1", "reply 2", "reply 3"]
        stored = ConversationMemory("agents-1", client=client).messages
        assert stored[:-1] == seen and stored[-1]["content"][0]["text"] == "reply 4"

    asyncio.run(scenario())


async def _script(session: Any) -> list[Any]:
    """The same calls on any session; what each returned."""
    results: list[Any] = [await session.get_items(), await session.pop_item()]
    await session.add_items([{"role": "user", "content": f"m{i}"} for i in range(5)])
    await session.add_items([])
    await session.add_items([{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}])
    for limit in (None, 0, 1, 3, 100, -1):
        results.append(await session.get_items(limit))
    results.append(await session.pop_item())
    results.append(await session.pop_item())
    results.append(await session.get_items(2))
    await session.clear_session()
    results.append(await session.get_items())
    results.append(await session.pop_item())
    await session.add_items([{"role": "user", "content": "after clear"}])
    results.append(await session.get_items())
    return results


def test_same_calls_same_results_as_sqlite_session(client: redis.Redis, tmp_path: Path) -> None:
    """get_items(limit), pop_item, clear_session and session_settings answer as the SDK's SQLiteSession does."""

    async def scenario() -> None:
        for settings in (None, SessionSettings(limit=2)):
            reference = SQLiteSession("s", str(tmp_path / "ref.db"), session_settings=settings)
            expected = await _script(reference)
            reference.close()
            (tmp_path / "ref.db").unlink()
            async with AgentsSession("s", client=client, session_settings=settings) as ours:
                assert await _script(ours) == expected
                await ours.memory.delete()

    asyncio.run(scenario())
