"""Fixtures: every client test runs on fakeredis, Redis 7.0 and embedded Valkey."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from hypothesis import HealthCheck, settings
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
