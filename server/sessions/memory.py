"""InMemorySessionStore: every session in this process's memory, with lazy and swept expiry."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from nextchar.server.registry import ModelVersion
from nextchar.server.sessions.session import Session
from nextchar.server.sessions.store import (
    StaleSession,
    evicted_reason,
    expiry_reason,
    full,
    gone,
    replaced,
    taken,
)
from nextchar.server.sessions.value import SessionValue

TOMBSTONES = 100_000  # remembered reasons for gone sessions; the oldest are forgotten first


class InMemorySessionStore:
    """A dict in insertion (= creation) order, and the ids least recently used first; this process
    holds the only copy of each session."""

    def __init__(
        self,
        idle_timeout: float,
        lifetime: float = 0.0,
        on_remove: Callable[[str, str], None] | None = None,
        evict_idle: float = 60.0,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.lifetime = lifetime
        self.on_remove = on_remove  # (session id, reason): the metrics' counter of ended sessions
        self.evict_idle = evict_idle  # seconds idle before a session may make room at the cap
        self._sessions: dict[str, Session] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()  # ids, least recently used first
        self._gone: OrderedDict[str, str] = OrderedDict()
        self._adaptive = 0  # sessions that adapt (a session's adaptivity is fixed when it is added)

    async def get(self, session_id: str, *, fresh: bool = False) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise gone(session_id, self._gone.get(session_id))
        reason = expiry_reason(session, time.time(), self.idle_timeout, self.lifetime)
        if reason is not None:
            self._remove(session_id, reason)
            raise gone(session_id, reason)
        return session

    def resident(self, session_id: str) -> Session | None:
        session = self._sessions.get(session_id)
        now = time.time()
        if session is None or expiry_reason(session, now, self.idle_timeout, self.lifetime):
            return None  # get() says why
        session.last_used = now
        self._recent.move_to_end(session_id)
        return session

    def touch(self, session: Session) -> None:
        session.last_used = time.time()
        if session.id in self._recent:
            self._recent.move_to_end(session.id)

    def contains(self, session_id: str) -> bool:
        return session_id in self._sessions

    async def add(self, session: Session, cap: int) -> None:
        if self.contains(session.id):
            raise taken(session.id)
        if len(self._sessions) >= cap:
            self._make_room(cap)
        self._gone.pop(session.id, None)
        self._sessions[session.id] = session
        self._recent[session.id] = None
        self._adaptive += session.value.adapter is not None

    def _make_room(self, cap: int) -> None:
        """Evict the session idle the longest, if it has been idle evict_idle seconds."""
        idlest = self._sessions[next(iter(self._recent))]
        idle = time.time() - idlest.last_used
        if idle < self.evict_idle:
            raise full(cap, self.evict_idle)
        self._remove(idlest.id, evicted_reason(cap))

    async def remove(self, session_id: str, reason: str) -> None:
        if session_id not in self._sessions:
            raise gone(session_id, self._gone.get(session_id))
        self._remove(session_id, reason)

    async def commit(
        self, session: Session, expected: SessionValue, new: SessionValue, *, full: bool = False
    ) -> None:
        self.commit_now(session, expected, new)

    def commit_now(
        self, session: Session, expected: SessionValue, new: SessionValue, *, full: bool = False
    ) -> bool:
        if self._sessions.get(session.id) is not session:
            raise replaced(session.id)
        if session.value is not expected:
            raise StaleSession(f"session {session.id!r} changed while the request computed")
        session.value = new
        return True

    async def refresh(self, session: Session) -> None:
        """Nothing to do: this process holds the only copy."""

    async def count(self) -> int:
        return len(self._sessions)

    async def of_model(self, model: ModelVersion) -> list[str]:
        return [s.id for s in self._sessions.values() if s.model is model]

    def _remove(self, session_id: str, reason: str) -> None:
        session = self._sessions.pop(session_id)  # changes computing for it are refused at their commit
        self._adaptive -= session.value.adapter is not None
        del self._recent[session_id]
        self._gone[session_id] = reason
        if len(self._gone) > TOMBSTONES:
            self._gone.popitem(last=False)
        if self.on_remove is not None:
            self.on_remove(session_id, reason)

    async def page(self, start: int, size: int) -> list[Session]:
        out: list[Session] = []
        for i, session in enumerate(self._sessions.values()):
            if i >= start + size:
                break
            if i >= start:
                out.append(session)
        return out

    async def sweep(self, now: float) -> int:
        expired = [
            (s.id, r)
            for s in self._sessions.values()
            if (r := expiry_reason(s, now, self.idle_timeout, self.lifetime))
        ]
        for session_id, reason in expired:
            self._remove(session_id, reason)
        return len(expired)

    def __str__(self) -> str:
        return "in memory"

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        """Nothing to write: the sessions end with the process."""

    def __len__(self) -> int:
        return len(self._sessions)

    def held(self) -> Iterable[Session]:
        return self._sessions.values()

    def adaptive_held(self) -> int:
        return self._adaptive
