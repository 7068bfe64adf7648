"""Packaging: the public names, the metadata, the typing marker."""

from __future__ import annotations

import configparser
import importlib.metadata
import re
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
        "aio",
        "batch",
        "catalog",
        "cli",
        "cluster",
        "codec",
        "connection",
        "errors",
        "export",
        "feed",
        "green",
        "integrations",
        "memory",
        "messages",
        "ops",
        "proxies",
        "queue",
        "replica",
        "resp",
        "session",
        "store",
        "tracking",
        "window",
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
    assert config["metadata"]["version"] == "attr: redis_memory._version.__version__"  # one source
    assert importlib.metadata.version(name) == redis_memory.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", redis_memory.__version__)
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


def test_license_changelog_and_classifiers() -> None:
    """A LICENSE ships with the MIT text the metadata names; the changelog has this version; classifiers are honest."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    metadata = config["metadata"]
    assert metadata["license"] == "MIT"
    assert "Permission is hereby granted, free of charge" in (ROOT / "LICENSE").read_text()
    assert f"## {redis_memory.__version__}" in (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"Programming Language :: Python :: (3\.\d+)$", metadata["classifiers"], flags=re.M)
    # Every version named is one this suite runs on; the oldest is python_requires.
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in versions
    assert config["options"]["python_requires"] == f">={min(versions, key=lambda v: int(v.split('.')[1]))}"
    assert "redis-memory = redis_memory.cli:main" in config["options.entry_points"]["console_scripts"]


def test_import_works_without_fcntl(tmp_path: Path) -> None:
    """Where fcntl does not exist (Windows), the package imports; the spool and the embedded server say why not."""
    script = f"""
import sys
sys.modules["fcntl"] = None   # what an import finds on Windows: ImportError
import redis_memory, fakeredis
from redis_memory import EmbeddedServerError, Memory, UnsupportedPlatform
mem = Memory("w", client=fakeredis.FakeRedis())
mem.x = [1]
assert Memory("w", client=mem._rm.store.client).x == [1]
try:
    Memory("w", client=fakeredis.FakeRedis(), spool={str(tmp_path)!r})
except UnsupportedPlatform as exc:
    assert isinstance(exc, NotImplementedError) and "POSIX" in str(exc)
else:
    raise AssertionError("spool accepted")
try:
    redis_memory.ensure_embedded(__import__("pathlib").Path({str(tmp_path)!r}))
except EmbeddedServerError as exc:
    assert "POSIX" in str(exc)
else:
    raise AssertionError("embedded server started")
print("ok", redis_memory.__version__)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ok {redis_memory.__version__}"
    assert not list(tmp_path.iterdir())  # neither made a file
