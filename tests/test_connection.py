"""How a memory finds its server: arguments, environment, TLS, ACL, embedded."""

from __future__ import annotations

import contextlib
import multiprocessing
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from servers import free_port, raw_client

from redis_memory import (
    ConnectionFailed,
    ConversationMemory,
    Memory,
    RedisMemoryError,
    ServerRefused,
    Session,
    connection,
    health_check,
)
from redis_memory.errors import UnusableClient


def test_explicit_url_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """url= beats REDIS_URL, which beats REDIS_HOST and friends, which beat the default."""
    monkeypatch.setenv("REDIS_URL", "redis://envhost:1/2")
    monkeypatch.setenv("REDIS_HOST", "hosthost")
    assert connection.resolve_url("redis://argument:3/0") == "redis://argument:3/0"
    assert connection.resolve_url() == "redis://envhost:1/2"
    monkeypatch.delenv("REDIS_URL")
    monkeypatch.setenv("REDIS_PORT", "6390")
    monkeypatch.setenv("REDIS_PASSWORD", "p@ss:/word")
    monkeypatch.setenv("REDIS_DB", "4")
    url = connection.resolve_url()
    assert url == "redis://:p%40ss%3A%2Fword@hosthost:6390/4"
    kwargs = redis.Redis.from_url(url).get_connection_kwargs()
    assert (kwargs["host"], kwargs["port"], kwargs["password"], kwargs["db"]) == ("hosthost", 6390, "p@ss:/word", 4)
    for name in ("REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "REDIS_DB"):
        monkeypatch.delenv(name)
    assert connection.resolve_url() == "redis://localhost:6379/0"


def test_explicit_client_wins_over_url(real_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """client= is used even when url= and REDIS_URL name an unreachable server."""
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    monkeypatch.setenv("REDIS_URL", unreachable)
    mem = Memory("precedence", client=raw_client(real_url), url=unreachable)
    mem.x = 1
    assert Memory("precedence", url=real_url).x == 1


def test_environment_url_is_used(monkeypatch: pytest.MonkeyPatch, real_url: str) -> None:
    """With no argument, REDIS_URL names the server."""
    monkeypatch.setenv("REDIS_URL", real_url)
    mem = Memory("env")
    mem.x = 1
    assert Memory("env", url=real_url).x == 1


def test_host_port_variables_are_used(monkeypatch: pytest.MonkeyPatch, servers: dict) -> None:  # type: ignore[type-arg]
    """REDIS_HOST/REDIS_PORT/REDIS_DB reach the server when REDIS_URL is unset."""
    server = servers["redis7"]
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("REDIS_HOST", "127.0.0.1")
    monkeypatch.setenv("REDIS_PORT", str(server.port))
    monkeypatch.setenv("REDIS_DB", "3")
    Memory("hostport").x = 5
    assert redis.Redis(port=server.port, db=3).exists(Memory("hostport").key)
    redis.Redis(port=server.port, db=3).flushdb()


def test_decoding_clients_are_refused() -> None:
    """A client with decode_responses=True would corrupt binary fields: refused clearly."""
    with pytest.raises(ValueError, match="decode_responses"):
        Memory("x", client=redis.Redis(decode_responses=True))


def test_a_decoding_url_is_refused_when_the_memory_is_built(real_url: str) -> None:
    """url='...?decode_responses=True' is refused at once with UnusableClient (a ValueError), for every entry point."""
    url = real_url + ("&" if "?" in real_url else "?") + "decode_responses=True"
    for build in (
        lambda: Memory("x", url=url),
        lambda: ConversationMemory("x", url=url),
        lambda: Session("x", url=url),
        lambda: Memory.list_ids(url=url),
    ):
        with pytest.raises(UnusableClient, match="decode_responses") as raised:
            build()
        assert isinstance(raised.value, ValueError) and isinstance(raised.value, RedisMemoryError)
    Memory("x", url=real_url).title = "a client without it still works"
    assert Memory("x", url=real_url).title == "a client without it still works"


def test_a_client_that_is_not_a_redis_client_is_refused() -> None:
    """Anything but a redis.Redis (an asyncio client, a stray object) is refused with UnusableClient."""
    import redis.asyncio

    for wrong in (redis.asyncio.Redis(), object()):
        with pytest.raises(UnusableClient):
            Memory("x", client=wrong)  # type: ignore[arg-type]


def test_acl_user_in_url(servers: dict) -> None:  # type: ignore[type-arg]
    """A URL with an ACL user and password connects as that user."""
    server = servers["redis7"]
    admin = redis.Redis(port=server.port)
    admin.acl_setuser("agent", enabled=True, passwords=["+s3cret"], keys=["rm:*"], commands=["+@all"])
    try:
        mem = Memory("acl", url=f"redis://agent:s3cret@127.0.0.1:{server.port}/0")
        mem.x = [1]
        mem.x.append(2)
        assert Memory("acl", url=f"redis://agent:s3cret@127.0.0.1:{server.port}/0").x == [1, 2]
        with pytest.raises(ServerRefused, match="change feed"):
            mem.subscribe()  # a clear error, not redis-py's
        mem.delete()  # writes and deletes work without the right to publish change events
        assert admin.exists(mem.key) == 0
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(f"redis://agent:wrong@127.0.0.1:{server.port}/0").ping()
    finally:
        admin.acl_deluser("agent")
        admin.flushall()


def test_tls_url(tmp_path: Path) -> None:
    """A rediss:// URL reaches a TLS-only server."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file), "--tls-ca-cert-file", str(ca_file),
         "--tls-auth-clients", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca_file}"
        for _ in range(200):
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        mem = Memory("tls", url=url)
        mem.secret = {"a": [1]}
        assert Memory("tls", url=url).secret == {"a": [1]}
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=port, socket_timeout=1).ping()  # plain text is refused
    finally:
        process.terminate()
        process.wait(10)


def _embedded_writer(directory: str, writer: int) -> None:
    mem = ConversationMemory("shared", url=f"embedded://{directory}")
    for i in range(20):
        mem.log.append((writer, i))


def test_embedded_server_is_shared_by_processes_and_keeps_data(tmp_path: Path) -> None:
    """embedded:// starts one server per directory; processes share it; data survives a restart."""
    directory = tmp_path / "emb"
    url = f"embedded://{directory}"
    mem = ConversationMemory("shared", url=url)
    mem.log = []
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_embedded_writer, args=(str(directory), w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(mem.log) == sorted((w, i) for w in range(3) for i in range(20))
    assert len(list(directory.glob("valkey.pid"))) == 1
    connection.stop_embedded(directory)
    connection._clients.pop(url, None)
    assert ConversationMemory("shared", url=url).log[:1] in ([(0, 0)], [(1, 0)], [(2, 0)])
    assert len(ConversationMemory("shared", url=url).log) == 60
    connection.stop_embedded(directory)


def test_embedded_from_a_fresh_interpreter(tmp_path: Path) -> None:
    """A separate Python process started with REDIS_URL=embedded://dir joins the same server."""
    directory = tmp_path / "emb2"
    url = f"embedded://{directory}"
    Memory("x", url=url).value = "from the test"
    code = f"from redis_memory import Memory; print(Memory('x', url={url!r}).value)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "from the test"
    connection.stop_embedded(directory)


def test_reconnects_do_not_use_up_the_pool(real_url: str) -> None:
    """The library's own connection is not counted by the client's pool: many reconnects, still working."""
    client = raw_client(real_url, max_connections=2, client_name="reconnecting")
    mem = Memory("pool", client=client)
    admin = raw_client(real_url)
    for i in range(5):
        mem[f"k{i}"] = i
        for found in admin.client_list():
            if found["name"] == "reconnecting":
                admin.client_kill_filter(_id=found["id"])
    mem.last = "ok"
    assert Memory("pool", url=real_url).to_dict() == {"k0": 0, "k1": 1, "k2": 2, "k3": 3, "k4": 4, "last": "ok"}


def test_the_default_server_unreachable_suggests_redis_url_and_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no server named and none on the default address, the error says how to name one; a named one does not."""
    for name in ("REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "REDIS_DB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(connection, "DEFAULT_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    for attempt in (lambda: Memory("quick-start").messages, lambda: Memory.count(), lambda: connection.health_check()):
        with pytest.raises(RedisMemoryError) as caught:
            attempt()
        assert "REDIS_URL" in str(caught.value) and 'url="embedded://"' in str(caught.value)
    with pytest.raises(RedisMemoryError) as named:
        Memory.count(url=f"redis://127.0.0.1:{free_port()}/0")
    assert "embedded://" not in str(named.value)


def test_stop_embedded_without_an_argument_stops_the_default_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop_embedded() stops the server `embedded://` started, and says whether one was running."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    try:
        connection.ensure_embedded(connection.embedded_dir("embedded://"))
        assert (tmp_path / "redis_memory" / "embedded" / "valkey.sock").exists()
        assert connection.embedded_running()
        assert connection.stop_embedded() is True
        assert not connection.embedded_running()
        assert connection.stop_embedded() is False
    finally:
        connection.stop_embedded()


def test_memories_work_where_select_has_no_poll(real_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``select.poll`` does not exist (Windows), memories on a real server work, tracked ones included."""
    monkeypatch.delattr(select, "poll")
    # redis-py's reader for hiredis asks once, at import, whether poll exists.
    monkeypatch.setattr(redis._parsers.hiredis, "_HAS_POLL", False, raising=False)
    writer = Memory("no-poll", client=raw_client(real_url))
    writer.x = 1
    tracked = Memory("no-poll", client=raw_client(real_url), tracking=True)
    assert tracked.x == 1
    writer.x = 2
    deadline = time.monotonic() + 5
    while tracked.x != 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tracked.x == 2
    tracked.y = 3
    assert Memory("no-poll", client=raw_client(real_url)).to_dict() == {"x": 2, "y": 3}


@pytest.mark.parametrize("real_url", ["redis7"], indirect=True)
def test_reading_a_large_value_takes_time_in_proportion_to_its_size(real_url: str) -> None:
    """Loading a 32 MiB value costs a small multiple of redis-py's HGETALL of it on the same server: the reply
    reader copies what it receives a bounded number of times (a reader that joined its chunks one by one
    would copy about 8 GB, over 50 times the raw read). Compared with raw redis-py, not with the library's own
    4 MiB load: this machine's raw reads already grow faster than the size (4 to 32 MiB: 1.2 to 65 ms)."""
    client = raw_client(real_url)
    size = 32 << 20
    Memory("large", client=client).blob = b"x" * size
    key = Memory("large", client=client).key
    library, raw = [], []
    for _ in range(3):
        start = time.perf_counter()
        assert len(Memory("large", client=raw_client(real_url)).blob) == size
        library.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert len(b"".join(client.hgetall(key).values())) > size
        raw.append(time.perf_counter() - start)
    assert min(library) / min(raw) < 10, (library, raw)


@pytest.mark.parametrize(
    "answer",
    [b"garbage\r\n", b"+OK\r\n", b":12\r\n", b"$-5\r\n", b"\x00\x01\x02", b"*1\r\n:1\r\n", b"-ERR unknown command\r\n"],
)
def test_a_peer_that_does_not_speak_redis_is_a_connection_failure(answer: bytes) -> None:
    """A port served by something else than Redis: reads and writes raise ConnectionFailed, not a parser's error."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                peer, _ = listener.accept()
                with peer, contextlib.suppress(OSError):
                    peer.settimeout(10)
                    while peer.recv(65536):
                        peer.sendall(answer)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        url = f"redis://127.0.0.1:{port}/0?socket_timeout=1&socket_connect_timeout=1"
        with pytest.raises(ConnectionFailed, match="unreachable"):
            Memory("peer", url=url).title  # noqa: B018
        with Memory("peer", url=url) as mem, pytest.raises(ConnectionFailed):
            mem.title = "never loaded"
        with pytest.raises(ConnectionFailed):
            health_check(url=url)
    finally:
        listener.close()
        server.join(timeout=5)
