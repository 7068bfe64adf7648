"""Async memories: the sync core, run on the event loop with its network waits awaited.

An :class:`AsyncMemory` owns a :class:`~redis_memory.Memory`. Each awaited
call runs the sync code on the loop's thread, in a greenlet whose socket
waits are the loop's (green.py): the loop runs other tasks while a call
waits for Redis, and no network I/O ever blocks it. What cannot wait that
way runs on the memory's worker thread (named ``redis_memory aio <name>``),
awaited: the first call, which builds and loads the memory; TLS, cluster
and fakeredis connections; ``flush``; the feed's subscription; a call that
finds another call of the memory still there. There is one implementation
of operations, replica, queue and feed, the sync one: ids, exactly-once
replay, the offline queue and its spool hold for async code because they
are the same code. The sync memory refuses any call from elsewhere
(:class:`~redis_memory.errors.WrongThread`), so a proxy read from an async
memory cannot be changed on the loop by mistake.

Reads stay attribute-style and are served by the local replica as it is,
without the network: ``await mem.refresh()`` makes it fresh (one version
check, a journal delta if others wrote). Every awaited write also leaves
the replica at least as fresh as the server's reply.

The calls of one memory run one at a time, in the order they were awaited:
a task that awaits its writes one after another keeps its order. A task
cancelled while its call runs does not stop it: a change already started is
made (or queued) all the same, and the task gets its CancelledError.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any, Generic, Self, TypeVar, cast

from . import green
from .errors import MemoryClosed, MissingAttribute, MissingKey, NotLoaded
from .feed import Event, Subscription
from .memory import CLOSE_TIMEOUT, ConversationMemory, Memory, Metadata, Stats
from .queue import Status
from .session import Session

T = TypeVar("T")
M = TypeVar("M", bound=Memory)


class Worker:
    """One thread that runs the calls handed to it, in order; ended by :meth:`stop`.

    Started on the first call (again in a forked child, where threads do not survive).
    """

    def __init__(self, name: str) -> None:
        self.name = f"redis_memory aio {name}"
        self.jobs: queue.SimpleQueue[tuple[Callable[[], Any], Callable[[Any, BaseException | None], None]] | None]
        self.jobs = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.pid = 0
        self.stopped = False
        self.start_lock = threading.Lock()

    def _ensure_started(self) -> threading.Thread:
        with self.start_lock:
            if self.thread is None or self.pid != os.getpid():
                self.jobs = queue.SimpleQueue()
                self.thread = threading.Thread(target=self._run, args=(self.jobs,), name=self.name, daemon=True)
                self.thread.rm_driver = True  # type: ignore[attr-defined]  # memories built on it get its cores
                self.pid = os.getpid()
                self.thread.start()
            return self.thread

    @staticmethod
    def _run(jobs: queue.SimpleQueue[Any]) -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            call, done = job
            # Neither this frame nor the next wait may keep the call (and its memory)
            # alive once the awaiting task has resumed: let go of it before settling.
            job = None
            outcome: Any
            try:
                outcome = (call(), None)
            except BaseException as exc:  # handed to the awaiting task, which raises it
                outcome = (None, exc)
            call = None
            done(*outcome)
            done = outcome = None

    def submit(self, call: Callable[[], T], done: Callable[[Any, BaseException | None], None]) -> None:
        if self.stopped:
            raise MemoryClosed(f"{self.name} was closed")
        self._ensure_started()
        self.jobs.put((call, done))

    async def run(self, call: Callable[[], T], settled: Callable[[], None] | None = None) -> T:
        """``call()`` on the worker thread; its result or its exception, awaited.

        ``settled`` is called on the loop once the call has ended, even if the awaiting task was cancelled.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if settled is not None:
                settled()
            if future.cancelled():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def done(result: Any, error: BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop was closed meanwhile: nobody awaits this
                loop.call_soon_threadsafe(settle, result, error)

        self.submit(call, done)
        return await future

    def call(self, call: Callable[[], T]) -> T:
        """``call()`` on the worker thread, waited for by this (non-async) thread."""
        if threading.current_thread() is self.thread:
            return call()
        finished = threading.Event()
        outcome: list[Any] = []

        def done(result: Any, error: BaseException | None) -> None:
            outcome.extend((result, error))
            finished.set()

        self.submit(call, done)
        finished.wait()
        result, error = outcome
        if error is not None:
            raise error
        return result  # type: ignore[no-any-return]

    def stop_soon(self) -> None:
        """End the thread after the calls handed to it, without waiting."""
        self._stopping()

    def _stopping(self) -> threading.Thread | None:
        """No more calls; the thread (of this process) is told to end after those handed to it."""
        with self.start_lock:
            self.stopped = True
            thread, self.thread = self.thread, None
        if thread is None or self.pid != os.getpid():
            return None
        self.jobs.put(None)
        return thread

    def stop(self) -> None:
        """End the thread once the calls handed to it are done (waits for them, unless called from it)."""
        thread = self._stopping()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    async def stop_async(self) -> None:
        """:meth:`stop` for the event loop: the thread's end is awaited, never waited for on the loop."""
        thread = self._stopping()
        while thread is not None and thread.is_alive():
            await asyncio.sleep(0.001)


class AsyncMemory(Generic[M]):
    """A :class:`~redis_memory.Memory` for asyncio code: awaited writes, attribute reads from the local replica.

    ``AsyncMemory(name, **options)`` takes the options of ``Memory``. The
    memory is built on the worker thread (so that an ``embedded://`` server
    is started and the first connection made off the loop), and loaded by
    the first awaited call:
    ``async with AsyncMemory(...) as mem:`` or ``await mem.refresh()``.
    Reading before that raises :class:`~redis_memory.errors.NotLoaded`.

    States are those of the sync memory (see :class:`~redis_memory.Memory`);
    :meth:`close` also ends the worker thread.
    """

    _rm_name: str
    _rm_worker: Worker
    _rm_memory: M | None
    _rm_own_worker: bool
    _rm_closed: bool
    _rm_running: int
    _rm_loop: weakref.ref[asyncio.AbstractEventLoop] | None
    _rm_build: Callable[[], M]
    _rm_sync_type: type[Memory] = Memory

    def __init__(self, name: str, **options: Any) -> None:
        self._rm_start(name, lambda: cast(M, self._rm_sync_type(name, **options)), Worker(name))

    def _rm_start(self, name: str, build: Callable[[], M], worker: Worker, own_worker: bool = True) -> None:
        self._rm_name = name
        self._rm_worker = worker
        self._rm_memory = None
        self._rm_own_worker = own_worker
        self._rm_closed = False
        #: Calls of this memory running (on the loop or the worker): a new one waits on the worker behind them.
        self._rm_running = 0
        #: The loop of the first call, whose channel the memory uses (None: built by a sync caller).
        self._rm_loop: weakref.ref[asyncio.AbstractEventLoop] | None = None

        def build_here() -> M:
            made = build()
            self._rm_memory = made
            return made

        # Built by the first call handed to the worker, so every later call finds it.
        self._rm_build = build_here
        if own_worker:
            # An async memory let go of without close() ends its thread: nothing could hand it work again.
            weakref.finalize(self, worker.stop_soon)

    @classmethod
    def _rm_wrap(cls, worker: Worker, build: Callable[[], M], name: str) -> Self:
        """An async memory over a sync one ``build`` makes on ``worker`` (shared, not ended by close)."""
        made = cls.__new__(cls)
        made._rm_start(name, build, worker, own_worker=False)
        return made

    def _rm_sync(self) -> M:
        """The sync memory (on the worker thread only): built on first use."""
        found = self._rm_memory
        if found is None:
            # Its channel is that of the loop awaiting this first call (see connection.channel).
            thread = threading.current_thread()
            thread.rm_loop = None if self._rm_loop is None else self._rm_loop()  # type: ignore[attr-defined]
            try:
                found = self._rm_build()
            finally:
                thread.rm_loop = None  # type: ignore[attr-defined]
        elif found._rm.driver is not threading.current_thread():
            found._rm.driver = threading.current_thread()  # a forked child's new worker: the parent's is gone
        return found

    async def run(self, call: Callable[[M], T]) -> T:
        """``call(memory)`` with the sync memory: any sync statement, awaited.

        ``await mem.run(lambda m: m.profile["prefs"].update(tone="formal"))``.
        It runs on the loop's thread, its network waits awaited (see
        green.py), or on the worker thread where they cannot be (the first
        call, TLS, a cluster, fakeredis, a call of this memory still on the
        worker): so it must not block otherwise (no ``time.sleep``). Use only
        plain values from it: proxies are changed only through this memory.
        """
        if self._rm_closed:
            raise MemoryClosed(f"this async memory {self._rm_name!r} was closed")
        memory = self._rm_memory
        if memory is not None and not self._rm_running and not memory._rm.on_loop:
            core = memory._rm
            # Its lock is taken here, not in the greenlet, so that the call (holding it
            # while its replies are awaited) runs alone; a worker holding it sends the call there.
            if (
                core.store.channel.drivable()
                and green.supported(asyncio.get_running_loop())
                and core.lock.acquire(False)
            ):
                self._rm_running += 1
                core.on_loop = True  # another async memory over the same core (a session's) waits too
                holder = threading.get_ident()
                try:
                    return await green.drive(lambda: call(memory), core)
                finally:
                    core.on_loop = False
                    self._rm_running -= 1
                    if threading.get_ident() == holder:  # (not a coroutine collected on another thread)
                        core.lock.release()
        return await self._rm_on_worker(lambda: call(self._rm_sync()))

    async def _rm_blocking(self, call: Callable[[M], T]) -> T:
        """``call(memory)`` on the worker thread always: for calls that block otherwise than on the channel."""
        if self._rm_closed:
            raise MemoryClosed(f"this async memory {self._rm_name!r} was closed")
        return await self._rm_on_worker(lambda: call(self._rm_sync()))

    async def _rm_on_worker(self, call: Callable[[], T]) -> T:
        """``call()`` on the worker thread; later calls of this memory wait for it to end (order is kept)."""
        self._rm_running += 1
        if self._rm_memory is None:
            self._rm_loop = weakref.ref(asyncio.get_running_loop())
        return await self._rm_worker.run(call, self._rm_ended)

    def _rm_ended(self) -> None:
        self._rm_running -= 1

    def run_sync(self, call: Callable[[M], T]) -> T:
        """``call(memory)`` on the worker thread, waited for by the calling thread (for sync code, not on a loop)."""
        if self._rm_closed:
            raise MemoryClosed(f"this async memory {self._rm_name!r} was closed")
        return self._rm_worker.call(lambda: call(self._rm_sync()))

    async def batch(self, statements: Callable[[M], T]) -> T:
        """``statements(memory)`` inside ``with memory.batch():``: one atomic call to Redis, awaited.

        The function runs as :meth:`run`'s does; it must not await or block
        (a batch holds the memory's lock). See :meth:`Memory.batch`.
        """

        def in_batch(memory: M) -> T:
            with memory.batch():
                return statements(memory)

        return await self.run(in_batch)

    # -- reads: the local replica -------------------------------------------

    def _rm_local(self) -> M:
        found = self._rm_memory
        if self._rm_closed:
            raise MemoryClosed(f"this async memory {self._rm_name!r} was closed")
        if found is None or not found._rm.replica.loaded:
            raise NotLoaded(
                f"{self._rm_name!r} was not loaded yet: await mem.refresh() (or open it with async with)",
                key=None if found is None else found.key,
            )
        return found

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._rm_local()._rm.peek(name, MissingAttribute)

    def __getitem__(self, name: str) -> Any:
        return self._rm_local()._rm.peek(name, MissingKey)

    def __contains__(self, name: object) -> bool:
        return name in list(self._rm_local()._rm.replica.root)

    def __dir__(self) -> list[str]:
        names = list(self._rm_local()._rm.replica.root) if self._rm_memory is not None else []
        return sorted(set(super().__dir__()) | set(names))

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
            return
        raise TypeError(f"an async memory's writes are awaited: await mem.set({name!r}, value)")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._rm_name!r}>"

    @property
    def key(self) -> str:
        """The Redis key of this memory's hash (NotLoaded before the first awaited call)."""
        found = self._rm_memory
        if found is None:
            raise NotLoaded(f"{self._rm_name!r} was not built yet: await mem.refresh()")
        return found.key

    async def refresh(self) -> None:
        """Make the local replica reflect the server: one version check (HMGET), a journal delta if others wrote."""

        def fresh(memory: M) -> None:
            core = memory._rm
            with core.lock:
                core.check_open()
                core.refresh()

        await self.run(fresh)

    async def to_dict(self) -> dict[str, Any]:
        """A plain deep copy of every stored name and value, fresh."""
        return await self.run(lambda memory: memory.to_dict())

    # -- writes -------------------------------------------------------------

    async def set(self, name: str, value: Any) -> None:
        """``memory[name] = value``, awaited: one FCALL."""

        def store(memory: M) -> None:
            memory[name] = value

        await self.run(store)

    async def remove(self, name: str) -> None:
        """``del memory[name]``, awaited: MissingKey if it is not stored."""

        def remove(memory: M) -> None:
            del memory[name]

        await self.run(remove)

    async def append(self, name: str, value: Any) -> None:
        """Append ``value`` to the list under ``name`` (made if missing): one FCALL."""
        await self.extend(name, [value])

    async def extend(self, name: str, values: Iterable[Any]) -> None:
        """Append every value to the list under ``name`` (made if missing), in one FCALL."""
        items = list(values)
        await self.run(lambda memory: memory._rm.append_to(name, items))

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every change made so far is in Redis (see :meth:`Memory.flush`)."""
        # On the worker: waiting for Redis to be back sleeps between tries.
        return await self._rm_blocking(lambda memory: memory.flush(timeout))

    async def status(self) -> Status:
        """Online or offline, operations queued, dropped on replay, the last error."""
        return await self.run(lambda memory: memory.status())

    async def delete(self) -> None:
        """Remove the whole memory from Redis (see :meth:`Memory.delete`)."""
        await self.run(lambda memory: memory.delete())

    async def ttl(self) -> float | None:
        """Seconds left before the memory expires, None if it does not (see :meth:`Memory.ttl`)."""
        return await self.run(lambda memory: memory.ttl())

    async def expire(self, seconds: float) -> None:
        """See :meth:`Memory.expire`."""
        await self.run(lambda memory: memory.expire(seconds))

    async def metadata(self) -> Metadata:
        """See :meth:`Memory.metadata`."""
        return await self.run(lambda memory: memory.metadata())

    async def stats(self) -> Stats:
        """See :meth:`Memory.stats`."""
        return await self.run(lambda memory: memory.stats())

    def subscribe(self) -> AsyncFeed:
        """This memory's change events, from now on, as an async iterator: ``async for event in mem.subscribe()``."""
        return AsyncFeed(self)

    # -- lifecycle ----------------------------------------------------------

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close the sync memory (see :meth:`Memory.close`) and end the worker thread. Closing twice does nothing."""
        if self._rm_closed:
            return
        worker = self._rm_worker
        try:
            await worker.run(self._rm_close_here(timeout))
        finally:
            self._rm_closed = True
            if self._rm_own_worker:
                await worker.stop_async()

    def close_sync(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """:meth:`close` for sync code (waits in the calling thread)."""
        if self._rm_closed:
            return
        try:
            self._rm_worker.call(self._rm_close_here(timeout))
        finally:
            self._rm_closed = True
            if self._rm_own_worker:
                self._rm_worker.stop()

    def _rm_close_here(self, timeout: float) -> Callable[[], None]:
        def close() -> None:
            if self._rm_memory is not None:
                self._rm_memory.close(timeout)

        return close

    async def __aenter__(self) -> Self:
        await self.refresh()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()


class AsyncConversationMemory(AsyncMemory[ConversationMemory]):
    """A :class:`~redis_memory.ConversationMemory` for asyncio code (options as there: ``max_messages``, ``ttl``...)."""

    _rm_sync_type = ConversationMemory

    def __init__(self, conversation_id: str, **options: Any) -> None:
        super().__init__(conversation_id, **options)

    @property
    def conversation_id(self) -> str:
        """The id this conversation was opened with."""
        return self._rm_name

    async def add_message(self, message: Any) -> None:
        """Append one message (a dict, an OpenAI SDK object, a LangChain message), as the sync one's ``add_message``."""
        await self.run(lambda memory: memory.add_message(message))

    async def add_messages(self, messages: Iterable[Any]) -> None:
        """Append several messages in one FCALL."""
        items = list(messages)
        await self.run(lambda memory: memory.add_messages(items))


class AsyncSession:
    """A :class:`~redis_memory.Session` for asyncio code: ``shared`` and each agent's memory as async memories.

    Its memories share one worker thread, ended by :meth:`close`.
    """

    def __init__(self, session_id: str, *, agent: str | None = None, **options: Any) -> None:
        self.session_id = session_id
        self.me = agent
        self._worker = Worker(f"session {session_id}")
        self._sync: Session | None = None
        self._opened: dict[str, AsyncMemory[Any]] = {}

        def build() -> Session:
            made = Session(session_id, agent=agent, **options)
            self._sync = made
            return made

        self._build = build
        weakref.finalize(self, self._worker.stop_soon)
        self.shared: AsyncMemory[Any] = AsyncMemory._rm_wrap(self._worker, lambda: self._session().shared, session_id)

    def _session(self) -> Session:
        return self._sync if self._sync is not None else self._build()

    async def agent(self, name: str) -> AsyncMemory[Any]:
        """Agent ``name``'s private memory (see :meth:`Session.agent`), loaded."""
        found = self._opened.get(name)
        if found is None:
            found = AsyncMemory._rm_wrap(self._worker, lambda: self._session().agent(name), name)
            # Kept before it is loaded: a concurrent call for the same agent gets this one, not a second
            # async memory over the same sync one (whose calls would not wait for this one's).
            self._opened[name] = found
            try:
                await found.refresh()
            except BaseException:
                if self._opened.get(name) is found:
                    del self._opened[name]
                raise
        elif found._rm_memory is None or not found._rm_memory._rm.replica.loaded:
            await found.refresh()  # another call is loading it: this one waits for that too
        return found

    async def private(self) -> AsyncMemory[Any]:
        """The memory of the agent this session was opened for."""
        if self.me is None:
            await self._worker.run(lambda: self._session().private)  # raises PrivateMemory
        return await self.agent(self.me or "")

    async def agents(self) -> list[str]:
        """See :meth:`Session.agents`."""
        return await self._worker.run(lambda: self._session().agents())

    async def delete(self) -> None:
        """Delete the whole session (see :meth:`Session.delete`)."""
        await self._worker.run(lambda: self._session().delete())

    async def close(self) -> None:
        """Close every memory of the session and end the worker thread."""
        if self._worker.stopped:
            return

        def close() -> None:
            if self._sync is not None:
                self._sync.close()

        try:
            await self._worker.run(close)
        finally:
            for opened in [self.shared, *self._opened.values()]:
                opened._rm_closed = True
            await self._worker.stop_async()

    async def __aenter__(self) -> AsyncSession:
        await self.shared.refresh()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()


class AsyncFeed:
    """A memory's change events as an async iterator, fed by a :class:`~redis_memory.feed.Subscription`.

    The subscription's thread hands each event to the loop; ``await
    feed.get(timeout)`` or ``async for event in feed``. ``async with`` or
    :meth:`close` ends it (it is also closed with its memory).
    """

    def __init__(self, memory: AsyncMemory[Any]) -> None:
        self._memory = memory
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._subscription: Subscription | None = None

    async def start(self) -> AsyncFeed:
        """Subscribe (on the memory's worker): events from now on are delivered."""
        if self._subscription is None:
            loop = asyncio.get_running_loop()
            events = self._events

            def deliver(event: Event) -> None:
                with contextlib.suppress(RuntimeError):  # the loop was closed: nobody reads this feed
                    loop.call_soon_threadsafe(events.put_nowait, event)

            # On the worker: subscribing connects and waits for the server's answer, blocking.
            self._subscription = await self._memory._rm_blocking(lambda memory: memory.subscribe(deliver))
        return self

    async def get(self, timeout: float | None = None) -> Event | None:
        """The next event, or None if none came within ``timeout`` seconds."""
        await self.start()
        try:
            return await asyncio.wait_for(self._events.get(), timeout)
        except TimeoutError:
            return None

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        await self.start()
        while True:
            yield await self._events.get()

    async def close(self) -> None:
        """Unsubscribe and end the subscription's thread (off the loop)."""
        subscription, self._subscription = self._subscription, None
        if subscription is not None and not self._memory._rm_closed:
            await self._memory._rm_blocking(lambda memory: subscription.close())  # it waits for the thread

    async def __aenter__(self) -> AsyncFeed:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
