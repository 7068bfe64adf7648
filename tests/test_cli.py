"""The redis-memory command, run as a user runs it: a subprocess against a real server."""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgpack
import pytest
import redis
from servers import free_port

from redis_memory import ConversationMemory, Memory, Session, cli, connection, export
from redis_memory.connection import embedded_dir

SUBCOMMANDS = ["ls", "show", "watch", "export", "import", "rm", "stats", "health", "embedded"]


def run(*args: str, url: str | None = None, cwd: Path | None = None, stdin: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``python -m redis_memory [--url URL] ARGS`` with no REDIS_* variables, as a user's shell runs it."""
    command = [sys.executable, "-m", "redis_memory", *(["--url", url] if url else []), *args]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}
    environment.update(env or {})
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=cwd, input=stdin,
                          env=environment)  # fmt: skip


def one_line_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    """The command failed with ``code``, saying why in one line of stderr, no traceback."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("redis-memory: "), done.stderr
    return lines[0]


def same(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down (NaN equal to NaN, zones and folds compared)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, dt.datetime):
        return a == b and a.fold == b.fold and repr(a.tzinfo) == repr(b.tzinfo) and a.isoformat() == b.isoformat()
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return (
            list(a) == list(b)
            and all(type(k) is type(k2) for k, k2 in zip(a, b, strict=True))
            and all(same(a[k], b[k]) for k in a)
        )
    return bool(a == b)


#: One attribute per kind of value the library stores, and a few awkward cases of each.
EVERY_VALUE: dict[str, Any] = {
    "none": None,
    "flags": [True, False],
    "ints": [0, -1, 2**63, -(2**70), 10**40],
    "floats": [1.5, -0.0, float("inf"), float("-inf"), float("nan"), 1e-300],
    "text": 'héllo\nwörld \u2603 "quoted" $type',
    "raw": b"\x00\xff\xc1binary",
    "tuple": (1, "a", None, (2.5, b"x"), frozenset({1, 2})),
    "set": {1, "a", (1, 2), b"b", None},
    "frozen": frozenset({"x", 3}),
    "empty": [[], {}, set(), (), frozenset(), ""],
    "naive": dt.datetime(2026, 11, 1, 1, 30, fold=1),
    "utc": dt.datetime(2026, 12, 1, 23, 59, 59, 999999, tzinfo=dt.UTC),
    "zoned": dt.datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=ZoneInfo("Europe/Paris")),
    "named_offset": dt.datetime(2026, 1, 1, 9, tzinfo=dt.timezone(dt.timedelta(hours=1), "CET")),
    "day": dt.date(2026, 2, 28),
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "n": 2}],
    "keys": {
        1: "int",
        "s": "str",
        b"b": "bytes",
        None: "none",
        (1, "t"): "tuple",
        frozenset({2}): "frozenset",
        dt.date(2026, 1, 2): "date",
        dt.datetime(2026, 1, 2, 3, 4): "datetime",
    },
    "tag_lookalike": {"$type": "tuple", "items": [1]},
    "deep": {"a": [{"b": {"c": [1, {2, 3}, {"d": (4,)}]}}]},
}


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """An XDG_DATA_HOME of the test's own, so the default embedded directory is never the user's."""
    return {"XDG_DATA_HOME": str(tmp_path / "xdg")}


def test_help_documents_every_subcommand_with_an_example() -> None:
    """`python -m redis_memory --help` and each subcommand's --help exit 0, each with an example."""
    done = run("--help")
    assert done.returncode == 0, done.stderr
    for name in SUBCOMMANDS:
        assert name in done.stdout
    assert "Exit codes" in done.stdout and "example:" in done.stdout
    for name in SUBCOMMANDS:
        sub = run(name, "--help")
        assert sub.returncode == 0, sub.stderr
        assert sub.stdout.startswith(f"usage: redis-memory {name}")
        assert f"example:\n  {cli._EXAMPLES[name]}" in sub.stdout
        assert cli._EXAMPLES[name].split()[0] in ("redis-memory", "REDIS_URL=redis://localhost:6379/0")
    assert run("--version").stdout.strip() == f"redis-memory {__import__('redis_memory').__version__}"


def direct(url: str) -> Any:
    """A redis-py client on ``url`` that reaches every key: a cluster client on a cluster node."""
    node = redis.Redis.from_url(url)
    if node.info("cluster").get("cluster_enabled"):
        return redis.cluster.RedisCluster.from_url(url)
    return node


def test_usage_errors_exit_2_in_one_line() -> None:
    """An unknown subcommand, a missing argument or a bad number: exit 2, one line, no traceback."""
    for args in (["bogus"], ["show", "conversation"], ["ls", "--limit", "0"], ["ls", "--idle", "soon"], []):
        line = one_line_error(run(*args), 2)
        assert "--help" in line


def test_ls_lists_from_the_index_with_activity_count_and_size(real_url: str) -> None:
    """`ls` shows every conversation of the index with its message count and size; --idle and --limit filter."""
    for n in range(3):
        ConversationMemory(f"chat {n}", url=real_url).messages = [{"role": "user", "content": "x"}] * (n + 1)
    Session("trip", agent="a", url=real_url).shared.plan = ["Paris"]
    # A hash that looks like a memory but was never indexed: ls reads the index, not KEYS.
    direct(real_url).hset("rm:conversation:{stray}", "i", "x")
    done = run("ls", "conversation", url=real_url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:2] == ["KIND", "LAST"]
    rows = {line.split("  ")[-1]: line.split() for line in lines[1:]}
    assert set(rows) == {"chat 0", "chat 1", "chat 2"}
    for n in range(3):
        row = rows[f"chat {n}"]
        assert row[0] == "conversation" and row[3] == str(n + 1)
        assert int(row[4].replace(",", "")) > 0
        assert dt.datetime.fromisoformat(f"{row[1]}T{row[2]}+00:00") > dt.datetime.now(dt.UTC) - dt.timedelta(60)
    assert len(run("ls", "conversation", "--limit", "2", url=real_url).stdout.splitlines()) == 3
    assert run("ls", "conversation", "--idle", "3600", url=real_url).stdout.splitlines()[1:] == []
    every = run("ls", url=real_url).stdout
    assert "session" in every and "trip" in every and "chat 2" in every


def test_show_prints_a_readable_tree_and_lossless_json(real_url: str) -> None:
    """`show` renders attributes as an indented tree; `show --json` is the export document."""
    mem = ConversationMemory("conv_123", url=real_url)
    mem.messages = [{"role": "user", "content": "What's the weather?"}]
    mem.user_profile = {"name": "Alice", "preferences": {"tone": "formal"}, "tags": ("a", 1)}
    done = run("show", "conversation", "conv_123", url=real_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "# rm:conversation:{conv_123}\n"
        "messages:\n"
        "  - role: user\n"
        "    content: What's the weather?\n"
        "user_profile:\n"
        "  name: Alice\n"
        "  preferences:\n"
        "    tone: formal\n"
        "  tags: ('a', 1)\n"
    )
    as_json = run("show", "conversation", "conv_123", "--json", url=real_url)
    data = json.loads(as_json.stdout)
    assert data["attributes"]["user_profile"]["tags"] == {"$type": "tuple", "items": ["a", 1]}
    assert data == json.loads(run("export", "conversation", "conv_123", url=real_url).stdout)


def test_not_found_exits_1(real_url: str) -> None:
    """show, stats, export, rm and watch of a memory that does not exist: exit 1, one line."""
    for args in (["show"], ["stats"], ["export"], ["rm", "--yes"], ["watch"]):
        line = one_line_error(run(*args, "conversation", "nobody", url=real_url), 1)
        assert "conversation 'nobody' not found" in line


def test_corrupt_stored_data_exits_1_naming_the_key_and_can_be_removed(real_url: str) -> None:
    """A memory with an undecodable field: show and export exit 1 naming key and field; rm still deletes it."""
    mem = Memory("damaged", url=real_url)
    mem.x, mem.y = [1], 2
    client = direct(real_url)
    field = b"e0:" + msgpack.packb("x")
    client.hset(mem.key, field, b"junk")
    for command in ("show", "export"):
        line = one_line_error(run(command, "memory", "damaged", url=real_url), 1)
        assert mem.key in line
    assert run("rm", "memory", "damaged", "--yes", url=real_url).returncode == 0
    assert not client.exists(mem.key)


def test_unreachable_server_exits_3_without_traceback(tmp_path: Path) -> None:
    """Every command that needs a server, when none listens there: exit 3, one line."""
    nowhere = "redis://127.0.0.1:1/0"
    for args in (["ls"], ["show", "memory", "m"], ["stats", "memory", "m"], ["health"], ["rm", "memory", "m", "--yes"]):
        line = one_line_error(run(*args, url=nowhere, cwd=tmp_path), 3)
        assert "unreachable" in line.lower()


def test_every_value_type_round_trips_through_export_and_import(real_url: str, tmp_path: Path) -> None:
    """export then import into another id gives back every value with its type; the two exports are identical."""
    source = Memory("source", url=real_url)
    for name, value in EVERY_VALUE.items():
        source[name] = value
    source["name with space"] = 1
    path = tmp_path / "source.json"
    done = run("export", "memory", "source", "-o", str(path), url=real_url)
    assert done.returncode == 0, done.stderr
    imported = run("import", "memory", "copy", str(path), url=real_url)
    assert imported.returncode == 0, imported.stderr
    # All attributes in one batch: one applied change, one version.
    assert direct(real_url).hget("rm:memory:{copy}", "v").split()[0] == b"1"
    copied = Memory("copy", url=real_url).to_dict()
    assert set(copied) == set(EVERY_VALUE) | {"name with space"}
    for name, value in EVERY_VALUE.items():
        assert same(copied[name], value), (name, copied[name], value)
    again = json.loads(run("export", "memory", "copy", url=real_url).stdout)
    first = json.loads(path.read_text())
    assert again["attributes"] == first["attributes"] and again["id"] == "copy"


def test_import_refuses_to_overwrite_without_replace(real_url: str, tmp_path: Path) -> None:
    """An import onto an existing memory exits 1 and changes nothing; with --replace the file's state is all."""
    ConversationMemory("c", url=real_url).messages = ["new"]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(export.document("conversation", "c", attributes={"messages": ["from file"]})))
    existing = ConversationMemory("target", url=real_url)
    existing.messages = ["kept"]
    existing.other = 1
    line = one_line_error(run("import", "conversation", "target", str(path), url=real_url), 1)
    assert "already exists" in line and "--replace" in line
    assert ConversationMemory("target", url=real_url).to_dict() == {"messages": ["kept"], "other": 1}
    done = run("import", "conversation", "target", str(path), "--replace", url=real_url)
    assert done.returncode == 0, done.stderr
    assert ConversationMemory("target", url=real_url).to_dict() == {"messages": ["from file"]}
    stdin = run("import", "conversation", "from-stdin", "-", url=real_url, stdin=path.read_text())
    assert stdin.returncode == 0, stdin.stderr
    assert ConversationMemory("from-stdin", url=real_url).messages == ["from file"]


BAD_FILES = {
    "not json": "{not json",
    "truncated": json.dumps(export.document("memory", "m", attributes={"a": [1, 2, 3]}))[:-9],
    "another format": json.dumps({"redis_memory_export": 99, "attributes": {}}),
    "a plain JSON list": "[1, 2]",
    "a tuple holding a list": json.dumps(export.document("memory", "m", attributes={"ok": 1}))[:-2]
    + ', "bad": {"$type": "tuple", "items": [[1]]}}}',
    "an unknown tag": json.dumps({"redis_memory_export": 1, "attributes": {"x": {"$type": "complex"}}}),
    "bad base64": json.dumps({"redis_memory_export": 1, "attributes": {"x": {"$type": "bytes", "base64": "!!"}}}),
    "a float in a set": json.dumps({"redis_memory_export": 1, "attributes": {"x": {"$type": "set", "items": [1.5]}}}),
    "an unknown zone": json.dumps(
        {
            "redis_memory_export": 1,
            "attributes": {"x": {"$type": "datetime", "iso": "2026-01-01T00:00:00", "zone": "Mars/Olympus", "fold": 0}},
        }
    ),
    "a session's export": json.dumps(export.document("session", "s", shared={"a": 1}, agents={})),
    "nested too deep": '{"redis_memory_export": 1, "attributes": {"x": ' + "[" * 5000 + "]" * 5000 + "}}",
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_import_file_writes_nothing(case: str, real_url: str, tmp_path: Path) -> None:
    """A corrupt or unstorable file: exit 1, one line naming the file, and nothing written, even with --replace."""
    path = tmp_path / "bad.json"
    path.write_text(BAD_FILES[case])
    line = one_line_error(run("import", "memory", "fresh", str(path), url=real_url), 1)
    assert str(path) in line and "nothing was written" in line
    assert not direct(real_url).exists("rm:memory:{fresh}")
    Memory("kept", url=real_url).value = [1, 2]
    one_line_error(run("import", "memory", "kept", str(path), "--replace", url=real_url), 1)
    assert Memory("kept", url=real_url).to_dict() == {"value": [1, 2]}
    missing = one_line_error(run("import", "memory", "fresh", str(tmp_path / "none.json"), url=real_url), 1)
    assert "cannot read" in missing


def test_session_round_trip_with_its_agents(real_url: str, tmp_path: Path) -> None:
    """A session exports its shared memory and each agent's; import rebuilds all of them, agents listed."""
    planner = Session("trip-7", agent="planner", url=real_url)
    planner.shared.itinerary = ["Paris"]
    planner.private.scratch = {"budget": 900}
    Session("trip-7", agent="booker", url=real_url).private.confirmations = [("AF", 123)]
    shown = run("show", "session", "trip-7", url=real_url).stdout
    assert "# rm:session:{trip-7}  (shared)\nitinerary:\n  - Paris\n" in shown
    assert "# rm:session:{trip-7}:agent:planner  (planner)\nscratch:\n  budget: 900\n" in shown
    path = tmp_path / "trip.json"
    assert run("export", "session", "trip-7", "-o", str(path), url=real_url).returncode == 0
    done = run("import", "session", "trip-8", str(path), url=real_url)
    assert done.returncode == 0, done.stderr
    copy = Session("trip-8", url=real_url)
    assert copy.agents() == ["booker", "planner"]
    assert copy.shared.itinerary == ["Paris"]
    assert copy.agent("planner").scratch == {"budget": 900}
    assert copy.agent("booker").confirmations == [("AF", 123)]
    assert "trip-8" in Session.list_ids(url=real_url)
    line = one_line_error(run("import", "conversation", "c", str(path), url=real_url), 1)
    assert "a session's export" in line


def test_rm_needs_yes_without_a_terminal_and_deletes_whole(real_url: str) -> None:
    """`rm` without --yes and no terminal exits 2 and keeps the memory; with --yes a session goes whole."""
    Session("s", agent="a", url=real_url).private.x = 1
    ConversationMemory("c", url=real_url).messages = ["m"]
    line = one_line_error(run("rm", "conversation", "c", url=real_url), 2)
    assert "--yes" in line
    assert ConversationMemory("c", url=real_url).messages == ["m"]
    assert run("rm", "conversation", "c", "--yes", url=real_url).returncode == 0
    assert "c" not in ConversationMemory.list_ids(url=real_url)
    assert not hasattr(ConversationMemory("c", url=real_url), "messages")
    assert run("rm", "session", "s", "--yes", url=real_url).returncode == 0
    assert direct(real_url).keys("rm:session:*") == []


def test_stats_and_health(real_url: str) -> None:
    """`stats` shows size, fields, messages and expiry; `health` the server and its round trip."""
    chat = ConversationMemory("c", url=real_url, ttl=600)
    chat.messages = ["a", "b"]
    done = run("stats", "conversation", "c", url=real_url)
    assert done.returncode == 0, done.stderr
    fields = dict(line.split(":", 1) for line in done.stdout.splitlines()[1:])
    assert fields["messages"].strip() == "2"
    assert int(fields["bytes in Redis"].strip().replace(",", "")) == chat.stats().bytes_used
    assert 500 < float(fields["expires in"].strip().removesuffix(" s")) <= 600
    health = run("health", url=real_url)
    assert health.returncode == 0, health.stderr
    server = redis.Redis.from_url(real_url).info("server")
    assert (server.get("valkey_version") or server["redis_version"]) in health.stdout
    assert "round trip:" in health.stdout


def test_a_custom_kind_and_prefix(real_url: str) -> None:
    """A kind of your own under another prefix is listed, shown and removed like the built-in ones."""

    class Ticket(Memory):
        _rm_kind = "ticket"

    Ticket("T-1", url=real_url, prefix="app").state = "open"
    listed = run("--prefix", "app", "ls", "ticket", url=real_url)
    assert listed.stdout.splitlines()[1].split()[0] == "ticket" and listed.stdout.rstrip().endswith("T-1")
    assert run("--prefix", "app", "show", "ticket", "T-1", url=real_url).stdout.endswith("state: open\n")
    one_line_error(run("show", "ticket", "T-1", url=real_url), 1)  # not under the default prefix


def test_watch_prints_another_process_s_writes_and_stops_on_sigint(real_url: str) -> None:
    """`watch` prints one line per change made by another process, and ends cleanly (exit 0) on Ctrl-C."""
    ConversationMemory("live", url=real_url).messages = []
    environment = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}
    watcher = subprocess.Popen([sys.executable, "-m", "redis_memory", "--url", real_url, "watch", "conversation",
                                "live"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environment)  # fmt: skip
    try:
        assert watcher.stderr is not None and watcher.stdout is not None
        assert watcher.stderr.readline().startswith("watching conversation 'live'")
        writer = (
            "import sys; from redis_memory import ConversationMemory as C\n"
            "m = C('live', url=sys.argv[1], author='agent-b')\n"
            "m.messages.append({'role': 'user', 'content': 'hi'})\n"
            "m.context = {'topic': 'x'}\n"
            "m.context['topic'] = 'y'\n"
        )
        subprocess.run([sys.executable, "-c", writer, real_url], check=True, timeout=60)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(watcher.stdout.readline() for _ in range(3)))  # type: ignore[union-attr]
        reader.start()
        reader.join(30)
        assert len(lines) == 3, lines
        parts = [line.split() for line in lines]
        assert [p[1:4] for p in parts] == [
            ["agent-b", "append", "messages[0]"],
            ["agent-b", "set", "context"],
            ["agent-b", "set", "context.topic"],
        ]
        when = dt.datetime.fromisoformat(parts[0][0].replace("Z", "+00:00"))
        assert abs((dt.datetime.now(dt.UTC) - when).total_seconds()) < 60
        time.sleep(0.2)
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(15) == 0
        rest = watcher.stderr.read()
        assert "Traceback" not in rest and rest.strip() == "stopped"
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()


def test_watch_of_a_session_follows_shared_and_agent_memories(real_url: str) -> None:
    """A session's watch names the memory each change went to: shared, or the agent's."""
    Session("trip", agent="planner", url=real_url).private.notes = []
    environment = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}
    watcher = subprocess.Popen([sys.executable, "-m", "redis_memory", "--url", real_url, "watch", "session", "trip"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)  # fmt: skip
    try:
        assert watcher.stderr is not None and watcher.stdout is not None
        assert watcher.stderr.readline().startswith("watching session 'trip'")
        planner = Session("trip", agent="planner", url=real_url)
        planner.shared.plan = ["Paris"]
        planner.private.notes.append("book")
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(watcher.stdout.readline() for _ in range(2)))  # type: ignore[union-attr]
        reader.start()
        reader.join(30)
        assert sorted(line.split()[1:4] for line in lines) == [
            ["planner", "append", "planner:notes[0]"],
            ["planner", "set", "shared:plan"],
        ]
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(15) == 0
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()


def test_a_listing_cut_short_by_its_reader_ends_quietly(real_url: str) -> None:
    """`ls | head -2` ends without an error: the listing streams, and a closed pipe is not a failure."""
    for n in range(30):
        ConversationMemory(f"c{n}", url=real_url).messages = [n]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}
    listing = f"{sys.executable} -m redis_memory --url {real_url} ls conversation | head -2"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", listing], capture_output=True, text=True, timeout=60,
                          env=environment)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2 and done.stderr == ""


def test_embedded_start_status_stop(tmp_path: Path, home: dict[str, str]) -> None:
    """`embedded start DIR` runs a server others can use, `status` reports it, `stop` ends it (then exit 1)."""
    directory = tmp_path / "db"
    try:
        started = run("embedded", "start", str(directory), env=home)
        assert started.returncode == 0, started.stderr
        assert f"REDIS_URL=embedded://{directory}" in started.stdout and "embedded stop" in started.stdout
        status = run("embedded", "status", str(directory), env=home)
        assert status.returncode == 0 and "running" in status.stdout
        Memory("m", url=f"embedded://{directory}").x = 1
        assert run("show", "memory", "m", url=f"embedded://{directory}", env=home).stdout.endswith("x: 1\n")
        stopped = run("embedded", "stop", str(directory), env=home)
        assert stopped.returncode == 0, stopped.stderr
        assert not (directory / "valkey.sock").exists() or run("embedded", "status", str(directory)).returncode == 1
        assert run("embedded", "status", str(directory), env=home).returncode == 1
        assert "no embedded server" in one_line_error(run("embedded", "stop", str(directory), env=home), 1)
        default = run("embedded", "status", env=home)
        assert default.returncode == 1 and str(Path(home["XDG_DATA_HOME"])) in default.stdout
    finally:
        from redis_memory import stop_embedded

        stop_embedded(directory)


def test_embedded_default_directory(home: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`embedded start` with no DIR uses the directory `embedded://` names; stop_embedded() stops it."""
    monkeypatch.setenv("XDG_DATA_HOME", home["XDG_DATA_HOME"])
    from redis_memory import stop_embedded

    try:
        assert run("embedded", "start", env=home).returncode == 0
        assert (embedded_dir() / "valkey.sock").exists()
        assert stop_embedded() is True
        assert stop_embedded() is False
    finally:
        stop_embedded()


def test_health_with_nothing_naming_a_server_suggests_how_to_name_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """No --url, no REDIS_* and nothing on the default address: exit 3, one line suggesting REDIS_URL and embedded://."""
    for name in ("REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "REDIS_DB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(connection, "DEFAULT_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    errors = io.StringIO()
    assert cli.main(["health"], stderr=errors) == 3
    lines = errors.getvalue().splitlines()
    assert len(lines) == 1 and "REDIS_URL" in lines[0] and 'url="embedded://"' in lines[0]
