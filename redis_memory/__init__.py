"""Shared Python state in Redis: attributes, live lists and dicts, atomic operations."""

from ._version import __version__ as __version__
from .connection import Health, embedded_dir, ensure_embedded, health_check, stop_embedded
from .errors import (
    BatchIncomplete,
    ConcurrentModification,
    ConnectionFailed,
    ContainerDeleted,
    CorruptData,
    EmbeddedServerError,
    InsideBatch,
    InvalidExport,
    MemoryClosed,
    MissingAttribute,
    MissingKey,
    OfflineQueueFull,
    PrivateMemory,
    RedisMemoryError,
    ReservedName,
    ServerRefused,
    UnsupportedPlatform,
    UnsupportedValue,
    UnusableClient,
)
from .feed import Event, Feed, Subscription
from .memory import ConversationMemory, Memory, Metadata, Stats, keep_memories
from .proxies import ObservedDict, ObservedList, ObservedSet
from .queue import Status
from .session import AgentMemory, Session, SessionMemory
from .window import TokenCounter, fit_messages, message_tokens, token_counter

__all__ = [
    "AgentMemory",
    "BatchIncomplete",
    "ConcurrentModification",
    "ConnectionFailed",
    "ContainerDeleted",
    "ConversationMemory",
    "CorruptData",
    "EmbeddedServerError",
    "Event",
    "Feed",
    "Health",
    "InsideBatch",
    "InvalidExport",
    "Memory",
    "MemoryClosed",
    "Metadata",
    "MissingAttribute",
    "MissingKey",
    "ObservedDict",
    "ObservedList",
    "ObservedSet",
    "OfflineQueueFull",
    "PrivateMemory",
    "RedisMemoryError",
    "ReservedName",
    "ServerRefused",
    "Session",
    "SessionMemory",
    "Stats",
    "Status",
    "Subscription",
    "TokenCounter",
    "UnsupportedPlatform",
    "UnsupportedValue",
    "UnusableClient",
    "embedded_dir",
    "ensure_embedded",
    "fit_messages",
    "health_check",
    "keep_memories",
    "message_tokens",
    "stop_embedded",
    "token_counter",
]
