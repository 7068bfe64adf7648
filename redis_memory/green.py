"""The sync core, run on the event loop: a greenlet whose socket waits are awaited.

An async memory's call (aio.py) runs the unchanged sync code in a
:class:`Driven` greenlet on the loop's thread. Where that code would block on
the network, :class:`Wire` (the channel's socket, made non-blocking for the
exchange) switches to the awaiting task, which waits for the socket on the
loop (``add_reader``/``add_writer``) and switches back. The rare step that
cannot be made to wait this way (opening a connection: redis-py connects and
shakes hands blocking) runs on a thread of its own, awaited (:func:`offload`).

So the event loop never blocks on the network, and there is still one
implementation of operations, replica, queue and feed. A call started here
runs to its end even if the awaiting task is cancelled meanwhile (the task
is told once it has), as a call handed to a worker thread does.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from greenlet import GreenletExit, getcurrent, greenlet

T = TypeVar("T")

# What a driven greenlet asks of the task driving it: (kind, argument, timeout); and (_DONE, result, error).
_READ, _WRITE, _TURN, _OFFLOAD, _DONE = range(5)
#: How long a call waiting for a lock looks again anyway (seconds), should a wake-up be lost.
TURN_CHECK = 0.05
#: Idle greenlets kept per thread for the next calls (starting a new greenlet costs as much as 7 µs).
IDLE_KEPT = 32


class Driven(greenlet):  # type: ignore[misc]  # greenlet ships no annotations for subclassing
    """A greenlet running sync calls for awaiting tasks, one at a time; ``owner`` is what it runs for (a core).

    ``caller`` is the greenlet of the task driving it now: every wait it asks for goes there.
    """

    owner: object = None
    caller: Any = None


def driving(owner: object) -> bool:
    """Whether this code runs in a driven greenlet, for ``owner`` (any owner when None)."""
    current = getcurrent()
    return type(current) is Driven and (owner is None or current.owner is owner)


def _ask(kind: int, argument: Any, timeout: float | None) -> Any:
    return getcurrent().caller.switch((kind, argument, timeout))


def _serve(call: Callable[[], Any]) -> None:
    """The life of a :class:`Driven` greenlet: each call handed to it, its outcome handed back."""
    while True:
        outcome: tuple[int, Any, BaseException | None]
        try:
            outcome = (_DONE, call(), None)
        except GreenletExit:
            raise
        except BaseException as exc:  # handed to the awaiting task, which raises it
            outcome = (_DONE, None, exc)
        call = None  # type: ignore[assignment]  # not kept alive while idle
        current = getcurrent()
        current.owner = None
        call = current.caller.switch(outcome)


_idle = threading.local()


def wait(sock: socket.socket, write: bool, timeout: float | None) -> bool:
    """In a driven greenlet: until ``sock`` is readable (writable); False once ``timeout`` passed first."""
    return bool(_ask(_WRITE if write else _READ, sock.fileno(), timeout))


class Turns:
    """The driven calls waiting for a thread lock that another command holds, woken one at a time.

    A call that finds the lock taken queues a future of its loop here and
    awaits it; whoever releases the lock (any thread) calls :meth:`passed`,
    which wakes the first. The wait is bounded by :data:`TURN_CHECK` too, so
    a wake-up lost to a race only delays a call.
    """

    def __init__(self) -> None:
        # Weakly: a call whose task is let go of must not be kept alive by its place in the queue.
        self.waiting: deque[tuple[asyncio.AbstractEventLoop, weakref.ref[asyncio.Future[bool]]]] = deque()

    def take(self, lock: threading.Lock, end: float | None) -> bool:
        """In a driven greenlet: ``lock`` acquired, waiting on the loop; False if ``end`` (monotonic) came first."""
        while not lock.acquire(False):
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return False
            _ask(_TURN, (self, lock), TURN_CHECK if left is None else min(left, TURN_CHECK))
        return True

    def passed(self) -> None:
        """The lock was released: wake the first call still waiting for it."""
        while self.waiting:
            try:
                loop, ref = self.waiting.popleft()
            except IndexError:  # another thread took the last one
                return
            turn = ref()
            if turn is None or turn.done():
                continue
            try:
                loop.call_soon_threadsafe(_settle, turn, True)
            except RuntimeError:  # its loop is closed: nobody waits there
                continue
            return


def offload(call: Callable[[], T]) -> T:
    """In a driven greenlet: ``call()`` on a thread of its own (blocking work), its result or its exception."""
    found: tuple[Any, BaseException | None] = _ask(_OFFLOAD, call, None)
    result, error = found
    if error is not None:
        raise error
    return result  # type: ignore[no-any-return]


class Wire:
    """A connected socket for one exchange in a driven greenlet: non-blocking, waiting on the loop.

    ``timeout`` bounds each wait, as a socket timeout does (``TimeoutError``).
    The caller restores the socket's own timeout afterwards.
    """

    __slots__ = ("sock", "timeout")

    def __init__(self, sock: socket.socket, timeout: float | None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.timeout = timeout

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view) :]
            except (BlockingIOError, InterruptedError):
                if not wait(self.sock, True, self.timeout):
                    raise TimeoutError("timed out") from None

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, size: int) -> bytes:
        while True:
            try:
                return self.sock.recv(size)
            except (BlockingIOError, InterruptedError):
                if not wait(self.sock, False, self.timeout):
                    raise TimeoutError("timed out") from None


def supported(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop`` can wait for a socket (a proactor loop, on Windows, cannot)."""
    proactor = getattr(asyncio, "ProactorEventLoop", None)
    return proactor is None or not isinstance(loop, proactor)


async def drive(call: Callable[[], T], owner: object) -> T:
    """``call()`` in a driven greenlet on this loop's thread, its socket waits awaited; its result or exception."""
    loop = asyncio.get_running_loop()
    idle: list[Driven] = _idle.__dict__.setdefault("runners", [])
    runner = idle.pop() if idle else Driven(_serve)
    runner.owner, runner.caller = owner, getcurrent()
    runner.gr_context = contextvars.copy_context()
    cancelled = False
    request = runner.switch(call)
    try:
        while request[0] != _DONE:
            request, cancelled = await _answer(loop, runner, request, cancelled)
    except GeneratorExit:
        # The task was let go of unfinished (its loop closed without cancelling it): the call
        # cannot be awaited to its end. Unwound where it waits, it leaves its connection closed,
        # its lock free and a write queued for the reconnect thread to replay.
        _unwind(runner)
        raise
    _, result, error = request
    runner.caller = None
    if len(idle) < IDLE_KEPT:
        idle.append(runner)
    if cancelled:
        raise asyncio.CancelledError
    if error is not None:
        raise error
    return result  # type: ignore[no-any-return]


def _unwind(runner: Driven) -> None:
    """End a call whose driver can await no more: each wait it is in fails as a lost link does."""
    with contextlib.suppress(Exception):  # (another thread, say, where it cannot be resumed)
        for _ in range(5):
            if runner.dead:
                return
            runner.caller = getcurrent()
            request = runner.throw(TimeoutError("the event loop driving this call was closed"))
            if request[0] == _DONE:
                return


async def _answer(
    loop: asyncio.AbstractEventLoop, runner: Driven, request: tuple[int, Any, Any], cancelled: bool
) -> tuple[tuple[int, Any, Any], bool]:
    """Serve one request of ``runner``: its next request (or its outcome), and whether the task was cancelled."""
    kind, argument, timeout = request
    answer: Any
    if kind == _OFFLOAD:
        pending = _offload(loop, argument)
        while True:
            try:
                answer = await asyncio.shield(pending)
                break
            except asyncio.CancelledError:
                cancelled = True
    else:
        try:
            answer = await _wait(loop, kind, argument, timeout)
        except asyncio.CancelledError:
            # The call goes on to its end (its change may be on the wire already):
            # the wait is answered as a spurious wake-up, and the socket is tried again.
            cancelled = True
            answer = True
    return runner.switch(answer), cancelled


async def _wait(loop: asyncio.AbstractEventLoop, kind: int, argument: Any, timeout: float | None) -> Any:
    ready: asyncio.Future[bool] = loop.create_future()
    if kind == _TURN:
        turns, lock = argument
        turns.waiting.append((loop, weakref.ref(ready)))
        if not lock.locked():  # released before this call queued: no wake-up is coming
            return True
        turn_timer = loop.call_later(timeout or TURN_CHECK, _settle, ready, False)
        try:
            return await ready
        finally:
            turn_timer.cancel()
    add, remove = (loop.add_writer, loop.remove_writer) if kind == _WRITE else (loop.add_reader, loop.remove_reader)
    add(argument, _settle, ready, True)
    timer = None if timeout is None else loop.call_later(timeout, _settle, ready, False)
    try:
        return await ready
    finally:
        remove(argument)
        if timer is not None:
            timer.cancel()


def _settle(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


def _offload(loop: asyncio.AbstractEventLoop, call: Callable[[], Any]) -> asyncio.Future[Any]:
    """``call()`` on a thread started for it: a future of its (result, error), settled on the loop."""
    done: asyncio.Future[tuple[Any, BaseException | None]] = loop.create_future()

    def settle(outcome: tuple[Any, BaseException | None]) -> None:
        if not done.done():
            done.set_result(outcome)

    def run() -> None:
        outcome: tuple[Any, BaseException | None]
        try:
            outcome = (call(), None)
        except BaseException as exc:  # handed back to the greenlet, which raises it
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop was closed meanwhile: nobody waits for it
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=run, name="redis_memory connect", daemon=True).start()
    return done
