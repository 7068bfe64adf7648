"""Redis Cluster: the library's commands, each sent to the node that serves its key.

A memory's keys share one hash tag, so every command the library sends
about a memory goes to one slot, and each slot is served by one master. A
:class:`ClusterChannel` keeps the slot table (from ``CLUSTER SLOTS``) and one
lean :class:`~redis_memory.connection.Channel` per node, and routes each
command by the slot of the key it names:

* ``MOVED <slot> <node>``: the slot now lives elsewhere (a resharding, a
  failover). The command goes there, and the table is read again before
  the next command.
* ``ASK <slot> <node>``: the slot is being migrated and this key already
  left; the command goes to the target, preceded by ``ASKING``, and the
  table stays as it is.
* ``TRYAGAIN``: some keys of a multi-key command moved and others not yet,
  during a migration: the command is sent again after a short pause.
* A node that cannot be reached (a master killed, before its replica took
  over): ConnectionFailed, as for a single server, and the table is read
  again before the next command; a memory's change is queued with its
  operation id meanwhile and replayed once the slot has a master again.

A command that names no key (the reconnect probe's ``PING``) reads the
table and PINGs every master: the cluster counts as reachable when every
slot's master answers.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from .connection import CONNECT_TIMEOUT, Channel, check_reply, deadline, own_settings, subscriber_client
from .errors import ConnectionFailed
from .resp import resp_command

SLOTS = 16384
#: Redirections followed for one command before giving up (ConnectionFailed).
MAX_REDIRECTS = 16
#: Pause before a command answered TRYAGAIN is sent again (seconds).
TRYAGAIN_DELAY = 0.01
_ASKING = resp_command(("ASKING",))
Address = tuple[str, int]


@functools.lru_cache(maxsize=65536)
def slot_of(key: str) -> int:
    """The cluster slot of ``key`` (CRC16 of its hash tag, or of the whole key)."""
    return int(key_slot(key.encode()))


class ClusterChannel:
    """The library's commands on a Redis Cluster, routed by key; the same interface as a Channel.

    ``seeds`` are the nodes to ask for the slot table first; nodes the table
    names are reached with ``connection_kwargs`` (credentials, TLS,
    timeouts), their host and port replaced.
    """

    cluster = True

    def __init__(
        self,
        connection_class: type[Any],
        connection_kwargs: dict[str, Any],
        seeds: list[Address],
        remap: Callable[[Address], Address] | None = None,
    ) -> None:
        self.connection_class = connection_class
        #: How to reach an address the cluster announces (RedisCluster's address_remap: NAT, proxies).
        self.remap = remap or (lambda address: address)
        self.connection_kwargs = {k: v for k, v in connection_kwargs.items() if k not in ("host", "port")}
        self.seeds = list(seeds)
        #: Whether the nodes' connections speak RESP3 (what a connection of these settings would say).
        protocol = self.connection_kwargs.get("protocol")
        if protocol is None:
            with contextlib.suppress(Exception):  # nothing connects here
                protocol = getattr(connection_class(**self.connection_kwargs), "protocol", 3)
        self.resp3 = str(protocol or 3) == "3"
        self.nodes: dict[Address, Channel] = {}
        self.slots: list[Address | None] = [None] * SLOTS
        self.masters: list[Address] = []
        self.stale = True
        self.lock = threading.Lock()
        #: Whether the cluster is reachable (a queue.Link, made by the first memory on it).
        self.link: Any = None

    @classmethod
    def of(cls, client: RedisCluster) -> ClusterChannel:
        """A channel on the cluster ``client`` knows, with the settings of its node connections."""
        nodes = client.get_nodes()  # type: ignore[no-untyped-call]
        pool = client.get_redis_connection(nodes[0]).connection_pool
        remap = client.nodes_manager.address_remap
        return cls(
            pool.connection_class,
            _unbound(pool.connection_kwargs, client),
            [(n.host, int(n.port)) for n in nodes],
            remap,
        )

    def connect_timeout(self) -> float:
        configured = self.connection_kwargs.get("socket_connect_timeout")
        return float(configured) if configured else CONNECT_TIMEOUT

    def is_cluster(self) -> bool:
        return True

    def drivable(self) -> bool:
        """Never: routing may wait (TRYAGAIN, a slot table to read), so async calls go to their worker."""
        return False

    def node(self, address: Address) -> Channel:
        """The channel of the node at ``address`` (made on first use)."""
        found = self.nodes.get(address)
        if found is not None:
            return found
        with self.lock:
            found = self.nodes.get(address)
            if found is None:
                kwargs = dict(self.connection_kwargs, host=address[0], port=address[1])
                found = self.nodes[address] = Channel(self.connection_class, kwargs, detect=False)
            return found

    def refresh(self) -> None:
        """Read the slot table (CLUSTER SLOTS) from the first node that answers: masters first, then seeds."""
        tried: list[Address] = []
        error: Exception | None = None
        for address in [*self.masters, *self.seeds, *list(self.nodes)]:
            if address in tried:
                continue
            tried.append(address)
            try:
                with deadline(self.connect_timeout()):
                    table = self.node(address).call(b"CLUSTER", b"SLOTS")
            except (ConnectionFailed, redis.ResponseError) as exc:
                error = exc
                continue
            try:
                self._load(address, table)
            except (IndexError, TypeError, ValueError, AttributeError, UnicodeDecodeError):
                # No slot table Redis sends: the connection is out of step, or not Redis.
                self.node(address).close()
                error = ConnectionFailed(f"{address[0]}:{address[1]} answered CLUSTER SLOTS with {table!r:.60}")
                continue
            return
        raise ConnectionFailed(f"no node of the cluster answered: {error}")

    def _load(self, asked: Address, table: Any) -> None:
        slots: list[Address | None] = [None] * SLOTS
        masters: list[Address] = []
        for entry in table:
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            # An empty host (or "?") means: the address this reply came from.
            address = self.remap((host if host and host != "?" else asked[0], int(master[1])))
            if address not in masters:
                masters.append(address)
            for slot in range(start, end + 1):
                slots[slot] = address
        with self.lock:
            self.slots, self.masters, self.stale = slots, masters, False
            if asked not in self.seeds:
                self.seeds.append(asked)

    def owner(self, slot: int) -> Address:
        """The master serving ``slot``, reading the table first if it may be out of date."""
        if self.stale:
            self.refresh()
        found = self.slots[slot]
        if found is None:
            self.refresh()
            found = self.slots[slot]
            if found is None:
                raise ConnectionFailed(f"no master serves cluster slot {slot}")
        return found

    def call(self, *args: bytes | str | int) -> object:
        return self.call_packed(resp_command(args))

    def call_packed(self, packed: bytes, key: str | None = None, replies: int = 1, on_first: Any = None) -> Any:
        """Send ``packed`` (``replies`` commands, all about ``key``) to the node serving ``key``; see the module.

        ``on_first`` is for a tracked connection, which a cluster's are not: unused.
        """
        if key is None:
            return self._everywhere(packed, replies)
        slot = slot_of(key)
        asking: Address | None = None
        for _ in range(MAX_REDIRECTS):
            address = asking or self.owner(slot)
            node = self.node(address)
            try:
                if asking is not None:
                    found, resent = node.exchange(_ASKING + packed, replies + 1)
                    found = found[1:]
                else:
                    found, resent = node.exchange(packed, replies)
            except ConnectionFailed:
                self.stale = True
                raise
            asking = None
            redirect = next((r for r in found if _redirect(r)), None)
            if redirect is None:
                try:
                    if replies == 1:
                        return check_reply(found[0], resent, node)
                    return [check_reply(reply, resent, node) for reply in found]
                except ConnectionFailed:  # CLUSTERDOWN, or a master turned replica
                    self.stale = True
                    raise
            kind, _, rest = str(redirect).partition(" ")
            if kind == "TRYAGAIN":
                time.sleep(TRYAGAIN_DELAY)
                continue
            target = self._address(rest.split(" ")[-1], address)
            if kind == "MOVED":
                with self.lock:
                    self.slots[slot] = target
                self.stale = True  # a resharding or failover moves more than one slot
            else:
                asking = target
        raise ConnectionFailed(f"cluster slot {slot} was redirected {MAX_REDIRECTS} times; giving up")

    def _everywhere(self, packed: bytes, replies: int) -> Any:
        """``packed`` on every master (the reconnect probe); the first master's reply."""
        self.refresh()
        if any(owner is None for owner in self.slots):
            raise ConnectionFailed("some cluster slots have no master")
        results = [self.node(address).call_packed(packed, None, replies) for address in list(self.masters)]
        return results[0]

    def _address(self, text: str, asked: Address) -> Address:
        """The node a redirection names (``host:port``; an empty host is the node that answered)."""
        host, _, port = text.rpartition(":")
        return self.remap((host, int(port))) if host else (asked[0], int(port))

    def subscriber(self, key: str) -> redis.Redis:
        """A redis-py client of the master serving ``key`` now (the table read first), for SSUBSCRIBE."""
        self.refresh()
        node = self.node(self.owner(slot_of(key)))
        return subscriber_client(node.connection_class, node.connection_kwargs)

    def close(self, blocking: bool = True) -> None:
        for node in list(self.nodes.values()):
            node.close(blocking)

    def after_fork(self) -> None:
        self.lock = threading.Lock()
        for node in self.nodes.values():
            node.after_fork()


def _unbound(kwargs: dict[str, Any], client: RedisCluster) -> dict[str, Any]:
    """A cluster client's node connection settings without what refers back to the client.

    A memory kept for reuse holds its channel; were the channel to hold the
    client, the memory would keep a client its program let go of alive. The
    channel's connections only speak to masters, so the client's connect
    hook (READONLY for replica reads) is replaced by the plain handshake, followed
    by the user's own hook, if there is one.
    """
    unbound = {k: v for k, v in own_settings(kwargs).items() if k != "redis_connect_func"}
    user_hook = getattr(client, "user_on_connect_func", None)
    if user_hook is not None:

        def connected(connection: Any) -> None:
            connection.on_connect()
            user_hook(connection)

        unbound["redis_connect_func"] = connected
    return unbound


def _redirect(reply: object) -> bool:
    return isinstance(reply, redis.ResponseError) and str(reply).startswith(("MOVED ", "ASK ", "TRYAGAIN"))
