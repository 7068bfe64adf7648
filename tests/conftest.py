"""Fixtures: every client test runs on fakeredis, Redis 7.0 and embedded Valkey."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from hypothesis import HealthCheck, settings
from netproxy import TcpProxy
from servers import ClusterServer, EmbeddedServer, RedisServer, debian_redis

settings.register_profile(
    "ci",
    max_examples=200,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=30, stateful_step_count=15, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BACKENDS = ["fakeredis", "redis7", "valkey", "cluster"]
REAL_BACKENDS = ["redis7", "valkey", "cluster"]
#: How long a library thread may take to end after its test.
THREAD_GRACE = 3.0


@pytest.fixture(autouse=True)
def no_library_thread_outlives_its_test() -> Iterator[None]:
    """Fails a test that leaves a library thread (its name starts with "redis_memory") running after it ends."""
    before = set(threading.enumerate())

    def left() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("redis_memory") and t not in before]

    yield
    deadline = time.monotonic() + THREAD_GRACE
    while left() and time.monotonic() < deadline:
        gc.collect()  # memories let go of, in reference cycles
        time.sleep(0.02)
    if left():
        pytest.fail(f"library threads outlived the test: {left()}")


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base: Path = tmp_path_factory.mktemp("servers")
    started: dict[str, Any] = {"fakeredis": fakeredis.FakeServer()}
    try:
        started["redis7"] = debian_redis(base / "redis7")
        started["valkey"] = EmbeddedServer(base / "valkey")
        started["cluster"] = ClusterServer(base / "cluster")
        yield started
    finally:
        for server in started.values():
            if isinstance(server, (RedisServer, EmbeddedServer, ClusterServer)):
                server.stop()


def make_client(servers: dict[str, Any], backend: str) -> Any:
    """A client of ``backend``: a redis.Redis, or for the cluster a redis.RedisCluster."""
    if backend == "fakeredis":
        return fakeredis.FakeRedis(server=servers["fakeredis"])
    if backend == "cluster":
        return servers["cluster"].client()
    return redis.Redis.from_url(servers[backend].url)


def twin(client: Any) -> Any:
    """A new client with ``client``'s settings (and so a channel of its own), of the same kind."""
    if isinstance(client, redis.RedisCluster):
        node = client.get_default_node()
        return redis.RedisCluster(host=node.host, port=node.port)
    return redis.Redis(connection_pool=client.connection_pool)


def everywhere(client: Any, *args: Any) -> None:
    """A command on the server, or on every node of a cluster (ACL SETUSER, CONFIG SET)."""
    if isinstance(client, redis.RedisCluster):
        client.execute_command(*args, target_nodes=redis.RedisCluster.ALL_NODES)
    else:
        client.execute_command(*args)


def all_keys(client: Any, pattern: str = "*") -> list[bytes]:
    """KEYS ``pattern`` on the server, or on every master of a cluster."""
    if isinstance(client, redis.RedisCluster):
        return list(client.keys(pattern, target_nodes=redis.RedisCluster.PRIMARIES))
    return list(client.keys(pattern))


def flush(servers: dict[str, Any], backend: str) -> None:
    """Empty every database of ``backend`` (of every master, on the cluster)."""
    if backend == "cluster":
        servers["cluster"].flushall()
    else:
        make_client(servers, backend).flushall()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def client(servers: dict[str, Any], backend: str) -> Iterator[redis.Redis]:
    """A client on a flushed server of each backend."""
    c = make_client(servers, backend)
    flush(servers, backend)
    yield c
    flush(servers, backend)


@pytest.fixture
def other_client(servers: dict[str, Any], backend: str, client: redis.Redis) -> redis.Redis:
    """A second, independent connection to the same server as ``client``."""
    return make_client(servers, backend)


@pytest.fixture(params=REAL_BACKENDS)
def real_url(request: pytest.FixtureRequest, servers: dict[str, Any]) -> Iterator[str]:
    """The URL of a flushed real server (for tests that use several processes)."""
    url: str = servers[request.param].url
    flush(servers, request.param)
    yield url
    flush(servers, request.param)


class Switch:
    """A client whose link to the server can be cut and restored, while others stay connected.

    Real servers are reached through a TCP proxy; for fakeredis, the client
    uses a second FakeServer sharing the first one's data, whose
    ``connected`` flag plays the cut cable.
    """

    def __init__(self, servers: dict[str, Any], backend: str) -> None:
        self.proxy: TcpProxy | None = None
        self.fake: fakeredis.FakeServer | None = None
        #: On the cluster, one proxy per node, and the client maps each node's address to its proxy.
        self.proxies: dict[int, TcpProxy] = {}
        if backend == "cluster":
            self.proxies = {node.port: TcpProxy(node.port) for node in servers["cluster"].nodes}
        elif backend == "fakeredis":
            main = servers["fakeredis"]
            self.fake = fakeredis.FakeServer()
            self.fake.dbs, self.fake.lock, self.fake.script_cache = main.dbs, main.lock, main.script_cache
        else:
            server = servers[backend]
            self.proxy = TcpProxy(server.socket_path if isinstance(server, EmbeddedServer) else server.port)

    def client(self, username: str | None = None, password: str | None = None) -> redis.Redis:
        """A new client (with a channel of its own) behind this switch, as ACL user ``username`` if given."""
        if self.fake is not None:
            return fakeredis.FakeRedis(server=self.fake)
        if self.proxies:
            proxies = self.proxies
            first = next(iter(proxies.values()))

            def through_proxy(address: tuple[str, int]) -> tuple[str, int]:
                found = proxies.get(address[1])
                return ("127.0.0.1", found.port) if found is not None else address

            return redis.RedisCluster(  # type: ignore[return-value]
                host="127.0.0.1", port=first.port, address_remap=through_proxy, socket_connect_timeout=2,
                username=username, password=password,
            )  # fmt: skip
        assert self.proxy is not None
        return redis.Redis.from_url(self.proxy.url, socket_connect_timeout=2, username=username, password=password)

    def cut(self) -> None:
        for proxy in self.proxies.values():
            proxy.cut()
        if self.fake is not None:
            self.fake.connected = False
        elif self.proxy is not None:
            self.proxy.cut()

    def silence(self, silent: bool = True) -> None:
        """Drop everything both ways without closing (a partition); real servers only."""
        for proxy in [*self.proxies.values(), *([self.proxy] if self.proxy else [])]:
            proxy.silence(silent)

    def inject(self, data: bytes) -> None:
        """Send ``data`` to every client behind the switch, as if from the server; real servers only."""
        for proxy in [*self.proxies.values(), *([self.proxy] if self.proxy else [])]:
            proxy.inject(data)

    def restore(self) -> None:
        for proxy in self.proxies.values():
            proxy.restore()
        if self.fake is not None:
            self.fake.connected = True
        elif self.proxy is not None:
            self.proxy.restore()

    def close(self) -> None:
        for proxy in self.proxies.values():
            proxy.close()
        if self.proxy is not None:
            self.proxy.close()


@pytest.fixture
def switch(servers: dict[str, Any], backend: str, client: redis.Redis) -> Iterator[Switch]:
    """A way to cut some clients off the (flushed) server that ``client`` reaches directly."""
    found = Switch(servers, backend)
    yield found
    found.close()


class Trips:
    """Counts the commands one memory sends (each is one round trip on its channel)."""

    def __init__(self, mem: Any) -> None:
        self.store = mem._rm.store
        self.count = 0
        self.real = self.store._call_packed

        def counted(packed: bytes, *rest: Any) -> Any:
            self.count += 1
            return self.real(packed, *rest)

        self.store._call_packed = counted  # type: ignore[method-assign]
