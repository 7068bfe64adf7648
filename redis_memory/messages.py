"""Chat messages from other libraries, as the OpenAI-style dicts a conversation stores.

``ConversationMemory.add_message`` accepts a dict, a pydantic model (an
OpenAI SDK message object: stored as its ``model_dump(mode="json",
exclude_none=True)``, so the ``None`` fields the API would be sent back
are left out) or a LangChain message (converted by LangChain's own
``convert_to_openai_messages``). Neither library is imported here unless
such an object is passed.
"""

from __future__ import annotations

import sys
from typing import Any

from .errors import UnsupportedValue


def as_message(message: Any) -> dict[str, Any]:
    """``message`` as a plain OpenAI-style dict; UnsupportedValue for anything else."""
    if isinstance(message, dict):
        return dict(message)
    if _is_langchain_message(message):
        from langchain_core.messages import convert_to_openai_messages

        converted = convert_to_openai_messages(message)
        if isinstance(converted, dict):
            return converted
    dump = getattr(message, "model_dump", None)
    if callable(dump):
        dumped = dump(mode="json", exclude_none=True)
        if isinstance(dumped, dict):
            return dumped
    raise UnsupportedValue(
        f"a message is a dict, a pydantic model (an OpenAI SDK message) or a LangChain message, "
        f"not {type(message).__name__}"
    )


def _is_langchain_message(message: Any) -> bool:
    """True for a LangChain message; LangChain is loaded already if one exists in this process."""
    module = sys.modules.get("langchain_core.messages")
    return module is not None and isinstance(message, module.BaseMessage)
