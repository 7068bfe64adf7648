"""A LangChain chain with a message history in redis_memory and a fake model, shared by tests and their processes."""

from __future__ import annotations

from typing import Any

from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import RunnableLambda
from langchain_core.runnables.history import RunnableWithMessageHistory

from redis_memory.integrations.langchain import ChatMessageHistory


def history_chain(
    url: str, replies: list[str]
) -> tuple[RunnableWithMessageHistory, dict[str, ChatMessageHistory], list[int]]:
    """prompt (history + question) | a fake model answering ``replies`` in turn; ``seen``: messages per prompt."""
    histories: dict[str, ChatMessageHistory] = {}
    seen: list[int] = []

    def history(session_id: str) -> ChatMessageHistory:
        if session_id not in histories:
            histories[session_id] = ChatMessageHistory(session_id, url=url)
        return histories[session_id]

    def count(prompt: Any) -> Any:
        seen.append(len(prompt.to_messages()))
        return prompt

    prompt = ChatPromptTemplate.from_messages([MessagesPlaceholder("history"), ("human", "{question}")])
    model = FakeListChatModel(responses=replies)
    chain = RunnableWithMessageHistory(
        prompt | RunnableLambda(count) | model,
        history,
        input_messages_key="question",
        history_messages_key="history",
    )
    return chain, histories, seen
