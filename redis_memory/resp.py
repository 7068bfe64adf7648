"""The wire format: commands in RESP, and replies read from a socket.

A :class:`~redis_memory.connection.Channel` writes commands packed here
and reads each reply with a reader of its socket: :class:`HiredisReader`
(hiredis's parser, in C) where the ``hiredis`` package is installed
(``pip install 'redis-memory[hiredis]'``), else :class:`SocketReader`
(in Python). Both give the same values: bytes for strings, int, float,
bool, None, lists (a set too), dicts, and an error reply as a
``redis.ResponseError`` returned, not raised (``NoScriptError`` for a
function the server lacks). A RESP3 push before a reply (an invalidation
on a tracked connection, see tracking.py) goes to the reader's
``on_push``. One difference stays: RESP3 attributes (which no command of
the library gets; Redis sends them only to ``DEBUG PROTOCOL attrib``) are
dropped by the Python reader and returned by hiredis as a reply of their own.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable
from typing import Any

import redis

try:
    import hiredis
except ImportError:  # the Python reader then
    hiredis = None  # type: ignore[assignment]

#: How a server answers an FCALL of a function it does not have.
MISSING_FUNCTION = "Function not found"

Push = Callable[[list[object]], None]


def error_reply(message: str) -> redis.ResponseError:
    """The error an error reply is (returned by the readers, raised by the caller)."""
    missing = message.startswith(MISSING_FUNCTION) or message[4:].startswith(MISSING_FUNCTION)
    return (redis.exceptions.NoScriptError if missing else redis.ResponseError)(message)


def _readable(sock: socket.socket, poller: Any) -> bool:
    """Whether the socket has bytes waiting (a poll that does not wait)."""
    if poller is None:
        return bool(select.select([sock], [], [], 0)[0])
    return bool(poller.poll(0))


def _poller(sock: socket.socket) -> Any:
    if not hasattr(select, "poll"):  # Windows: select() then
        return None
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return poller


def resp_command(
    args: tuple[bytes | str | int, ...] | list[bytes],
    head: bytes = b"",
    head_count: int = 0,
    tail: bytes = b"",
    tail_count: int = 0,
) -> bytes:
    """A command in the RESP wire format (what redis-py's pack_command makes, cheaper).

    ``head`` and ``tail`` are arguments already in RESP form, ``head_count``
    and ``tail_count`` of them, sent before and after ``args``.
    """
    parts = [b"*%d\r\n" % (len(args) + head_count + tail_count), head]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    parts.append(tail)
    return b"".join(parts)


def resp_args(args: list[bytes]) -> bytes:
    """Arguments in RESP form, to send inside a command (see :func:`resp_command`)."""
    return b"".join([b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args])


class SocketReader:
    """Replies parsed in Python from a buffered socket, knowing whether anything is waiting (see :meth:`pending`).

    ``on_push`` (a tracked connection's, see tracking.py) is called for every
    RESP3 push met before a reply.
    """

    __slots__ = ("buffer", "on_push", "poller", "position", "sock")

    def __init__(self, sock: socket.socket, on_push: Push | None = None) -> None:
        self.sock = sock
        self.buffer = b""  # bytes, not a bytearray: a line is then one slice, one copy
        self.position = 0
        self.poller = _poller(sock)
        self.on_push = on_push

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise redis.ConnectionError("connection closed by the server")
        self.buffer = self.buffer[self.position :] + chunk if self.position < len(self.buffer) else chunk
        self.position = 0

    def readline(self) -> bytes:
        end = self.buffer.find(b"\n", self.position)
        while end < 0:
            searched = len(self.buffer) - self.position
            self._fill()
            end = self.buffer.find(b"\n", searched)
        line = self.buffer[self.position : end + 1]
        self.position = end + 1
        return line

    def read(self, size: int) -> bytes:
        buffered = len(self.buffer) - self.position
        if buffered < size:
            # A large bulk string: its chunks are joined once, never appended
            # to the buffer one by one (that copies the string once per chunk).
            chunks, missing = [self.buffer[self.position :]], size - buffered
            while missing > 0:
                chunk = self.sock.recv(max(65536, min(missing, 1 << 22)))
                if not chunk:
                    raise redis.ConnectionError("connection closed by the server")
                chunks.append(chunk)
                missing -= len(chunk)
            self.buffer, self.position = b"".join(chunks), 0
        data = self.buffer[self.position : self.position + size]
        self.position += size
        return data

    def flat(self) -> list[object] | None:
        """The next reply if it is an array (most are: the functions' replies, HMGET, HGETALL); else None.

        None has read nothing, and :func:`read_reply` parses the reply the
        general way.
        """
        if self.position >= len(self.buffer):
            self._fill()
        buffer, pos = self.buffer, self.position
        end = buffer.find(b"\r\n", pos)
        if end < 0 or buffer[pos] != 42:  # not whole in the buffer, or not '*'
            return None
        count = int(buffer[pos + 1 : end])
        if count < 0:  # *-1, a null array
            return None
        self.position = end + 2
        return self.items(count)

    def items(self, count: int) -> list[object]:
        """The ``count`` elements of an aggregate reply.

        Bulk strings whole in the buffer (nearly all elements) are taken in
        one loop, with no call of this class per element; any other element
        (one that the buffer ends inside, a null, a number, a nested array)
        is parsed the general way.
        """
        items: list[object] = []
        buffer, pos = self.buffer, self.position
        size = len(buffer)
        for _ in range(count):
            end = buffer.find(b"\r\n", pos)
            if end >= 0 and buffer[pos] == 36:  # '$'
                start = end + 2
                stop = start + int(buffer[pos + 1 : end])
                if start <= stop and stop + 2 <= size and buffer.startswith(b"\r\n", stop):
                    items.append(buffer[start:stop])
                    pos = stop + 2
                    continue
            self.position = pos
            items.append(_parse(self.readline(), self))
            buffer, pos = self.buffer, self.position
            size = len(buffer)
        self.position = pos
        return items

    def reply(self) -> object:
        """The next reply (RESP2 or RESP3), after any push before it; an error reply is returned, not raised."""
        try:
            return read_reply(self)
        except (ValueError, TypeError) as exc:  # a length or number that is none, a list as a map key: not RESP
            raise redis.ConnectionError(f"the server sent bytes that are not a reply: {exc}") from exc

    def take_pushes(self) -> None:
        """Hand every push waiting to ``on_push``, without waiting for more; anything else waiting is an error."""
        while self.pending():
            line = self.readline()
            if line[:1] != b">" or not line.endswith(b"\r\n"):
                raise redis.ConnectionError(f"unexpected data on a tracked connection: {line[:40]!r}")
            try:
                items = self.items(int(line[1:-2]))
            except ValueError as exc:
                raise redis.ConnectionError(f"unexpected data on a tracked connection: {line[:40]!r}") from exc
            if self.on_push is not None:
                self.on_push(items)

    def pending(self) -> bool:
        """Whether bytes are waiting: in the buffer, or on the socket (a poll that does not wait)."""
        if self.position < len(self.buffer):
            return True
        return _readable(self.sock, self.poller)

    def close(self) -> None:
        self.buffer = b""
        self.position = 0


def read_reply(reader: SocketReader) -> object:
    """Read one RESP2 or RESP3 reply in Python; an error reply is returned, not raised."""
    while True:
        found = reader.flat()
        if found is not None:
            return found
        line = reader.readline()
        if line[:1] not in (b">", b"|") or not line.endswith(b"\r\n"):
            return _parse(line, reader)
        # Out-of-band data (a push, or attributes) before the reply, taken in a
        # loop: a tracked connection may hold thousands of invalidations.
        _out_of_band(line, reader)


def _out_of_band(line: bytes, reader: SocketReader) -> None:
    """A push (to ``on_push``: a tracked connection's invalidations, see tracking.py) or attributes (dropped)."""
    kind = line[:1]
    items = reader.items(int(line[1:-2]) * (2 if kind == b"|" else 1))
    if kind == b">" and reader.on_push is not None:
        reader.on_push(items)


def _null(size: int) -> None:
    """RESP2's null (a length of -1); any other negative length is no reply."""
    if size != -1:
        raise redis.ConnectionError(f"a length of {size} in a reply")


def _parse(line: bytes, reader: SocketReader) -> object:
    if not line.endswith(b"\r\n"):
        raise redis.ConnectionError("connection closed by the server")
    kind, rest = line[:1], line[1:-2]
    if kind == b"$" or kind == b"=":
        size = int(rest)
        if size < 0:
            _null(size)
            return None
        data = reader.read(size + 2)
        if len(data) != size + 2:
            raise redis.ConnectionError("connection closed by the server")
        if not data.endswith(b"\r\n") or (kind == b"=" and data[3:4] != b":"):
            raise redis.ConnectionError(f"a malformed {kind.decode()} reply")
        return data[4:-2] if kind == b"=" else data[:-2]
    if kind in (b"*", b"~", b"%"):
        size = int(rest)
        if size < 0:
            _null(size if kind == b"*" else -2)  # RESP3's sets and maps have no null
            return None
        items = reader.items(size * 2 if kind == b"%" else size)
        if kind == b"%":
            it = iter(items)
            return dict(zip(it, it, strict=False))
        return items
    if kind == b":":
        return int(rest)
    if kind == b"+":
        return rest
    if kind == b"_" and not rest:
        return None
    if kind == b"-":
        return error_reply(rest.decode(errors="replace"))
    if kind == b",":
        return float(rest)
    if kind == b"#" and rest in (b"t", b"f"):
        return rest == b"t"
    if kind == b"(" and rest.lstrip(b"-").isdigit():  # a big number, as hiredis gives it
        return rest
    if kind in (b">", b"|"):
        # Out-of-band data inside an aggregate: the element follows.
        _out_of_band(line, reader)
        return _parse(reader.readline(), reader)
    raise redis.ConnectionError(f"unexpected reply type {kind!r}")


#: What hiredis's parser answers while a reply is not whole yet (not False: a RESP3 boolean).
_INCOMPLETE = object()


def _hiredis_parser() -> Any:
    # Bytes that are not RESP (a peer that is not Redis) are a broken connection, as in SocketReader.
    return hiredis.Reader(protocolError=redis.ConnectionError, replyError=error_reply, notEnoughData=_INCOMPLETE)


class HiredisReader:
    """Replies parsed by hiredis (in C) from a socket: what :class:`SocketReader` reads, for less CPU per reply."""

    __slots__ = ("on_push", "parser", "poller", "sock")

    def __init__(self, sock: socket.socket, on_push: Push | None = None) -> None:
        self.sock = sock
        self.parser = _hiredis_parser()
        self.poller = _poller(sock)
        self.on_push = on_push

    def _next(self) -> object:
        parser = self.parser
        try:
            found = parser.gets()
            while found is _INCOMPLETE:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise redis.ConnectionError("connection closed by the server")
                parser.feed(chunk)
                found = parser.gets()
        except TypeError as exc:  # a list as a map key or a set member: no server sends that
            raise redis.ConnectionError(f"the server sent bytes that are not a reply: {exc}") from exc
        return found

    def reply(self) -> object:
        """The next reply, after any push before it; an error reply is returned, not raised."""
        found = self._next()
        while isinstance(found, hiredis.PushNotification):
            if self.on_push is not None:
                self.on_push(list(found))
            found = self._next()
        return found

    def take_pushes(self) -> None:
        """Hand every push waiting to ``on_push``, without waiting for more; anything else waiting is an error."""
        while self.pending():
            found = self._next()
            if not isinstance(found, hiredis.PushNotification):
                raise redis.ConnectionError(f"unexpected data on a tracked connection: {found!r:.40}")
            if self.on_push is not None:
                self.on_push(list(found))

    def pending(self) -> bool:
        """Whether bytes are waiting: in the parser, or on the socket."""
        return bool(self.parser.has_data()) or _readable(self.sock, self.poller)

    def close(self) -> None:
        self.parser = _hiredis_parser()


#: The parser of the replies on connections opened from now on: "hiredis" where it is installed, else "python".
parser = "python" if hiredis is None else "hiredis"


#: Either reader: what a channel reads its connection's replies with.
Reader = SocketReader | HiredisReader


def reader(sock: socket.socket, on_push: Push | None = None) -> Reader:
    """A reader of ``sock``'s replies, with :data:`parser`."""
    return HiredisReader(sock, on_push) if parser == "hiredis" else SocketReader(sock, on_push)
