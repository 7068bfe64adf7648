"""Packaging: the public names, the metadata, the typing marker."""

from __future__ import annotations

import configparser
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

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
        "aio", "batch", "catalog", "cluster", "codec", "connection", "errors", "feed", "integrations", "memory",
        "messages", "ops", "proxies", "queue", "replica",
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


@pytest.mark.parametrize(
    ("module", "framework", "extra"),
    [("langchain", "langchain_core", "langchain"), ("openai_agents", "agents", "openai-agents")],
)
def test_a_missing_framework_names_its_extra(module: str, framework: str, extra: str) -> None:
    """Without its framework an integration raises MissingExtra naming the extra; the rest of the package imports."""
    script = (
        f"import sys; sys.modules[{framework!r}] = None\n"
        "import redis_memory, redis_memory.aio\n"
        "try:\n"
        f"    import redis_memory.integrations.{module}\n"
        "except redis_memory.MissingExtra as exc:\n"
        "    assert isinstance(exc, ImportError)\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"pip install 'redis-memory[{extra}]'" in done.stdout


def test_the_extras_install_the_frameworks() -> None:
    """setup.cfg has the langchain and openai-agents extras, and the test extra installs both frameworks."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    extras = config["options.extras_require"]
    assert "langchain-core" in extras["langchain"] and "openai-agents" in extras["openai-agents"]
    assert "langchain-core" in extras["test"] and "openai-agents" in extras["test"]
    assert "redis_memory.integrations" in config["options"]["packages"]
