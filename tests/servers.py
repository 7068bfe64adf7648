"""Real servers for the tests: Debian's redis-server and the embedded Valkey.

Each is started on a free loopback port (or a unix socket) in a temporary
directory, and stopped when the test session ends. A missing binary is an
error, never a skip: the real servers are not optional.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Self

import redis

from redis_memory import connection


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (10000 above it) is free too.

    Both below Linux's ephemeral range (32768 up): a client's connection made
    meanwhile cannot take either before the node binds them.
    """
    while True:
        port = random.randint(20000, 22700)
        if _bindable(port) and _bindable(port + 10000):
            return port


class RedisServer:
    """A redis-server (or valkey-server) process on a loopback port."""

    def __init__(self, binary: str, directory: Path, *extra: str, port: int | None = None) -> None:
        self.binary = binary
        self.directory = directory
        self.extra = extra
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.directory), *self.extra]  # fmt: skip

    def start(self) -> Self:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


class ClusterServer:
    """A Redis Cluster on loopback: three masters and three replicas, each a redis-server process.

    Node timeout :data:`NODE_TIMEOUT_MS`, so that a killed master is replaced
    within a few seconds. Each node keeps its ``nodes.conf`` in its own
    directory: a node killed and started again rejoins the cluster (as a
    replica of the master that replaced it).
    """

    NODE_TIMEOUT_MS = 1000

    def __init__(self, directory: Path, masters: int = 3) -> None:
        self.directory = directory
        self.nodes = [
            RedisServer(
                redis_binary(), directory / f"node{i}", "--cluster-enabled", "yes",
                "--cluster-node-timeout", str(self.NODE_TIMEOUT_MS), "--cluster-config-file", "nodes.conf",
                port=free_cluster_port(),
            )
            for i in range(2 * masters)
        ]  # fmt: skip
        try:
            for node in self.nodes:
                for attempt in range(5):
                    try:
                        node.start()
                        break
                    except RuntimeError:  # a port taken meanwhile: another one
                        if node.process is not None and node.process.poll() is None:
                            node.process.kill()
                            node.process.wait()
                        if attempt == 4:
                            raise
                        node.port = free_cluster_port()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            self.wait_healthy()
        except BaseException:
            self.stop()  # the nodes started so far do not outlive a cluster that never came up
            raise

    @property
    def url(self) -> str:
        """The URL of one node (any node leads to the whole cluster)."""
        return self.nodes[0].url

    @property
    def port(self) -> int:
        return self.nodes[0].port

    def client(self, **options: object) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port, **options)  # type: ignore[arg-type]

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def roles(self) -> dict[int, str]:
        """Each live node's role ("master" or "slave"), by port."""
        found = {}
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                found[node.port] = redis.Redis(port=node.port, socket_timeout=2).info("replication")["role"]
        return found

    def master_of(self, key: str) -> int:
        """The port of the master that serves ``key`` now."""
        probe = redis.Redis(port=self.alive()[0].port, socket_timeout=2)
        slot = int(probe.execute_command("CLUSTER", "KEYSLOT", key))
        for start, end, master, *_ in probe.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(master[1])
        raise RuntimeError(f"no master serves slot {slot}")

    def alive(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.process is not None and node.process.poll() is None]

    def wait_healthy(self, timeout: float = 60) -> None:
        """Until every node runs, sees the cluster state ok, and every master has a replica in sync."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._healthy():
                    return
            except (redis.ConnectionError, redis.ResponseError, redis.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the test cluster did not become healthy")
            time.sleep(0.1)

    def _healthy(self) -> bool:
        if len(self.alive()) != len(self.nodes):
            return False
        masters = 0
        for node in self.nodes:
            probe = redis.Redis(port=node.port, socket_timeout=2)
            if b"cluster_state:ok" not in probe.execute_command("CLUSTER", "INFO"):
                return False
            info = probe.info("replication")
            if info["role"] == "master":
                masters += 1
                if info["connected_slaves"] < 1:
                    return False
            elif info.get("master_link_status") != "up":
                return False
        return masters == len(self.nodes) // 2

    def flushall(self) -> None:
        for node in self.nodes:
            probe = redis.Redis(port=node.port, socket_timeout=5)
            if probe.info("replication")["role"] == "master":
                probe.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def raw_client(url: str, **options: object) -> Any:
    """A redis-py client for ``url``: a RedisCluster if it names a cluster node, else a redis.Redis."""
    probe = redis.Redis.from_url(url, socket_timeout=5)
    try:
        clustered = probe.info("cluster").get("cluster_enabled") == 1
    finally:
        probe.close()
    if clustered:
        return redis.RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


def node_client(client: Any, key: str) -> redis.Redis:
    """A client of the one server that holds ``key``: ``client`` itself, or a cluster's node serving it."""
    if isinstance(client, redis.RedisCluster):
        return client.get_redis_connection(client.get_node_from_key(key))
    return client  # type: ignore[no-any-return]


class SentinelSetup:
    """One master, one replica and three sentinels watching them (quorum 2), on loopback.

    The sentinels count the master down after 1 s without an answer.
    """

    SERVICE = "rm-master"

    def __init__(self, directory: Path) -> None:
        self.master = RedisServer(redis_binary(), directory / "master").start()
        self.replica = RedisServer(
            redis_binary(), directory / "replica", "--replicaof", "127.0.0.1", str(self.master.port)
        ).start()
        self.sentinels: list[RedisServer] = []
        for i in range(3):
            folder = directory / f"sentinel{i}"
            folder.mkdir(parents=True)
            config = folder / "sentinel.conf"
            config.write_text(
                f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
                f"sentinel failover-timeout {self.SERVICE} 10000\n"
            )
            self.sentinels.append(_SentinelProcess(config).start())
        self.wait_ready()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", sentinel.port) for sentinel in self.sentinels]

    def master_port(self) -> int:
        """The port of the master the sentinels agree on now."""
        found = redis.Redis(port=self.sentinels[0].port, socket_timeout=2).sentinel_get_master_addr_by_name(
            self.SERVICE
        )
        return int(found[1])

    def wait_ready(self, timeout: float = 30) -> None:
        """Until every sentinel knows the other two and the replica, and the replica is in sync."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ready = all(
                    int(info["num-other-sentinels"]) == 2 and int(info["num-slaves"]) == 1
                    for info in (
                        redis.Redis(port=s.port, socket_timeout=2).sentinel_master(self.SERVICE) for s in self.sentinels
                    )
                )
                master = next(s for s in (self.master, self.replica) if s.port == self.master_port())
                replica = self.replica if master is self.master else self.master
                link = redis.Redis(port=replica.port, socket_timeout=2).info("replication").get("master_link_status")
                if ready and link == "up":
                    return
            except (redis.ConnectionError, redis.ResponseError, redis.TimeoutError, StopIteration):
                pass
            time.sleep(0.1)
        raise RuntimeError("the sentinels did not get ready")

    def stop(self) -> None:
        for server in [*self.sentinels, self.replica, self.master]:
            server.stop()


class _SentinelProcess(RedisServer):
    """``redis-server <config> --sentinel`` on a free port (the config file must be writable)."""

    def __init__(self, config: Path) -> None:
        super().__init__(redis_binary(), config.parent)
        self.config = config

    def command(self) -> list[str]:
        return [self.binary, str(self.config), "--sentinel", "--port", str(self.port), "--bind", "127.0.0.1"]
