"""Key layout, the server-side scripts, and every Redis command the library sends.

One memory is one Redis hash, ``<prefix>:<kind>:{<escaped id>}``. Its fields:

=============  ============================================================
``i``          incarnation: a random token set when the hash is created
``v``          version: ``<count> <token>``, the count +1 per applied operation,
               the token that of the operation (so a rolled-back server's
               later versions never pass for the ones it lost)
``c``          node-id counter; the root dict is node ``0``
``h<nid>``     node header: ``l <lo> <hi> <mod> <birth>``,
               ``d <len> <next> <mod> <birth>`` or ``s <len> 0 <mod> <birth>``;
               the birth is the token of the operation that created the node
``e<nid>:<s>`` list element at slot ``s`` (a decimal integer)
``e<nid>:<k>`` dict entry for the msgpack-encoded key ``k``: ``<seq>:<value>``;
               set element ``k``: an empty value
``j<n>``       journal ring: the stamp of version ``n`` and the fields it touched
``w<writer>``  a writer's last applied seq, when it was last indexed, result
``tc``         when the memory was created (ms since the epoch)
``ta``         when it last changed (ms since the epoch)
=============  ============================================================

A second key, ``<hash key>:w``, is a sorted set of writers by the time
they last wrote. Operation ids are remembered for :data:`OP_ID_RETENTION`
seconds after a writer's last write; older writer fields are pruned, a few
at a time, by the writes of others.

A value is msgpack bytes, or ``\\xc1<nid>`` (a byte msgpack never emits) for
a reference to a child node, or ``\\xc1<nid>=<msgpack map>`` for a list
item's dict of scalars stored whole (node ``nid`` without fields of its own,
until a ``promote`` gives it some; see :mod:`redis_memory.ops`).

List slots run from ``lo`` to ``hi - 1``; an append writes slot ``hi``, an
insert at the front slot ``lo - 1``, so both ends are O(1). Dict entries carry an insertion sequence number so the
insertion order of Python dicts survives.

Corrupt data (a field that does not follow this layout) is reported as
:class:`~redis_memory.errors.CorruptData` naming the key and field, by a
read and by the apply script, which then writes nothing. A hash with fields
but no ``i`` is corrupt, never created over. A node whose header is corrupt
(unparseable, or a dict's or set's count that is not its number of entries)
is removed whole with the attribute holding it.
"""

from __future__ import annotations

import hashlib
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, cast

import redis

from .connection import Channel, Client, channel
from .errors import ConnectionFailed, CorruptData, NotReplicated, ServerRefused
from .ops import Args, Plan
from .resp import MISSING_FUNCTION, resp_args, resp_command
from .tracking import Seen, Tracker, wrote_elsewhere

REF = 0xC1
#: A node header (see above); the apply script's read_header follows the same rule.
HEADER = re.compile(rb"([lds]) (-?[0-9]+) (-?[0-9]+) (-?[0-9]+)(?: (\S*))?")
#: A header's counts are below this in magnitude (at most 15 digits, which the server's Lua numbers keep exact).
HEADER_LIMIT = 10**15
JOURNAL_SIZE = 128
TOUCH_LIMIT = 1000
#: Seconds an operation id is remembered after its writer's last write: the
#: longest outage after which a resent operation is still recognised.
OP_ID_RETENTION = 7 * 24 * 3600
#: A writer's entry in the writer index is refreshed at most this often.
_INDEX_EVERY = 60
ANY_INCARNATION = b"*"
#: How long a write waits for its replicas by default, with wait_for_replicas (seconds).
REPLICA_TIMEOUT = 1.0
#: The change channel of a memory is its key plus this (same hash tag).
FEED_SUFFIX = ":changes"
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")


def escape_id(identifier: str) -> str:
    """Percent-encode everything but ``[A-Za-z0-9-_.~]``: injective, no ``{}:*`` left."""
    if not isinstance(identifier, str) or not identifier:
        raise ValueError(f"a memory id must be a non-empty str, not {identifier!r}")
    if identifier.isascii() and _SAFE.issuperset(identifier.encode()):
        return identifier  # nothing to encode (a memory built per request pays only this check)
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in identifier.encode("utf-8"))


def memory_key(prefix: str, kind: str, identifier: str) -> str:
    """The hash key of one memory; the braces make the id its Cluster hash tag."""
    return f"{escape_id(prefix)}:{escape_id(kind)}:{{{escape_id(identifier)}}}"


#: The server-side commands, each a function of one Redis Functions library
#: (see :func:`library`): their sources are ``lua/<name>.lua``.
COMMANDS = ("apply", "sync", "delete")
#: The functions registered, by name: the command each runs, and its flags.
#: A sync only reads (so a read-only replica serves it too); a delete runs
#: on a server out of memory, which it relieves; so does ``apply_oom``, the
#: apply function for operations that only remove (see :meth:`Store.apply`).
#: A tracked connection calls the ``_tracked`` ones (see apply.lua).
_REGISTERED = {
    "apply": ("apply", ()),
    "apply_oom": ("apply", ("allow-oom",)),
    "apply_tracked": ("apply_tracked", ()),
    "apply_oom_tracked": ("apply_tracked", ("allow-oom",)),
    "sync": ("sync", ("no-writes",)),
    "delete": ("delete", ("allow-oom",)),
}
#: Operations that only remove: sent again with ``apply_oom`` when the server is out of memory.
_REMOVALS = frozenset({b"ddel", b"ldel", b"dclear"})
#: How often a call is sent again after the server answered that it lacks the library.
_LOAD_ATTEMPTS = 5
_CONSTANTS = {
    "JOURNAL_SIZE": JOURNAL_SIZE,
    "TOUCH_LIMIT": TOUCH_LIMIT,
    "INDEX_EVERY": _INDEX_EVERY,
    "RETENTION": OP_ID_RETENTION,
    "FEED_SUFFIX": FEED_SUFFIX,
}


def _lua_source(name: str) -> str:
    return resources.files(__package__).joinpath("lua", name).read_text(encoding="utf-8")


def library() -> tuple[str, dict[str, str]]:
    """The Redis Functions library of :data:`COMMANDS`, and the function name of each.

    Each ``lua/<name>.lua`` defines a local function ``<name>``; a line
    ``-- @include <part>`` pulls in ``lua/includes/<part>.lua`` (once per
    library) and ``@NAME@`` is the Python constant of that name. The library
    and its functions are named after a digest of the source, so processes
    running different versions of this package share a server safely.
    """
    included: set[str] = set()

    def expand(source: str) -> str:
        def include(match: re.Match[str]) -> str:
            part = match.group(1)
            if part in included:
                return ""
            included.add(part)
            return expand(_lua_source(f"includes/{part}.lua"))

        return re.sub(r"^-- @include (\w+)$", include, source, flags=re.MULTILINE)

    body = "\n".join(expand(_lua_source(f"{name}.lua")) for name in COMMANDS)
    body = re.sub(r"@([A-Z_]+)@", lambda match: str(_CONSTANTS[match.group(1)]), body)
    digest = hashlib.sha1((body + repr(_REGISTERED)).encode()).hexdigest()[:12]
    names = {name: f"rm_{digest}_{name}" for name in _REGISTERED}
    registrations = "".join(
        f"redis.register_function{{function_name='{names[name]}', callback={command}, "
        f"flags={{{', '.join(repr(flag) for flag in flags)}}}}}\n"
        for name, (command, flags) in _REGISTERED.items()
    )
    return f"#!lua name=redis_memory_{digest}\n{body}\n{registrations}", names


LIBRARY, FUNCTIONS = library()


def _bulk_or_nil(part: object) -> bool:
    return part is None or isinstance(part, bytes)


def _sync(raw: Any) -> Sync:
    """The sync function's reply (also inside an apply's): ValueError, TypeError or IndexError if it is none."""
    if not isinstance(raw, list) or len(raw) < 3 or len(raw) % 2 == 0 or not all(_bulk_or_nil(p) for p in raw):
        raise ValueError("not a sync reply")
    kind = raw[2].decode()
    if kind not in ("empty", "delta", "full") or any(field is None for field in raw[3::2]):
        raise ValueError("not a sync reply")
    it = iter(raw[3:])
    return Sync(raw[0] or b"", raw[1], kind, list(zip(it, it, strict=True)))


def version_number(stamp: bytes) -> int:
    """The change count of a version stamp (``<count> <token>``, see the apply script); 0 for none.

    ValueError if ``stamp`` is not one (``int`` alone would take ``-3``, ``+3`` or ``1_0``).
    """
    count = stamp.partition(b" ")[0]
    if stamp and not count.isdigit():
        raise ValueError(f"not a version stamp: {stamp[:40]!r}")
    return int(count or b"0")


def send(
    link: Channel, key: str, packed: bytes, replies: int = 1, on_first: Callable[[object], None] | None = None
) -> Any:
    """Send one command about ``key`` (in RESP form) on ``link``; redis-py's errors become the library's.

    Unreachable: ConnectionFailed; ``key`` of another type: CorruptData;
    any other refusal: ServerRefused. Each names ``key``. With ``replies``
    more than 1, ``packed`` holds that many commands: the list of replies.
    """
    try:
        return link.call_packed(packed, key, replies, on_first)
    except ConnectionFailed as exc:
        raise ConnectionFailed(f"{exc} (key {key})", key=key) from exc.__cause__
    except redis.exceptions.NoScriptError:
        raise  # the caller loads the library and sends it again
    except redis.ResponseError as exc:
        if str(exc).startswith(MISSING_FUNCTION):
            raise redis.exceptions.NoScriptError(str(exc)) from exc
        if str(exc).startswith("WRONGTYPE"):
            message = f"{key} holds another kind of Redis value than redis_memory keeps there: {exc}"
            raise CorruptData(message, key=key) from exc
        raise ServerRefused(f"Redis refused a command on {key}: {exc}", key=key) from exc


def command(link: Channel, key: str, *args: bytes | str | int) -> Any:
    """Send one command about ``key`` (see :func:`send`)."""
    return send(link, key, resp_command(args))


#: Parts of an apply call's arguments, packed (see :meth:`Store.apply`).
_STEP_HEAD = b"$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
_NONE_CREATED = b"$1\r\n0\r\n"
_EMPTY_PLAN = b"$1\r\n0\r\n"
_SERVER_PLAN = b"$2\r\n-1\r\n"


@dataclass
class Step:
    """One operation of an apply call: its id, the node it changes, the ids of the nodes it creates, its plan."""

    seq: int
    token: bytes
    name: bytes
    nid: bytes
    birth: bytes
    created: list[bytes]  # the client's ids for the nodes it creates (provisional ones, in a batch)
    plan: Plan | None
    args: Args
    #: For an append of one item or a scalar set on a fresh view: what the call writes (see :func:`append_hints`).
    hints: tuple[bytes, ...] = ()


def _next_version(since: bytes) -> int | None:
    """The version after ``since``, if the lean paths may count from it: a stamp of a count the server holds exactly."""
    count = since.partition(b" ")[0]
    return int(count) + 1 if count.isdigit() and len(count) < 15 else None


def _fits(*counts: int) -> bool:
    """Whether a header's counts, before and after a write that adds one to each, are ones it holds (see HEADER_LIMIT).

    A header past the limit is refused as corrupt by the server's paths: the lean ones, which only compare it, never
    see one.
    """
    return all(-HEADER_LIMIT < count < HEADER_LIMIT for count in counts)


def _hints(
    version: int,
    token: bytes,
    nid: bytes,
    field: bytes,
    headers: tuple[bytes, bytes],
    birth: bytes,
    event: bytes,
    incarnation: bytes,
) -> tuple[bytes, ...]:
    """The hints of a write of ``field`` in node ``nid`` at ``version``, in the apply function's order.

    ``headers`` are the node's header before and after without its birth,
    ``event`` the change event after its time.
    """
    stamp = b"%d %s" % (version, token)
    header = b"h" + nid
    born = b" " + birth if birth else b""  # as the server writes a header (the root's has no birth)
    return (
        headers[0] + born,
        headers[1] + born,
        stamp,
        b"j%d" % (version % JOURNAL_SIZE),
        b"%s %d:%s%d:%s" % (stamp, len(field), field, len(header), header),
        b"%d " % version,
        field,
        event,
        incarnation,
    )


def append_hints(
    nid: bytes, lo: int, length: int, mod: int, birth: bytes, since: bytes, call: list[bytes], token: bytes
) -> tuple[bytes, ...]:
    """The strings an append of one item to list ``nid`` writes, made by the client: the apply function's lean path.

    ``lo``, ``length``, ``mod`` and ``birth`` are the list's header as the
    caller's replica knows it, ``since`` the replica's version, ``call`` the
    writer, the replica's incarnation, the expiry and the author.
    The function uses them only if the server holds that version, that
    header and that incarnation: the view they were made from is then the
    server's, so they are what its fast path would make
    (tests/test_fast_paths.py compares them). () if they cannot be made.
    """
    writer, incarnation, author = call[0], call[1], call[3]
    version = _next_version(since)
    hi = lo + length
    if version is None or not _fits(lo, hi + 1, mod + 1):
        return ()
    headers = b"l %d %d %d" % (lo, hi, mod), b"l %d %d %d" % (lo, hi + 1, mod + 1)
    event = b" %s lappend %s %s %d 1 0 %d:%s" % (writer, nid, incarnation, length, len(author), author)
    return _hints(version, token, nid, b"e%s:%d" % (nid, hi), headers, birth, event, incarnation)


def set_hints(
    nid: bytes,
    size: int,
    next_seq: int,
    mod: int,
    birth: bytes,
    key: bytes,
    new: bool,
    since: bytes,
    call: list[bytes],
    token: bytes,
) -> tuple[bytes, ...]:
    """The same as :func:`append_hints` for a scalar set of ``key`` (encoded) in dict ``nid`` (lean_set in apply.lua).

    ``size``, ``next_seq``, ``mod`` and ``birth`` are the dict's header as
    the replica knows it; ``new``: the key is not in it. The last hint is
    the new entry's seq, or nothing for a key there (whose entry keeps its own).
    """
    writer, incarnation, author = call[0], call[1], call[3]
    version = _next_version(since)
    if version is None or not _fits(size + 1, next_seq + 1, mod + 1):
        return ()
    headers = b"d %d %d %d" % (size, next_seq, mod), b"d %d %d %d" % (size + new, next_seq + new, mod + 1)
    event = b" %s dset %s %s    %d:%s %d:%s" % (writer, nid, incarnation, len(author), author, len(key), key)
    hints = _hints(version, token, nid, b"e%s:%s" % (nid, key), headers, birth, event, incarnation)
    return (*hints, b"%d:" % next_seq if new else b"")


@dataclass
class Reply:
    """What the apply function answered: a status, the version stamps after and before it, and data."""

    status: str
    stamp: bytes
    incarnation: bytes
    first_nid: int | None
    before: bytes
    extra: list[bytes]
    failed: int | None = None  # the 1-based number of the step refused
    results: list[bytes] = field(default_factory=list)  # per step, for a batch: first new node, '-' or 'x'
    #: For a single operation sent with the replica's version (``since``), applied after others' changes:
    #: what changed since that version, as a sync answers it.
    delta: Sync | None = None


@dataclass
class Sync:
    """What the sync script answered: ``kind`` is 'empty', 'delta' or 'full'."""

    stamp: bytes
    incarnation: bytes
    kind: str
    changes: list[tuple[bytes, bytes | None]]


class Store:
    """All Redis traffic of one memory: its key, its scripts, its reads."""

    def __init__(
        self,
        client: Client,
        key: str,
        companions: tuple[str, ...] = (),
        tracking: bool = False,
        driven: bool = False,
        loop: Any = None,
    ) -> None:
        # Weakly: a memory kept for reuse must not keep a client its program let go of (nor the client's
        # connections). The memory objects built on it hold it; the traffic goes over the channel.
        self._client = weakref.ref(client)
        self.key = key
        self.tracking = tracking
        self.writers_key = key + ":w"
        #: The keys this memory owns: deleted with it.
        self.keys = (key, self.writers_key)
        #: Keys that also get the memory's expiry, but outlive its deletion.
        self.companions = companions
        self.feed = key + FEED_SUFFIX
        self.channel = channel(client, tracking, driven, loop)
        #: The invalidations the server sent this memory's connection (None: not tracked, see tracking.py).
        self.tracker: Tracker | None = getattr(self.channel, "tracker", None)
        self._key_bytes = key.encode()
        #: After a write: the mark a replica made exact by it may keep (None: check the version).
        self.written: Seen | None = None
        #: The start of each command's FCALL, by command and keys.
        self._heads: dict[tuple[str, tuple[str, ...]], bytes] = {}
        #: The first arguments of an apply call (writer, incarnation, expiry, author, count), packed.
        self._call_heads: dict[tuple[bytes | int, ...], bytes] = {}
        self._version_command = resp_command(("HMGET", key, "v", "i"))
        #: Replicas each write waits for, and for how long (ms): WAIT after the apply script.
        self.replicas = (0, 0)

    @property
    def client(self) -> Client:
        """The redis-py client the memory was built on (held by its memory objects)."""
        found = self._client()
        if found is None:
            raise ConnectionFailed(f"{self.key}: the client this memory was built on was let go of")
        return found

    def _call(self, *args: Any) -> Any:
        return self._call_packed(resp_command(args))

    def mark(self) -> Seen | None:
        """The tracking mark to keep for a replica about to be made exact (None if not tracked)."""
        return None if self.tracker is None else self.tracker.mark(self._key_bytes)

    def vouches(self, seen: Seen | None) -> bool:
        """Whether the server has sent no invalidation of this key since mark ``seen`` was taken.

        Looks at what the connection holds first (no round trip): see tracking.py.
        """
        tracker = self.tracker
        return (
            seen is not None
            and tracker is not None
            and self.channel.caught_up()
            and tracker.trusted(self._key_bytes, seen)
        )

    def _changed(self) -> None:
        """This process wrote the key by a command after which the server no longer tracks it."""
        wrote_elsewhere(self._key_bytes)

    def _call_packed(self, packed: bytes, replies: int = 1, on_first: Callable[[object], None] | None = None) -> Any:
        return send(self.channel, self.key, packed, replies, on_first)

    def _fcall(
        self,
        command: str,
        keys: tuple[str, ...],
        args: list[bytes],
        tail: Args = (b"", 0),
        after: bytes = b"",
        on_first: Callable[[object], None] | None = None,
    ) -> Any:
        """FCALL of one of :data:`COMMANDS`; the library is loaded when the server lacks it.

        ``after``: another command sent in the same round trip; then the list of both replies.
        ``on_first``: see :meth:`Channel.call_packed`.
        """
        head = self._heads.get((command, keys))
        if head is None:
            packed_head = resp_command(("FCALL", FUNCTIONS[command], len(keys), *keys))
            head = self._heads[(command, keys)] = packed_head[packed_head.index(b"\r\n") + 2 :]  # without its count
        packed = resp_command(args, head, 3 + len(keys), *tail) + after
        for _ in range(_LOAD_ATTEMPTS):
            try:
                return self._call_packed(packed, 2 if after else 1, on_first)
            except redis.exceptions.NoScriptError:
                # A new server, one restarted without its data, or FUNCTION FLUSH
                # (perhaps by another process, again and again).
                pass
            # Loaded outside the handler: code run while an error is being handled may keep
            # it (fakeredis's reader does), and with it every frame it was raised through.
            self.load_library()
        message = f"Redis kept losing the server code of redis_memory (FUNCTION FLUSH?) while serving {self.key}"
        raise ServerRefused(message, key=self.key)

    def load_library(self) -> None:
        """FUNCTION LOAD of the library (once per server: it is kept with the data and replicated)."""
        try:
            self._call("FUNCTION", "LOAD", LIBRARY)
        except ServerRefused as exc:
            if "already exists" in str(exc):  # loaded meanwhile by another process
                return
            if "NOPERM" in str(exc):
                message = (
                    f"{exc}; redis_memory loads its server code once per server: allow this user "
                    "'function|load', or load it as another user with redis_memory.store.LIBRARY"
                )
                raise ServerRefused(message, key=self.key) from exc.__cause__
            raise

    def apply(self, call: list[bytes], steps: list[Step], since: bytes = b"") -> Reply:
        """FCALL of the apply function: the operations of ``steps``, in order, all or none.

        ``call`` is the writer, the expected incarnation, the expiry and the
        author (see lua/apply.lua). Each step's plan gives, for every
        container the operation may remove, the change count it was seen at
        and its keys (for a dict), so the script can delete whole subtrees
        without scanning the hash, and refuses to remove one changed since.
        None lets the script read them from the hash itself: O(size of the
        memory), and never stale. O(1) fields for item operations.

        ``since``, for a single step: the version stamp of the caller's
        replica. If others' changes came before this one, the reply carries
        what changed since (``Reply.delta``), which saves the caller a sync.
        """
        publisher = self.publisher()
        head = self._call_heads.get((*call, publisher, len(steps)))
        if head is None:
            if len(self._call_heads) > 16:  # a few incarnations and batch sizes at most
                self._call_heads.clear()
            head = resp_args([*call, publisher, b"%d" % len(steps)])
            self._call_heads[(*call, publisher, len(steps))] = head
        tail, tail_count = [head], len(call) + 2
        for step in steps:
            seq, token, name, nid, birth = b"%d" % step.seq, step.token, step.name, step.nid, step.birth
            created = step.created
            tail.append(
                _STEP_HEAD % (len(seq), seq, len(token), token, len(name), name, len(nid), nid, len(birth), birth)
            )
            tail.append(resp_args([b"%d" % len(created), *created]) if created else _NONE_CREATED)
            if step.plan:
                plan: list[bytes] = []
                for node, (mod, keys) in step.plan.items():
                    plan += [node, b"%d" % mod, b"%d" % len(keys), *keys]
                tail.append(resp_args([b"%d" % len(plan), *plan]))
                tail_count += len(plan)
            else:
                tail.append(_EMPTY_PLAN if step.plan is not None else _SERVER_PLAN)
            count = b"%d" % step.args[1]
            tail.append(b"$%d\r\n%s\r\n%s" % (len(count), count, step.args[0]))
            tail_count += 8 + len(created) + step.args[1]
        if since and len(steps) == 1:
            tail.append(b"$%d\r\n%s\r\n" % (len(since), since))
            tail_count += 1
            hints = steps[0].hints
            if hints:
                tail.append(resp_args(list(hints)))
                tail_count += len(hints)
        packed_tail = (b"".join(tail), tail_count)
        replicas, timeout_ms = self.replicas
        wait = resp_command(("WAIT", replicas, timeout_ms)) if replicas else b""
        tracker, on_first = self.tracker, None
        if tracker is not None:
            key, before = self._key_bytes, tracker.mark(self._key_bytes)

            def on_first(reply: object) -> None:
                # Read before anything after it: if the call modified the hash and
                # no other invalidation of it came first, the next one is its own.
                if isinstance(reply, list) and len(reply) > 5 and reply[5] == b"1":
                    tracker.expect(key, before)

        # On a tracked connection the function reads the hash last, so that the server tracks it still.
        tracked = "" if tracker is None else "_tracked"
        try:
            raw = self._fcall("apply" + tracked, self.keys + self.companions, [], packed_tail, wait, on_first)
        except ServerRefused as exc:
            # A server out of memory refuses writes; one that only removes relieves it.
            if "OOM" not in str(exc) or any(step.name not in _REMOVALS for step in steps):
                raise
            raw = self._fcall("apply_oom" + tracked, self.keys + self.companions, [], packed_tail, wait, on_first)
        finally:
            # Other memories of this process on the key learn of the write here.
            self.written = None if tracker is None else tracker.wrote(key, before)
            wrote_elsewhere(self._key_bytes, tracker)
        try:
            return self._reply(raw, len(steps), replicas, timeout_ms)
        except (IndexError, TypeError, ValueError, AttributeError, UnicodeDecodeError):
            raise self._garbled("the apply function", raw) from None

    def _reply(self, raw: Any, steps: int, replicas: int, timeout_ms: int) -> Reply:
        """The apply function's reply ``raw`` read; IndexError, TypeError or ValueError if Redis sends none such."""
        if replicas:
            raw, acknowledged = raw
            if raw[0] in (b"ok", b"dup") and int(acknowledged) < replicas:
                message = (
                    f"{acknowledged} of the {replicas} replicas asked for confirmed a write to {self.key} within"
                    f" {timeout_ms} ms: it is kept queued until they do"
                )
                raise NotReplicated(message, key=self.key)
        if not isinstance(raw, list) or len(raw) < 7 or not all(isinstance(part, bytes) for part in raw[:6]):
            raise ValueError("not an apply reply")
        first = int(raw[3]) if raw[3] else None
        if steps == 1:  # no 'refused' and 'per-operation' slots
            found = raw[6]
            delta = _sync(found) if found else None
            return Reply(raw[0].decode(), raw[1], raw[2], first, raw[4], raw[7:], delta=delta)
        failed = int(raw[6]) if raw[6] else None
        return Reply(raw[0].decode(), raw[1], raw[2], first, raw[4], raw[8:], failed, raw[7].split())

    def _garbled(self, what: str, reply: object) -> ConnectionFailed:
        """For a reply to ``what`` that Redis never sends: the connection is closed (it may be out of step)."""
        self.channel.close()
        message = f"the reply to {what} on {self.key} is none Redis sends ({reply!r:.60}); the connection was closed"
        return ConnectionFailed(message, key=self.key)

    def publisher(self) -> bytes:
        """The command the server code publishes changes with: SPUBLISH on a cluster (sharded pub/sub), else PUBLISH."""
        return b"SPUBLISH" if self.channel.is_cluster() else b"PUBLISH"

    def version(self) -> tuple[bytes, bytes]:
        """HMGET of the version stamp and incarnation: the O(1) freshness check."""
        reply = self._call_packed(self._version_command)
        if not (isinstance(reply, list) and len(reply) == 2 and all(_bulk_or_nil(part) for part in reply)):
            raise self._garbled("HMGET", reply)
        v, inc = reply
        return (v or b""), (inc or b"")

    def sync(self, stamp: bytes, incarnation: bytes) -> Sync:
        """FCALL of the sync function: O(fields changed since version ``stamp``)."""
        raw = self._fcall("sync", self.keys[:1], [stamp or b"0", incarnation])
        try:
            return _sync(raw)
        except (IndexError, TypeError, ValueError, AttributeError, UnicodeDecodeError):
            raise self._garbled("the sync function", raw) from None

    def read_all(self) -> dict[bytes, bytes]:
        """HGETALL: O(size of the memory)."""
        reply = self._call("HGETALL", self.key)
        resp2 = not getattr(self.channel, "resp3", True)
        if resp2 and isinstance(reply, list) and len(reply) % 2 == 0 and all(isinstance(p, bytes) for p in reply):
            it = iter(reply)  # RESP2 answers a flat list (RESP3 a map: a list there, even empty, is none)
            return dict(zip(it, it, strict=True))
        if isinstance(reply, dict) and all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in reply.items()):
            return cast(dict[bytes, bytes], reply)
        # Taken for an empty memory, such a reply would invite a write over the real data.
        raise self._garbled("HGETALL", reply)

    def delete(
        self,
        author: bytes = b"",
        idle_ms: int | None = None,
        keys: tuple[str, ...] = (),
        hashes: int = 1,
        participants: tuple[str, int] | None = None,
    ) -> int:
        """DEL of the memory's keys (and ``keys``): O(size); if it existed, a ``clear`` on the change feed.

        With ``idle_ms``, only if none of the first ``hashes`` keys changed in
        that long (server time): -1 if one did. With ``participants`` (a set's
        key and size), only if that set (deleted too) still has that many
        members: -2 if not. Nothing is deleted then; else the keys deleted.
        """
        idle = b"" if idle_ms is None else b"%d" % idle_ms
        all_keys = (*self.keys[:1], *keys, *self.keys[1:])
        count = b""
        if participants is not None:
            all_keys, count = (*all_keys, participants[0]), b"%d" % participants[1]
        try:
            return self._integer(
                "the delete function",
                self._fcall("delete", all_keys, [author, idle, b"%d" % hashes, count, self.publisher()]),
            )
        finally:
            self._changed()

    def expire(self, milliseconds: int | None) -> None:
        """PEXPIRE (or PERSIST, for None) of each of the memory's keys: O(1).

        A companion's expiry is only extended (or removed), never shortened:
        other memories may outlive this one.
        """
        try:
            for key in self.keys:
                if milliseconds is None:
                    self._call("PERSIST", key)
                else:
                    self._call("PEXPIRE", key, milliseconds)
            for key in self.companions:
                if milliseconds is None:
                    self._call("PERSIST", key)
                elif 0 <= self._integer("PTTL", self._call("PTTL", key)) < milliseconds:
                    self._call("PEXPIRE", key, milliseconds)
        finally:
            self._changed()  # after the writes: a mark taken before them must not survive them

    def activity(self) -> tuple[int | None, int | None]:
        """HMGET of the creation and last-change times (ms since the epoch): O(1)."""
        reply = self._call("HMGET", self.key, "tc", "ta")
        if not (isinstance(reply, list) and len(reply) == 2 and all(_bulk_or_nil(part) for part in reply)):
            raise self._garbled("HMGET", reply)
        created, active = reply
        return self._time(b"tc", created), self._time(b"ta", active)

    def _time(self, field: bytes, raw: bytes | None) -> int | None:
        if raw is None:
            return None
        if not raw.isdigit():
            message = f"corrupt data in {self.key} field {field!r}: not a time: {raw[:40]!r}"
            raise CorruptData(message, key=self.key, field=field)
        return int(raw)

    def size(self) -> tuple[int, int]:
        """MEMORY USAGE of the memory's keys (else their stored bytes), and HLEN: O(size) at most."""
        fields = self._integer("HLEN", self._call("HLEN", self.key))
        try:
            used = sum(
                self._integer("MEMORY USAGE", self._call("MEMORY", "USAGE", key, "SAMPLES", "0") or 0)
                for key in self.keys
            )
        except ServerRefused:  # fakeredis has no MEMORY command
            stored = self.read_all()
            used = sum(len(f) + len(v) for f, v in stored.items())
        return used, fields

    def remaining(self) -> int:
        """PTTL of the hash: milliseconds left, -1 without expiry, -2 if it does not exist."""
        return self._integer("PTTL", self._call("PTTL", self.key))

    def _integer(self, what: str, reply: object) -> int:
        """``reply``, an integer reply to ``what``; else the connection is out of step (closed), ConnectionFailed."""
        if not isinstance(reply, int) or isinstance(reply, bool):
            raise self._garbled(what, reply)
        return reply

    def ping(self) -> None:
        """PING: raises ConnectionFailed unless the server answers."""
        self._call("PING")
