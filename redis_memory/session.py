"""Sessions: one memory every agent shares, and one private memory per agent.

Keys of a session ``s`` (all in one Redis Cluster slot, the hash tag being
the session id):

* ``<prefix>:session:{s}``: the shared memory (and its ``:w`` writer index);
* ``<prefix>:session:{s}:agent:<name>``: each agent's private memory;
* ``<prefix>:session:{s}:agents``: the set of agent names.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, cast

import redis

from . import connection
from .catalog import Catalog
from .errors import PrivateMemory
from .memory import Memory, Metadata
from .store import escape_id


def _agents_key(prefix: str, session_id: str) -> str:
    return SessionMemory._rm_key(prefix, session_id) + ":agents"


class SessionMemory(Memory):
    """The memory every agent of a session shares; deleting it idle deletes the whole session."""

    _rm_kind = "session"

    def _rm_companions(self, prefix: str, name: str) -> tuple[str, ...]:
        return (_agents_key(prefix, name),)

    @classmethod
    def _rm_open(cls, name: str, client: redis.Redis, prefix: str) -> Any:
        return Session(name, client=client, prefix=prefix)


class AgentMemory(Memory):
    """One agent's private memory in a session; it shares the session's hash tag."""

    _rm_kind = "session"

    def __init__(self, session_id: str, agent: str, **options: Any) -> None:
        if not isinstance(agent, str) or not agent:
            raise ValueError(f"an agent name must be a non-empty str, not {agent!r}")
        object.__setattr__(self, "_rm_agent", agent)
        super().__init__(session_id, **options)

    def _rm_own_key(self, prefix: str, name: str) -> str:
        return f"{self._rm_key(prefix, name)}:agent:{escape_id(self._rm_agent)}"

    def _rm_companions(self, prefix: str, name: str) -> tuple[str, ...]:
        return (_agents_key(prefix, name),)

    @classmethod
    def _rm_catalog(cls, client: redis.Redis, prefix: str) -> Catalog | None:
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
        client: redis.Redis | None = None,
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
        self._opened: dict[str, AgentMemory] = {}

    def agent(self, name: str) -> AgentMemory:
        """The private memory of agent ``name``; the agent joins the session's participants (SADD)."""
        if self.me is not None and name != self.me:
            raise PrivateMemory(
                f"this session is opened for agent {self.me!r}; {name!r}'s memory is private",
                key=self.shared.key,
            )
        found = self._opened.get(name)
        if found is None:
            found = self._opened[name] = AgentMemory(self.session_id, name, **self._options)
            with self._client.pipeline(transaction=False) as pipe:
                pipe.sadd(self._agents_key, name)
                if found._rm.ttl != b"0":  # the set lives as long as the session's memories
                    pipe.pexpire(self._agents_key, int(found._rm.ttl))
                pipe.execute()
        return found

    @property
    def private(self) -> AgentMemory:
        """The memory of the agent this session was opened for."""
        if self.me is None:
            raise PrivateMemory("this session was opened without agent=", key=self.shared.key)
        return self.agent(self.me)

    def agents(self) -> list[str]:
        """The agents that have opened a private memory here (SMEMBERS): O(agents)."""
        return sorted(m.decode() for m in cast(set[bytes], self._client.smembers(self._agents_key)))

    def metadata(self) -> Metadata:
        """Creation and last activity of the shared memory."""
        return self.shared.metadata()

    def delete(self) -> None:
        """Delete the shared memory, every agent's memory and the participant set."""
        for name in self.agents():
            with AgentMemory(self.session_id, name, **self._options) as found:
                found.delete()
        self.shared.delete()
        self._client.delete(self._agents_key)

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
