"""The library's errors: one hierarchy rooted at :class:`RedisMemoryError`.

Each class also subclasses the builtin a user would naturally catch, and
carries the Redis ``key`` and hash ``field`` it concerns when there is one.
Connection trouble and corrupt data are never ``AttributeError``, so
``hasattr(mem, "x")`` cannot hide an outage.
"""

from __future__ import annotations

import copy


class RedisMemoryError(Exception):
    """Base of every error raised by redis_memory."""

    def __init__(self, message: str, *, key: str | None = None, field: bytes | str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.field = field


class ConnectionFailed(RedisMemoryError, ConnectionError):
    """Redis could not be reached or the connection broke during a command.

    Whether a command that got this was applied is not known. A memory's
    change never raises it for that reason: it is queued with its operation
    id and replayed, applied once whichever it was.
    """


class NotReplicated(ConnectionFailed):
    """A write was applied by its master, but fewer replicas than ``wait_for_replicas`` confirmed it in time.

    A failover may yet lose it, so the memory keeps it queued, with its
    operation id, and sends it again until enough replicas confirm it: the
    change itself never raises this; ``status().last_error`` shows it.
    """


class OfflineQueueFull(ConnectionFailed):
    """Redis is unreachable and the offline queue is full: the change was refused, nothing queued."""


class CorruptData(RedisMemoryError, ValueError):
    """A stored field could not be decoded; ``key`` and ``field`` say which."""


class UnusableClient(RedisMemoryError, ValueError):
    """A client the library cannot use (one that decodes replies, or not a ``redis.Redis``): refused at once."""


class UnsupportedValue(RedisMemoryError, TypeError):
    """A value (or dict key) of a type the codec cannot store."""


class ContainerDeleted(RedisMemoryError, LookupError):
    """The list or dict a proxy stands for was deleted, by this or another process."""


class ConcurrentModification(RedisMemoryError, RuntimeError):
    """A whole-container operation kept losing the race against other writers."""


class BatchIncomplete(RedisMemoryError, RuntimeError):
    """Some operations of a batch could not apply after another writer's change; the rest is in Redis.

    Not a ConcurrentModification (which means nothing was written): running
    the batch again would apply its other operations twice. ``failures``
    holds the error of each operation left out, in order.
    """

    def __init__(self, message: str, *, key: str | None = None, failures: list[RedisMemoryError] | None = None) -> None:
        super().__init__(message, key=key)
        self.failures = failures or []


class InsideBatch(RedisMemoryError, RuntimeError):
    """A call that reaches Redis at once (delete(), flush()) was made inside a batch of the same memory."""


class ReservedName(RedisMemoryError, ValueError):
    """An attribute name that belongs to the Memory object itself."""


class MissingAttribute(RedisMemoryError, AttributeError):
    """No value is stored under this attribute name."""


class MissingKey(RedisMemoryError, KeyError):
    """No value is stored under this item name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MemoryClosed(RedisMemoryError, ValueError):
    """The memory was closed (``close()`` or the end of its ``with`` block): open a new one to use it."""


class PrivateMemory(RedisMemoryError, PermissionError):
    """A session opened for one agent was asked for another agent's private memory."""


class ServerRefused(RedisMemoryError, RuntimeError):
    """Redis refused a command: out of memory (OOM), no permission (NOPERM), and the like.

    ``cause`` (``__cause__``) is redis-py's ``ResponseError``. Nothing was
    changed: raised only for a command known not to have been applied (not
    for a resend, nor for BUSY, whose outcome is unknown: see ConnectionFailed).
    """


class EmbeddedServerError(RedisMemoryError, RuntimeError):
    """The embedded server could not be found or started."""


class WrongThread(RedisMemoryError, RuntimeError):
    """A memory driven by an async memory (:mod:`redis_memory.aio`) was used outside the async memory's calls.

    Its changes reach Redis over the network, which must not block the
    event loop: make them with the async memory's awaited methods.
    """


class NotLoaded(RedisMemoryError, RuntimeError):
    """An async memory's local replica was read before it was ever loaded: ``await mem.refresh()`` first."""


class MissingExtra(RedisMemoryError, ImportError):
    """An integration's framework is not installed: the message names the extra that installs it."""


class UnsupportedPlatform(RedisMemoryError, NotImplementedError):
    """A feature this operating system cannot give: ``spool=`` needs POSIX file locks (``fcntl``)."""


class InvalidExport(RedisMemoryError, ValueError):
    """A file given to import is not an export document, or holds a value that cannot be stored: nothing written."""


def kept(error: Exception) -> Exception:
    """A copy of ``error`` to keep as a last error: without its traceback and causes.

    A traceback holds every frame the error passed through, and each frame
    its callers' frames: kept, it would keep memories alive that their users
    have let go of (and with them the reconnect thread). An error kept to be
    raised again is raised as a copy too, for the same reason.
    """
    try:
        found = copy.copy(error)
    except Exception:  # an exception type that cannot be rebuilt from its args
        found = ConnectionFailed(str(error))
    found.__traceback__ = None
    found.__cause__ = found.__context__ = None
    return found
