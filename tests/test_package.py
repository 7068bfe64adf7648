"""Packaging: the public names, the metadata, the typing marker."""

from __future__ import annotations

import configparser
import importlib.metadata
from pathlib import Path

import redis_memory

ROOT = Path(__file__).resolve().parent.parent


def test_star_import_gives_exactly_all() -> None:
    """`from redis_memory import *` works and exports every name in __all__, each defined."""
    namespace: dict[str, object] = {}
    exec("from redis_memory import *", namespace)
    exported = {name for name in namespace if not name.startswith("__")}
    assert exported == set(redis_memory.__all__)
    public = {name for name in dir(redis_memory) if not name.startswith("_")}
    modules = {
        "aio", "batch", "catalog", "codec", "connection", "errors", "feed", "integrations", "memory", "messages", "ops",
        "proxies", "queue", "replica",
        "session", "store", "window",
    }
    assert public - modules == set(redis_memory.__all__)


def test_every_error_derives_from_the_root() -> None:
    """Every exception class the package exports is a RedisMemoryError."""
    for name in redis_memory.__all__:
        obj = getattr(redis_memory, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, redis_memory.RedisMemoryError), name


def test_metadata_matches_the_installed_package() -> None:
    """setup.cfg's name, version and dependencies are what is installed; py.typed ships."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    name = config["metadata"]["name"]
    assert importlib.metadata.version(name) == config["metadata"]["version"]
    requires = " ".join(importlib.metadata.requires(name) or [])
    for dependency in ("redis", "msgpack"):
        assert dependency in requires
    assert "pickle" not in requires
    assert (ROOT / "redis_memory" / "py.typed").exists()
    assert "py.typed" in config["options.package_data"]["redis_memory"]
