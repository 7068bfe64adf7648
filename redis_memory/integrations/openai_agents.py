"""OpenAI Agents SDK: :class:`AgentsSession`, a session (the SDK's ``Session`` protocol) kept in a conversation.

Items are stored in the conversation's ``messages`` list, as the SDK gives
them (the Responses API's input items: plain dicts), so
``ConversationMemory(session_id).messages`` is the same history. Needs the
extra: ``pip install 'redis-memory[openai-agents]'``.
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

from ..aio import AsyncConversationMemory
from ..errors import MissingAttribute, MissingExtra
from ..memory import ConversationMemory
from ..proxies import plain

try:
    from agents.memory.session_settings import SessionSettings, coerce_session_settings, resolve_session_limit
except ImportError as exc:  # pragma: no cover - exercised with the extra missing
    raise MissingExtra(
        "redis_memory.integrations.openai_agents needs the Agents SDK: pip install 'redis-memory[openai-agents]'"
    ) from exc

__all__ = ["AgentsSession"]

Item = dict[str, Any]


class AgentsSession:
    """The Agents SDK session ``session_id``, in Redis; other options as for ``ConversationMemory``.

    ``Runner.run(agent, input, session=AgentsSession(session_id))``. Every
    call is an awaited call of an async memory, never blocking the loop.
    ``get_items(limit)`` makes the local replica fresh (one version check,
    a journal delta if others wrote) and copies only the newest ``limit``
    items from it; ``add_items`` is one atomic FCALL, ``pop_item`` one more.
    ``session_settings`` (``SessionSettings(limit=...)``) gives the default
    limit. ``await session.close()`` ends the worker thread.
    """

    def __init__(
        self,
        session_id: str,
        *,
        session_settings: SessionSettings | dict[str, Any] | None = None,
        **memory_options: Any,
    ) -> None:
        self.session_id = session_id
        self.session_settings: SessionSettings | None = (
            coerce_session_settings(session_settings) if session_settings is not None else None
        )
        self.memory = AsyncConversationMemory(session_id, **memory_options)

    async def get_items(self, limit: int | None = None) -> list[Item]:
        """The newest ``limit`` items in order (None: the settings' limit, else all; 0: none; negative: all)."""
        wanted = resolve_session_limit(limit, self.session_settings)

        def newest(memory: ConversationMemory) -> list[Item]:
            try:
                items = memory.messages
            except MissingAttribute:
                return []
            if wanted is not None and wanted >= 0:
                items = items[len(items) - wanted :] if wanted else []
            return cast(list[Item], plain(list(items)))

        return await self.memory.run(newest)

    async def add_items(self, items: list[Any]) -> None:
        """Append ``items`` in order, in one atomic FCALL."""
        if items:
            await self.memory.add_messages(items)

    async def pop_item(self) -> Item | None:
        """Remove and return the newest item, None if there is none."""

        def pop(memory: ConversationMemory) -> Item | None:
            try:
                items = memory.messages
            except MissingAttribute:
                return None
            return cast(Item, plain(items.pop())) if items else None

        return await self.memory.run(pop)

    async def clear_session(self) -> None:
        """Remove every item (the conversation's other attributes stay)."""

        def clear(memory: ConversationMemory) -> None:
            with contextlib.suppress(MissingAttribute):
                memory.messages.clear()

        await self.memory.run(clear)

    async def close(self) -> None:
        """Close the memory and end its worker thread."""
        await self.memory.close()

    async def __aenter__(self) -> AgentsSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
