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
from servers import EmbeddedServer, RedisServer, debian_redis

settings.register_profile(
    "ci",
    max_examples=200,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=30, stateful_step_count=15, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BACKENDS = ["fakeredis", "redis7", "valkey"]
REAL_BACKENDS = ["redis7", "valkey"]
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
        yield started
    finally:
        for server in started.values():
            if isinstance(server, (RedisServer, EmbeddedServer)):
                server.stop()


def make_client(servers: dict[str, Any], backend: str) -> redis.Redis:
    if backend == "fakeredis":
        return fakeredis.FakeRedis(server=servers["fakeredis"])
    return redis.Redis.from_url(servers[backend].url)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def client(servers: dict[str, Any], backend: str) -> Iterator[redis.Redis]:
    """A client on a flushed server of each backend."""
    c = make_client(servers, backend)
    c.flushall()
    yield c
    c.flushall()


@pytest.fixture
def other_client(servers: dict[str, Any], backend: str, client: redis.Redis) -> redis.Redis:
    """A second, independent connection to the same server as ``client``."""
    return make_client(servers, backend)


@pytest.fixture(params=REAL_BACKENDS)
def real_url(request: pytest.FixtureRequest, servers: dict[str, Any]) -> Iterator[str]:
    """The URL of a flushed real server (for tests that use several processes)."""
    url: str = servers[request.param].url
    redis.Redis.from_url(url).flushall()
    yield url
    redis.Redis.from_url(url).flushall()


class Switch:
    """A client whose link to the server can be cut and restored, while others stay connected.

    Real servers are reached through a TCP proxy; for fakeredis, the client
    uses a second FakeServer sharing the first one's data, whose
    ``connected`` flag plays the cut cable.
    """

    def __init__(self, servers: dict[str, Any], backend: str) -> None:
        self.proxy: TcpProxy | None = None
        self.fake: fakeredis.FakeServer | None = None
        if backend == "fakeredis":
            main = servers["fakeredis"]
            self.fake = fakeredis.FakeServer()
            self.fake.dbs, self.fake.lock, self.fake.script_cache = main.dbs, main.lock, main.script_cache
        else:
            server = servers[backend]
            self.proxy = TcpProxy(server.socket_path if isinstance(server, EmbeddedServer) else server.port)

    def client(self) -> redis.Redis:
        """A new client (with a channel of its own) behind this switch."""
        if self.fake is not None:
            return fakeredis.FakeRedis(server=self.fake)
        assert self.proxy is not None
        return redis.Redis.from_url(self.proxy.url, socket_connect_timeout=2)

    def cut(self) -> None:
        if self.fake is not None:
            self.fake.connected = False
        else:
            assert self.proxy is not None
            self.proxy.cut()

    def restore(self) -> None:
        if self.fake is not None:
            self.fake.connected = True
        else:
            assert self.proxy is not None
            self.proxy.restore()

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()


@pytest.fixture
def switch(servers: dict[str, Any], backend: str, client: redis.Redis) -> Iterator[Switch]:
    """A way to cut some clients off the (flushed) server that ``client`` reaches directly."""
    found = Switch(servers, backend)
    yield found
    found.close()
