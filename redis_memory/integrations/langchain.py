"""LangChain: :class:`ChatMessageHistory`, a ``BaseChatMessageHistory`` kept in a conversation's ``messages``.

Messages are stored as OpenAI-style dicts (tool calls and tool results
included), so ``ConversationMemory(conversation_id).messages`` shows the
same history to code that does not use LangChain. Needs the extra:
``pip install 'redis-memory[langchain]'``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, cast

from ..aio import AsyncConversationMemory
from ..errors import MissingAttribute, MissingExtra
from ..memory import ConversationMemory
from ..proxies import plain

try:
    from langchain_core.chat_history import BaseChatMessageHistory
    from langchain_core.messages import BaseMessage, convert_to_messages
except ImportError as exc:  # pragma: no cover - exercised with the extra missing
    raise MissingExtra(
        "redis_memory.integrations.langchain needs LangChain: pip install 'redis-memory[langchain]'"
    ) from exc

__all__ = ["ChatMessageHistory"]


def _stored(memory: ConversationMemory) -> list[dict[str, Any]]:
    """A plain copy of the fresh ``messages`` (none yet: empty)."""
    try:
        return cast(list[dict[str, Any]], plain(memory.messages))
    except MissingAttribute:
        return []


class ChatMessageHistory(BaseChatMessageHistory):
    """The chat history of conversation ``conversation_id``, in Redis; options as for ``ConversationMemory``.

    Sync methods (``messages``, ``add_messages``, ``clear``) wait for the
    memory's worker thread; the async ones (``aget_messages``,
    ``aadd_messages``, ``aclear``) are the async memory's awaited calls,
    never blocking the loop. Each read is one version check while nothing
    changed; each add is one FCALL. ``close()`` / ``await aclose()`` end
    the worker thread.
    """

    def __init__(self, conversation_id: str, **memory_options: Any) -> None:
        self.conversation_id = conversation_id
        self.memory = AsyncConversationMemory(conversation_id, **memory_options)

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """The whole history, fresh, as LangChain messages."""
        return convert_to_messages(self.memory.run_sync(_stored))

    async def aget_messages(self) -> list[BaseMessage]:
        """The whole history, fresh, awaited."""
        return convert_to_messages(await self.memory.run(_stored))

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append ``messages``, in one atomic FCALL."""
        items = list(messages)
        self.memory.run_sync(lambda memory: memory.add_messages(items))

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append ``messages``, in one atomic FCALL, awaited."""
        await self.memory.add_messages(messages)

    def clear(self) -> None:
        """Remove every message (the conversation's other attributes stay)."""
        self.memory.run_sync(_clear)

    async def aclear(self) -> None:
        """Remove every message, awaited."""
        await self.memory.run(_clear)

    def close(self) -> None:
        """Close the memory and end its worker thread."""
        self.memory.close_sync()

    async def aclose(self) -> None:
        """Close the memory and end its worker thread, awaited."""
        await self.memory.close()

    def __enter__(self) -> ChatMessageHistory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clear(memory: ConversationMemory) -> None:
    with contextlib.suppress(MissingAttribute):
        memory.messages.clear()
