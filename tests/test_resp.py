"""The two reply readers (hiredis's parser and the one in Python) read the same values from the same bytes.

Where hiredis is installed (the test extra installs it), memories read
with it; so the tests imported at the end of this module run again here
with the Python reader, on every backend.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from redis_memory import ConversationMemory, resp
from redis_memory.resp import HiredisReader, SocketReader

pytestmark = pytest.mark.skipif(resp.hiredis is None, reason="hiredis is not installed")

PUSH = b">2\r\n$10\r\ninvalidate\r\n*2\r\n$3\r\nk:1\r\n$3\r\nk:2\r\n"
FLUSH_PUSH = b">2\r\n$10\r\ninvalidate\r\n_\r\n"
#: Replies of every kind a server sends, each as bytes.
REPLIES = [
    b"+OK\r\n",
    b"-ERR unknown command\r\n",
    b"-ERR Function not found\r\n",
    b"-NOSCRIPT No matching script\r\n",
    b":42\r\n",
    b":-7\r\n",
    b"$-1\r\n",
    b"$0\r\n\r\n",
    b"$6\r\na\r\nb\x00c\r\n",
    b"$%d\r\n%s\r\n" % (200_000, b"\xc1" * 200_000),
    b"*-1\r\n",
    b"*0\r\n",
    b"*3\r\n$2\r\nok\r\n$-1\r\n*2\r\n:1\r\n-ERR inner\r\n",
    b"*7\r\n$2\r\nok\r\n$5\r\n2 abc\r\n$3\r\ninc\r\n$0\r\n\r\n$5\r\n1 abc\r\n$1\r\n1\r\n$0\r\n\r\n",
    b"_\r\n",
    b"#t\r\n",
    b"#f\r\n",
    b",1.5\r\n",
    b"%2\r\n+a\r\n:1\r\n$1\r\nb\r\n*1\r\n:2\r\n",
    b"~2\r\n:1\r\n:2\r\n",
    b"=8\r\ntxt:abcd\r\n",
    b"*2\r\n$" + b"%d\r\n" % 70_000 + b"y" * 70_000 + b"\r\n$1\r\nz\r\n",
    b"(12345678901234567890123\r\n",
]


class Chunks:
    """A socket whose recv hands out the given chunks, one per call (at most what was asked)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.read_end, self.write_end = os.pipe()  # a file descriptor to poll, never readable

    def recv(self, size: int) -> bytes:
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        if len(chunk) > size:
            chunk, rest = chunk[:size], chunk[size:]
            self.chunks.insert(0, rest)
        return chunk

    def fileno(self) -> int:
        return self.read_end

    def close(self) -> None:
        os.close(self.read_end)
        os.close(self.write_end)


def plain(value: Any) -> Any:
    """A reply as comparable data: an error as its class and message."""
    if isinstance(value, redis.ResponseError):
        return (type(value).__name__, str(value))
    if isinstance(value, list):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {plain(key): plain(item) for key, item in value.items()}
    return (type(value).__name__, value)


def read_all(kind: type[SocketReader] | type[HiredisReader], chunks: list[bytes], count: int) -> tuple[Any, Any]:
    sock = Chunks(chunks)
    pushes: list[Any] = []
    try:
        reader = kind(sock, pushes.append)  # type: ignore[arg-type]
        replies = [plain(reader.reply()) for _ in range(count)]
        return replies, [plain(push) for push in pushes]
    finally:
        sock.close()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@given(
    order=st.permutations(range(len(REPLIES))),
    pushes=st.lists(st.booleans(), min_size=len(REPLIES), max_size=len(REPLIES)),
    cuts=st.lists(st.integers(min_value=0, max_value=10**7), max_size=40),
)
def test_both_readers_read_the_same_replies_whatever_the_chunks(
    order: list[int], pushes: list[bool], cuts: list[int]
) -> None:
    """Every kind of reply, pushes before some, cut into chunks anywhere: the same values, the same pushes."""
    data = b"".join((PUSH if push else b"") + REPLIES[i] for i, push in zip(order, pushes, strict=True))
    chunks = split(data, cuts)
    python = read_all(SocketReader, chunks, len(order))
    assert read_all(HiredisReader, chunks, len(order)) == python
    replies, seen = python
    assert replies[order.index(2)] == ("NoScriptError", "ERR Function not found")
    assert len(seen) == sum(pushes)


@pytest.mark.parametrize("kind", [SocketReader, HiredisReader])
def test_thousands_of_pushes_before_a_reply_are_all_taken(kind: Any) -> None:
    """A tracked connection may hold an invalidation per key it read: the reply after them is read all the same."""
    replies, pushes = read_all(kind, [PUSH * 5000 + b"+OK\r\n"], 1)
    assert replies == [("bytes", b"OK")]
    assert len(pushes) == 5000


def test_a_reply_cut_short_by_the_server_closing_is_a_connection_error() -> None:
    for kind in (SocketReader, HiredisReader):
        sock = Chunks([b"*2\r\n$3\r\nab"])
        try:
            with pytest.raises(redis.ConnectionError):
                kind(sock).reply()  # type: ignore[arg-type]
        finally:
            sock.close()


@pytest.mark.parametrize("kind", [SocketReader, HiredisReader])
@pytest.mark.parametrize(
    "data",
    [b"garbage\r\n", b"\x00\x01\x02\r\n", b"$-5\r\n", b"*-7\r\n", b":x\r\n", b"(abc\r\n", b"#x\r\n", b"_x\r\n",
     b"=3\r\nabc\r\n", b":1.5\r\n", b"%1\r\n*1\r\n:1\r\n:2\r\n"],
)  # fmt: skip
def test_bytes_that_are_not_a_reply_are_a_connection_error(kind: Any, data: bytes) -> None:
    """Whatever a peer that is not Redis sends, both readers raise redis.ConnectionError: the channel then closes."""
    sock = Chunks([data])
    try:
        with pytest.raises(redis.ConnectionError):
            kind(sock).reply()
    finally:
        sock.close()


@pytest.mark.parametrize("data", [b"$3\r\nabcXY\r\n", b"*1\r\n$3\r\nabcXY\r\n", b"~-1\r\n", b"%-1\r\n"])
def test_the_python_reader_checks_what_hiredis_lets_pass(data: bytes) -> None:
    """A bulk string's terminator, and no null set or map: the Python reader refuses these (hiredis does not)."""
    sock = Chunks([data])
    try:
        with pytest.raises(redis.ConnectionError):
            SocketReader(sock).reply()  # type: ignore[arg-type]
    finally:
        sock.close()


@pytest.mark.parametrize("kind", [SocketReader, HiredisReader])
def test_take_pushes_hands_over_what_waits_and_refuses_anything_else(kind: Any) -> None:
    import socket

    left, right = socket.socketpair()
    try:
        pushes: list[Any] = []
        reader = kind(left, pushes.append)
        assert not reader.pending()
        right.sendall(PUSH + FLUSH_PUSH)
        reader.take_pushes()
        assert pushes == [[b"invalidate", [b"k:1", b"k:2"]], [b"invalidate", None]]
        assert not reader.pending()
        right.sendall(b"+OK\r\n")
        with pytest.raises(redis.ConnectionError, match="unexpected data"):
            reader.take_pushes()
    finally:
        left.close()
        right.close()


@pytest.mark.parametrize("parser", ["python", "hiredis"])
def test_memories_read_with_either_parser(parser: str, real_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes, a tracked reader's invalidations, a full load and the server code lost and loaded again."""
    monkeypatch.setattr(resp, "parser", parser)
    client = redis.Redis.from_url(real_url)
    writer = ConversationMemory("either", client=client)
    writer.messages = [{"role": "user", "content": str(i)} for i in range(2000)]
    reader = ConversationMemory("either", client=redis.Redis.from_url(real_url), tracking=True)
    assert len(reader.messages) == 2000
    assert (
        type(reader._rm.store.channel.reader).__name__ == {"python": "SocketReader", "hiredis": "HiredisReader"}[parser]
    )
    writer.messages.append({"role": "assistant", "content": "last"})
    writer.title = "t"
    deadline = time.monotonic() + 5
    while (reader.messages[-1]["content"], getattr(reader, "title", None)) != ("last", "t"):
        assert time.monotonic() < deadline, "the tracked reader never saw the writes"
        time.sleep(0.01)
    assert reader.messages[-1] == {"role": "assistant", "content": "last"}
    assert reader.title == "t"
    if client.info("cluster").get("cluster_enabled") != 1:
        client.function_flush()
        writer.messages.append({"role": "user", "content": "after the flush"})
        fresh = ConversationMemory("either", client=redis.Redis.from_url(real_url))
        assert fresh.messages[-1] == {"role": "user", "content": "after the flush"}
        fresh.close()
    reader.close()
    writer.close()


@pytest.fixture(autouse=True)
def python_parser(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test of this module reads with the Python parser, unless it picks one itself."""
    monkeypatch.setattr(resp, "parser", "python")
    yield


# Run again here, with the Python parser.
from test_connection import (  # noqa: E402
    test_memories_work_where_select_has_no_poll,
    test_reading_a_large_value_takes_time_in_proportion_to_its_size,
)
from test_store import (  # noqa: E402
    test_a_write_after_others_changes_brings_them_in_its_own_reply,
    test_reader_catches_up_through_the_journal,
    test_the_server_code_is_loaded_again_when_the_server_lost_it,
)
from test_tracking import (  # noqa: E402
    test_a_killed_tracked_connection_falls_back_to_the_version_check,
    test_a_read_after_the_invalidation_arrived_is_fresh,
    test_an_invalidation_taken_in_by_another_thread_during_a_write_is_not_lost,
    test_flushall_invalidates_everything,
    test_read_your_writes_with_no_extra_round_trip,
    test_tracking_table_overflow_evicts_into_invalidations,
)

__all__ = [
    "test_a_killed_tracked_connection_falls_back_to_the_version_check",
    "test_a_read_after_the_invalidation_arrived_is_fresh",
    "test_a_write_after_others_changes_brings_them_in_its_own_reply",
    "test_an_invalidation_taken_in_by_another_thread_during_a_write_is_not_lost",
    "test_flushall_invalidates_everything",
    "test_memories_work_where_select_has_no_poll",
    "test_read_your_writes_with_no_extra_round_trip",
    "test_reader_catches_up_through_the_journal",
    "test_reading_a_large_value_takes_time_in_proportion_to_its_size",
    "test_the_server_code_is_loaded_again_when_the_server_lost_it",
    "test_tracking_table_overflow_evicts_into_invalidations",
]
