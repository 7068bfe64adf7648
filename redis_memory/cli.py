"""The redis-memory command (also python -m redis_memory): look into, follow, move and remove memories.

It connects as the library does: --url, else REDIS_URL, else the REDIS_HOST,
REDIS_PORT, REDIS_PASSWORD and REDIS_DB variables, else
redis://localhost:6379/0; embedded:// reaches the embedded server. A KIND is
memory, conversation, session, or the kind of a Memory subclass of your own
(its _rm_kind), under --prefix (rm by default).

Exit codes: 0 done; 1 an expected failure (not found, already exists,
refused by the server, corrupt data, a bad import file); 2 a usage error;
3 the server cannot be reached. An expected failure prints one line to
stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import queue
import re
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO
from urllib.parse import urlparse

from . import connection, export
from ._version import __version__
from .errors import ConnectionFailed, RedisMemoryError
from .feed import Event
from .memory import ConversationMemory, Memory
from .session import AgentMemory, Session, SessionMemory

PROG = "redis-memory"
OK, FAILED, USAGE, UNREACHABLE = 0, 1, 2, 3
#: How long ``import`` waits for its writes to reach the server before it reports them not written.
FLUSH_TIMEOUT = 30.0


class Failure(Exception):
    """An expected failure: its message is printed as one line, and the command exits with ``code``."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise Failure(f"{message} (see {self.prog} --help)", USAGE)


_KINDS: dict[str, type[Memory]] = {"memory": Memory, "conversation": ConversationMemory, "session": SessionMemory}


def memory_class(kind: str) -> type[Memory]:
    """The class of memories of ``kind``: a built-in one, or a Memory subclass made for a kind of your own."""
    found = _KINDS.get(kind)
    if found is None:
        found = _KINDS[kind] = type(f"{kind.title()}Memory", (Memory,), {"_rm_kind": kind})
    return found


class Target:
    """What a command names: a kind and an id (a session: its shared memory and agents), on one server."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.kind: str = args.kind
        self.identifier: str = args.id
        self.options: dict[str, Any] = {"url": args.url, "prefix": args.prefix}

    @property
    def session(self) -> bool:
        return self.kind == "session"

    def label(self) -> str:
        return f"{self.kind} {self.identifier!r}"

    @contextlib.contextmanager
    def memories(self) -> Iterator[dict[str, Memory]]:
        """The memories of the target, by role ("" for a plain memory; "shared" and each agent's name for a session).

        Opening them writes nothing: an agent's memory is opened without joining.
        """
        opened: dict[str, Memory] = {}
        try:
            if not self.session:
                opened[""] = memory_class(self.kind)(self.identifier, **self.options)
            else:
                with contextlib.closing(Session(self.identifier, **self.options)) as session:
                    agents = session.agents()
                opened["shared"] = SessionMemory(self.identifier, **self.options)
                for name in agents:
                    opened[name] = AgentMemory(self.identifier, name, **self.options)
            yield opened
        finally:
            for memory in opened.values():
                memory.close()

    @staticmethod
    def exists(memories: dict[str, Memory]) -> bool:
        """Whether any of them holds a field (HLEN, MEMORY USAGE each)."""
        return any(memory.stats().fields for memory in memories.values())

    @contextlib.contextmanager
    def existing(self) -> Iterator[dict[str, Memory]]:
        """:meth:`memories`, or a not-found failure."""
        with self.memories() as memories:
            if not self.exists(memories):
                raise Failure(f"{self.label()} not found (prefix {self.options['prefix']!r})")
            yield memories


# -- rendering ---------------------------------------------------------------------------------------------------


#: Strings shown quoted, lest they read as another type: numbers, None, True, False, bytes, tuples and the like.
_AMBIGUOUS = re.compile(r"[-+]?(\d[\d_]*\.?\d*([eE][-+]?\d+)?|\.\d+|inf|nan)|None|True|False|b['\"].*|[-\[{(\"'#].*",
                        flags=re.S)  # fmt: skip


def _text(value: str) -> str:
    """A str as it reads best: bare, unless it could be taken for something else."""
    bare = value and value == value.strip() and "\n" not in value and not _AMBIGUOUS.fullmatch(value)
    return value if bare else json.dumps(value, ensure_ascii=False)


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, (set, frozenset)):
        inner = ", ".join(sorted(json.dumps(v, ensure_ascii=False) if isinstance(v, str) else _scalar(v)
                                 for v in value))  # fmt: skip
        if isinstance(value, frozenset):
            return f"frozenset({{{inner}}})" if value else "frozenset()"
        return f"{{{inner}}}" if value else "set()"
    if isinstance(value, list):
        return "[]"
    if isinstance(value, dict):
        return "{}"
    return repr(value)


def _nested(value: Any) -> bool:
    return isinstance(value, (list, dict)) and bool(value)


def tree_lines(value: Any, indent: int = 0) -> list[str]:
    """A readable rendering of a value, one line per item, in the manner of YAML."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict) and value:
        for key, item in value.items():
            name = _text(key) if isinstance(key, str) and ":" not in key else repr(key)
            if _nested(item):
                lines.append(f"{pad}{name}:")
                lines.extend(tree_lines(item, indent + 2))
            else:
                lines.append(f"{pad}{name}: {_scalar(item)}")
    elif isinstance(value, list) and value:
        for item in value:
            if _nested(item):
                inner = tree_lines(item, indent + 2)
                lines.append(f"{pad}- {inner[0].lstrip()}")
                lines.extend(inner[1:])
            else:
                lines.append(f"{pad}- {_scalar(item)}")
    else:
        lines.append(f"{pad}{_scalar(value)}")
    return lines


def event_line(event: Event, role: str = "") -> str:
    """One line for a change event: when, who, what, where."""
    when = event.time.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" if isinstance(p, str) and p.isidentifier()
                    else f"[{p!r}]" for p in event.path).lstrip(".")  # fmt: skip
    if role:
        where = f"{role}:{where}" if where else role
    if event.op == "resync":
        return f"{when}  resync  (changes may have been missed: read the state again)"
    if not event.path:  # the whole memory, or a container deleted before the event was read
        where = f"{role}:" if role else ""
        where += "(whole memory)" if event.op == "clear" and event.version == 0 else "(a container since deleted)"
    return f"{when}  {event.author or '-'}  {event.op}  {where}  v{event.version}"


def _shown_url(url: str) -> str:
    """A URL without its password."""
    parsed = urlparse(url)
    if parsed.password:
        netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@")
        return parsed._replace(netloc=netloc).geturl()
    return url


def _when(moment: dt.datetime | None) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()  # a listing streams: each line as soon as it is known


# -- commands ----------------------------------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else ["conversation", "memory", "session"]
    for n, kind in enumerate(kinds):
        listed = memory_class(kind).list_ids(idle_for=args.idle, limit=args.limit, url=args.url, prefix=args.prefix)
        if n == 0:  # once the server has answered
            _out(f"{'KIND':<13} {'LAST ACTIVITY (UTC)':<20} {'MESSAGES':>8} {'SIZE (B)':>10}  ID")
        for identifier in listed:
            target = Target(argparse.Namespace(kind=kind, id=identifier, url=args.url, prefix=args.prefix))
            with target.memories() as memories:
                metadata = [m.metadata() for m in memories.values()]
                size = sum(m.stats().bytes_used for m in memories.values())
            active = max((m.last_activity for m in metadata if m.last_activity), default=None)
            if active is None:
                continue  # deleted since it was listed
            count = metadata[0].message_count if kind == "conversation" else None
            shown = "-" if count is None else str(count)
            _out(f"{kind:<13} {_when(active):<20} {shown:>8} {size:>10,}  {identifier}")
    return OK


def _snapshot(memories: dict[str, Memory]) -> dict[str, dict[str, Any]]:
    return {role: memory.to_dict() for role, memory in memories.items()}


def _export_document(target: Target, memories: dict[str, Memory]) -> dict[str, Any]:
    values = _snapshot(memories)
    if target.session:
        agents = {role: v for role, v in values.items() if role != "shared"}
        return export.document(target.kind, target.identifier, shared=values["shared"], agents=agents)
    return export.document(target.kind, target.identifier, attributes=values[""])


def cmd_show(args: argparse.Namespace) -> int:
    target = Target(args)
    with target.existing() as memories:
        if args.json:
            _out(json.dumps(_export_document(target, memories), indent=2, ensure_ascii=False))
            return OK
        for role, memory in memories.items():
            values = memory.to_dict()
            heading = f"# {memory.key}" + (f"  ({role})" if role else "")
            _out(heading)
            _out("\n".join(tree_lines(values)) if values else "(no attributes)")
    return OK


def cmd_export(args: argparse.Namespace) -> int:
    target = Target(args)
    with target.existing() as memories:
        text = json.dumps(_export_document(target, memories), indent=2, ensure_ascii=False) + "\n"
    if args.output in (None, "-"):
        sys.stdout.write(text)
        return OK
    path = Path(args.output)
    try:
        _write_whole(path, text)
    except OSError as exc:
        raise Failure(f"cannot write {path}: {exc}") from None
    print(f"exported {target.label()} to {path}", file=sys.stderr)
    return OK


def _write_whole(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a file half written is worse than none."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def cmd_import(args: argparse.Namespace) -> int:
    target = Target(args)
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Failure(f"cannot read {args.file}: {exc}") from None
    try:
        attributes, agents = export.read_document(text, target.session)
    except RedisMemoryError as exc:
        raise Failure(f"{args.file}: {exc}; nothing was written") from None
    with target.memories() as memories:
        if target.exists(memories):
            if not args.replace:
                raise Failure(f"{target.label()} already exists; nothing was written (--replace overwrites it)")
            if target.session:
                with contextlib.closing(Session(target.identifier, **target.options)) as session:
                    session.delete()
            else:
                memories[""].delete()
    if target.session:
        with contextlib.closing(Session(target.identifier, **target.options)) as session:
            written = [_write(session.shared, attributes)]
            written += [_write(session.agent(name), values) for name, values in agents.items()]
    else:
        with memory_class(target.kind)(target.identifier, **target.options) as memory:
            written = [_write(memory, attributes)]
    print(f"imported {sum(written)} attributes into {target.label()}", file=sys.stderr)
    return OK


def _write(memory: Memory, attributes: dict[str, Any]) -> int:
    """Store every attribute in one batch: one call, all or none."""
    with memory.batch():
        for name, value in attributes.items():
            memory[name] = value
    if not memory.flush(timeout=FLUSH_TIMEOUT):
        status = memory.status()
        if status.pending:
            message = f"Redis became unreachable: {status.pending} changes to {memory.key} not written"
            raise Failure(message, UNREACHABLE)
        # Queued while Redis was away, then refused on replay (the memory was deleted meanwhile).
        raise Failure(f"Redis refused {status.dropped} changes to {memory.key}: {status.last_error}")
    return len(attributes)


def cmd_watch(args: argparse.Namespace) -> int:
    target = Target(args)
    events: queue.Queue[tuple[str, Event]] = queue.Queue()

    def follower(role: str) -> Callable[[Event], None]:
        return lambda event: events.put((role, event))

    # Ctrl-C (SIGINT) and SIGTERM end the watch cleanly, even when started
    # with SIGINT ignored (a background job of a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with target.existing() as memories:
        subscriptions = [m.subscribe(follower(role if target.session else "")) for role, m in memories.items()]
        try:
            print(f"watching {target.label()}; Ctrl-C to stop", file=sys.stderr, flush=True)
            while True:
                with contextlib.suppress(queue.Empty):
                    role, event = events.get(timeout=0.5)
                    _out(event_line(event, role))
        except KeyboardInterrupt:
            # A second Ctrl-C while the subscriptions close must not turn a clean stop into exit 130.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("stopped", file=sys.stderr)
        finally:
            for subscription in subscriptions:
                subscription.close()
    return OK


def cmd_rm(args: argparse.Namespace) -> int:
    target = Target(args)
    with target.existing() as memories:
        fields = sum(memory.stats().fields for memory in memories.values())
        if not args.yes:
            if not sys.stdin.isatty():
                raise Failure(f"not deleting {target.label()} without --yes (no terminal to ask)", USAGE)
            answer = input(f"delete {target.label()} ({len(memories)} memories, {fields} fields)? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted", file=sys.stderr)
                return FAILED
        if target.session:
            with contextlib.closing(Session(target.identifier, **target.options)) as session:
                session.delete()
        else:
            memories[""].delete()
    print(f"deleted {target.label()}", file=sys.stderr)
    return OK


def cmd_stats(args: argparse.Namespace) -> int:
    target = Target(args)
    with target.existing() as memories:
        for role, memory in memories.items():
            stats, metadata, left = memory.stats(), memory.metadata(), memory.ttl()
            _out(f"# {memory.key}" + (f"  ({role})" if role else ""))
            _out(f"created:        {_when(metadata.created_at)}")
            _out(f"last activity:  {_when(metadata.last_activity)}")
            if metadata.message_count is not None:
                _out(f"messages:       {metadata.message_count}")
            _out(f"bytes in Redis: {stats.bytes_used:,}")
            _out(f"hash fields:    {stats.fields:,}")
            _out(f"expires in:     {'never' if left is None else f'{left:.0f} s'}")
    return OK


def cmd_health(args: argparse.Namespace) -> int:
    url = connection.resolve_url(args.url)
    health = connection.health_check(url=args.url)
    _out(f"server:     {health.server} {health.version} ({health.mode})")
    _out(f"round trip: {health.round_trip_ms:.2f} ms")
    _out(f"url:        {_shown_url(url)}")
    return OK


def cmd_embedded(args: argparse.Namespace) -> int:
    directory = Path(args.dir).absolute() if args.dir else connection.embedded_dir()
    url = f"embedded://{directory}" if args.dir else "embedded://"
    if args.action == "start":
        socket_path = connection.ensure_embedded(directory)
        _out(f"embedded server running in {directory}")
        _out(f"  socket: unix://{socket_path}")
        _out(f"  use it: REDIS_URL={url}  (or url={url!r})")
        _out(f"  it keeps running after your programs end; stop it with: {PROG} embedded stop{_dir_arg(args)}")
        return OK
    if args.action == "stop":
        if not connection.stop_embedded(directory):
            raise Failure(f"no embedded server is running in {directory}")
        _out(f"stopped the embedded server in {directory}")
        return OK
    if connection.embedded_running(directory):
        _out(f"running in {directory} (unix://{directory / 'valkey.sock'}); REDIS_URL={url}")
        return OK
    _out(f"not running in {directory}")
    return FAILED


def _dir_arg(args: argparse.Namespace) -> str:
    return f" {args.dir}" if args.dir else ""


# -- the parser --------------------------------------------------------------------------------------------------

_EXAMPLES = {
    "ls": "redis-memory ls conversation --idle 86400 --limit 20",
    "show": "redis-memory show conversation conv_123 --json",
    "watch": "redis-memory watch session trip-7",
    "export": "redis-memory export conversation conv_123 -o conv_123.json",
    "import": "redis-memory import conversation conv_123 conv_123.json --replace",
    "rm": "redis-memory rm conversation conv_123 --yes",
    "stats": "redis-memory stats conversation conv_123",
    "health": "REDIS_URL=redis://localhost:6379/0 redis-memory health",
    "embedded": "redis-memory embedded start && redis-memory --url embedded:// ls",
}


def parser() -> argparse.ArgumentParser:
    """The command line: global options, then one subcommand."""
    top = _Parser(
        prog=PROG,
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each subcommand has its own --help, with an example.\nexample:\n  " + _EXAMPLES["show"],
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    top.add_argument("--url", help="the server (default: REDIS_URL, the REDIS_* variables, localhost:6379)")
    top.add_argument("--prefix", default="rm", help="the key prefix of the memories (default: rm)")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Callable[[argparse.Namespace], int], summary: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=summary, description=summary, formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=f"example:\n  {_EXAMPLES[name]}",
        )  # fmt: skip
        sub.set_defaults(handler=handler)
        return sub

    def kind_and_id(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("kind", metavar="KIND", help="memory, conversation, session, or a kind of your own")
        sub.add_argument("id", metavar="ID", type=_identifier, help="the memory's id (a conversation id, ...)")

    ls = command("ls", cmd_ls, "list memories with their last activity, message count and size, from the index")
    ls.add_argument("kind", metavar="KIND", nargs="?", help="one kind (default: conversation, memory and session)")
    ls.add_argument("--idle", type=_seconds, metavar="SECONDS", help="only those not written for this long")
    ls.add_argument("--limit", type=_positive, metavar="N", help="at most N per kind, least recently active first")

    show = command("show", cmd_show, "print a memory's attributes as a readable tree, or as lossless JSON")
    kind_and_id(show)
    show.add_argument("--json", action="store_true", help="lossless JSON (the export format), type tags included")

    watch = command("watch", cmd_watch, "print each change to a memory as it happens (who, what, where, when)")
    kind_and_id(watch)

    out = command("export", cmd_export, "write a memory as lossless JSON, for import")
    kind_and_id(out)
    out.add_argument("-o", "--output", metavar="FILE", help="the file to write (default: standard output)")

    into = command("import", cmd_import, "store an export; refuses to overwrite an existing memory without --replace")
    kind_and_id(into)
    into.add_argument("file", metavar="FILE", help="an export file, or - for standard input")
    into.add_argument("--replace", action="store_true", help="delete the existing memory first")

    rm = command("rm", cmd_rm, "delete a memory (a session: with every agent's memory)")
    kind_and_id(rm)
    rm.add_argument("--yes", action="store_true", help="do not ask (needed without a terminal)")

    stats = command("stats", cmd_stats, "bytes in Redis, hash fields, messages, creation, last activity, expiry")
    kind_and_id(stats)

    command("health", cmd_health, "round trip, server, version and mode of the server")

    embedded = command("embedded", cmd_embedded, "start, stop or check the embedded Valkey server")
    embedded.add_argument("action", choices=["start", "stop", "status"])
    embedded.add_argument("dir", metavar="DIR", nargs="?", help="its data directory (default: that of embedded://)")
    return top


def _identifier(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("an id may not be empty")
    return text


def _at_least(convert: Callable[[str], float], minimum: int, what: str) -> Callable[[str], Any]:
    """An argument type: ``convert`` of the text, refused if it fails or is below ``minimum`` (NaN too)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}: {text!r}")
        return value

    return parse


_seconds = _at_least(float, 0, "a number of seconds")
_positive = _at_least(int, 1, "a whole number")


def main(argv: Sequence[str] | None = None, stderr: TextIO | None = None) -> int:
    """Run the command; return its exit code."""
    err = stderr or sys.stderr
    # The command reports failures itself; the library's warnings (say, "Redis
    # unreachable, changes are queued") would only repeat them.
    logger = logging.getLogger("redis_memory")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        args = parser().parse_args(argv)
        return int(args.handler(args))
    except Failure as exc:
        print(f"{PROG}: {exc}", file=err)
        return exc.code
    except ConnectionFailed as exc:
        print(f"{PROG}: {exc}", file=err)
        return UNREACHABLE
    except RedisMemoryError as exc:
        print(f"{PROG}: {exc}", file=err)
        return FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (| head): stop quietly, without a second error at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OK
    finally:
        logger.setLevel(level)
