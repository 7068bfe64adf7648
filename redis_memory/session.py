"""Sessions: one memory every agent shares, and one private memory per agent.

Keys of a session ``s`` (all in one Redis Cluster slot, the hash tag being
the session id):

* ``<prefix>:session:{s}``: the shared memory (and its ``:w`` writer index);
* ``<prefix>:session:{s}:agent:<name>``: each agent's private memory;
* ``<prefix>:session:{s}:agents``: the set of agent names.

An agent is added to the set when its memory is opened, and again by the
first write of its memory in each process and by every write that creates
that memory (the session had expired, or was deleted elsewhere), so that
:meth:`Session.delete` finds every agent's memory that exists. Those writes
also add the session to the sessions' index: a session exists while its
shared memory or any agent's does, and is idle when all of them are.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, cast

from . import connection
from .catalog import Catalog
from .connection import Client
from .errors import ConnectionFailed, PrivateMemory
from .memory import Memory, Metadata
from .store import command, escape_id


def _agents_key(prefix: str, session_id: str) -> str:
    return SessionMemory._rm_key(prefix, session_id) + ":agents"


def _agent_key(session_key: str, agent: str) -> str:
    return f"{session_key}:agent:{escape_id(agent)}"


class SessionCatalog(Catalog):
    """The index of sessions: a session's last activity is the latest write to its shared or agents' memories."""

    def last_activity(self, identifier: str) -> float | None:
        """HGET of the shared memory, SMEMBERS of the participants, one HGET per agent: O(agents)."""
        shared = self.key_of(identifier)
        agents = shared + ":agents"
        members = cast(list[bytes], command(self.channel, agents, "SMEMBERS", agents))
        times = [self.activity_of(shared), *(self.activity_of(_agent_key(shared, m.decode())) for m in members)]
        known = [t for t in times if t is not None]
        return max(known) if known else None


def _sessions(client: Client, prefix: str) -> SessionCatalog:
    return SessionCatalog(client, prefix, SessionMemory._rm_kind, lambda name: SessionMemory._rm_key(prefix, name))


class SessionMemory(Memory):
    """The memory every agent of a session shares; deleting it idle deletes the whole session."""

    _rm_kind = "session"

    def _rm_companions(self, prefix: str, name: str) -> tuple[str, ...]:
        return (_agents_key(prefix, name),)

    @classmethod
    def _rm_catalog(cls, client: Client, prefix: str) -> Catalog | None:
        return _sessions(client, prefix)

    @classmethod
    def _rm_open(cls, name: str, client: Client, prefix: str) -> Any:
        return Session(name, client=client, prefix=prefix)


class Participants:
    """An agent memory's listing: the agent in its session's participant set, the session in the sessions' index."""

    def __init__(self, sessions: SessionCatalog, key: str, agent: str, ttl: bytes) -> None:
        self.sessions = sessions
        self.channel = sessions.channel
        self.key = key
        self.agent = agent
        self.ttl = int(ttl)  # ms, 0 for none

    def touch(self, identifier: str) -> None:
        """SADD of the agent (with a ttl, a PTTL and a PEXPIRE that only extends), ZADD of the session: O(log n).

        The set is shared by every memory of the session: an agent with a
        shorter ttl never shortens it, nor sets one on a set that has none.
        """
        left = int(command(self.channel, self.key, "PTTL", self.key)) if self.ttl else -1
        command(self.channel, self.key, "SADD", self.key, self.agent)
        if left == -2 or 0 <= left < self.ttl:  # -2: this SADD created the set
            command(self.channel, self.key, "PEXPIRE", self.key, self.ttl)
        self.sessions.touch(identifier)

    def forget(self, identifier: str) -> None:
        """Nothing: an agent whose memory was deleted stays a participant until the session is deleted."""


class AgentMemory(Memory):
    """One agent's private memory in a session; it shares the session's hash tag."""

    _rm_kind = "session"

    def __init__(self, session_id: str, agent: str, **options: Any) -> None:
        if not isinstance(agent, str) or not agent:
            raise ValueError(f"an agent name must be a non-empty str, not {agent!r}")
        object.__setattr__(self, "_rm_agent", agent)
        super().__init__(session_id, **options)
        core = self._rm
        sessions = _sessions(core.store.client, options.get("prefix", "rm"))
        core.catalog = Participants(sessions, core.store.companions[0], agent, core.ttl)

    def _rm_join(self) -> None:
        """Join the session's participants now (see :meth:`Participants.touch`); offline, the first write does."""
        core = self._rm
        if core.catalog is not None and core.link.online:
            try:
                core.catalog.touch(core.name)
            except ConnectionFailed as exc:
                core.link.failed(exc)

    def _rm_own_key(self, prefix: str, name: str) -> str:
        return _agent_key(self._rm_key(prefix, name), self._rm_agent)

    def _rm_companions(self, prefix: str, name: str) -> tuple[str, ...]:
        return (_agents_key(prefix, name),)

    @classmethod
    def _rm_catalog(cls, client: Client, prefix: str) -> Catalog | None:
        return None  # listed through their session

    @property
    def agent(self) -> str:
        """The agent this memory belongs to."""
        return cast(str, self._rm_agent)


class Session:
    """A session several agents share: ``shared`` for all, ``agent(name)`` private to each.

    Opened with ``agent="A"``, the session object is A's view: ``private`` is
    A's memory, and asking for another agent's raises :class:`PrivateMemory`;
    A's writes carry ``author="A"`` in the change feed.
    Opened without, it is an orchestrator's view and reaches every agent.
    ``with Session(...) as s:`` closes its memories when the block ends;
    with ``delete_on_exit=True`` it deletes the whole session first. Other options (``ttl``, ``spool``,
    ``max_pending``, ``author``) apply to every memory of the session; with
    ``ttl`` the participant set expires with them.
    """

    def __init__(
        self,
        session_id: str,
        *,
        agent: str | None = None,
        delete_on_exit: bool = False,
        client: Client | None = None,
        url: str | None = None,
        prefix: str = "rm",
        **options: Any,
    ) -> None:
        self.session_id = session_id
        self.me = agent
        self.delete_on_exit = delete_on_exit
        self._client = connection.connect(client, url)
        if agent is not None:
            options.setdefault("author", agent)
        self._options: dict[str, Any] = dict(options, client=self._client, prefix=prefix)
        self.shared = SessionMemory(session_id, **self._options)
        self._agents_key = _agents_key(prefix, session_id)
        self._channel = connection.channel(self._client)
        self._opened: dict[str, AgentMemory] = {}

    def agent(self, name: str) -> AgentMemory:
        """The private memory of agent ``name``; the agent joins the participants (SADD, ZADD of the session): O(log n).

        While Redis is unreachable the memory is opened all the same.
        """
        if self.me is not None and name != self.me:
            raise PrivateMemory(
                f"this session is opened for agent {self.me!r}; {name!r}'s memory is private",
                key=self.shared.key,
            )
        found = self._opened.get(name)
        if found is None:
            found = AgentMemory(self.session_id, name, **self._options)
            found._rm_join()
            self._opened[name] = found
        return found

    @property
    def private(self) -> AgentMemory:
        """The memory of the agent this session was opened for."""
        if self.me is None:
            raise PrivateMemory("this session was opened without agent=", key=self.shared.key)
        return self.agent(self.me)

    def agents(self) -> list[str]:
        """The agents that have opened or written a private memory here (SMEMBERS): O(agents)."""
        members = cast(list[bytes], command(self._channel, self._agents_key, "SMEMBERS", self._agents_key))
        return sorted(m.decode() for m in members)

    def metadata(self) -> Metadata:
        """Creation and last activity of the shared memory."""
        return self.shared.metadata()

    def delete(self) -> None:
        """Delete the shared memory, every agent's memory and the participant set (SMEMBERS, one script): O(size)."""
        self._rm_delete(None)

    def _rm_delete(self, idle_ms: int | None) -> bool:
        """Delete the whole session in one atomic step; with ``idle_ms``, only if none of its memories changed since.

        The agents are listed first (SMEMBERS); if one joins before the delete
        runs, the delete does nothing and the agents are listed again.
        """
        while True:
            names = self.agents()
            hashes = tuple(_agent_key(self.shared.key, name) for name in names)
            keys = (*hashes, *(h + ":w" for h in hashes))
            done = self.shared._rm_delete(idle_ms, keys, 1 + len(hashes), (self._agents_key, len(names)))
            if done is not None:
                return done

    @classmethod
    def list_ids(cls, **options: Any) -> list[str]:
        """Ids of the stored sessions (see :meth:`Memory.list_ids`)."""
        return SessionMemory.list_ids(**options)

    @classmethod
    def delete_idle(cls, idle_for: float, **options: Any) -> int:
        """Delete every session idle for ``idle_for`` seconds, with all its agents' memories."""
        return SessionMemory.delete_idle(idle_for, **options)

    def close(self) -> None:
        """Close the shared memory and every agent's memory opened here (see :meth:`Memory.close`)."""
        for opened in [self.shared, *self._opened.values()]:
            opened.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        try:
            if self.delete_on_exit:
                self.delete()
        finally:
            self.close()

    def __repr__(self) -> str:
        return f"<Session {self.session_id!r} at {self.shared.key}>"
