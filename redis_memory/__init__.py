"""Shared Python state in Redis: attributes, live lists and dicts, atomic operations."""

from .connection import embedded_dir, ensure_embedded, stop_embedded
from .errors import (
    ConcurrentModification,
    ConnectionFailed,
    ContainerDeleted,
    CorruptData,
    EmbeddedServerError,
    MissingAttribute,
    MissingKey,
    OfflineQueueFull,
    RedisMemoryError,
    ReservedName,
    UnsupportedValue,
)
from .memory import ConversationMemory, Memory
from .proxies import ObservedDict, ObservedList
from .queue import Status

__all__ = [
    "ConcurrentModification",
    "ConnectionFailed",
    "ContainerDeleted",
    "ConversationMemory",
    "CorruptData",
    "EmbeddedServerError",
    "Memory",
    "MissingAttribute",
    "MissingKey",
    "ObservedDict",
    "ObservedList",
    "OfflineQueueFull",
    "RedisMemoryError",
    "ReservedName",
    "Status",
    "UnsupportedValue",
    "embedded_dir",
    "ensure_embedded",
    "stop_embedded",
]
