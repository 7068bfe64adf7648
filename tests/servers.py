"""Real servers for the tests: Debian's redis-server and the embedded Valkey.

Each is started on a free loopback port (or a unix socket) in a temporary
directory, and stopped when the test session ends. A missing binary is an
error, never a skip: the real servers are not optional.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from redis_memory import connection


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server (or valkey-server) process on a loopback port."""

    def __init__(self, binary: str, directory: Path, *extra: str) -> None:
        self.binary = binary
        self.directory = directory
        self.extra = extra
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port, socket_timeout=1).ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"{self.binary} did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server); .ci/run installs it")
    return binary


def debian_redis(directory: Path) -> RedisServer:
    return RedisServer(redis_binary(), directory).start()


def durable_redis(directory: Path) -> RedisServer:
    """A redis-server that fsyncs every write to its append-only file, so SIGKILL loses nothing."""
    return RedisServer(redis_binary(), directory, "--appendonly", "yes", "--appendfsync", "always").start()


class EmbeddedServer:
    """The library's own embedded server, in a directory of the test session."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket_path = connection.ensure_embedded(directory)

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def stop(self) -> None:
        connection.stop_embedded(self.directory)
