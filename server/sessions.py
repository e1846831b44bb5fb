"""Sessions: one hidden state per client stream, kept in a SessionStore.

A Session is small on purpose (``__slots__``, the state a NumPy row): an idle
session costs its state plus about 1 KB, so 100,000 fit in well under 1 GB.
Only the batcher advances a session's state; everything here runs on the event
loop thread, so no locks are needed.

SessionStore is the seam for other backends (Redis, issue 5): get / add / remove /
page / sweep. Removed ids leave a bounded tombstone, so a late client is told WHY
its session is gone (idle, lifetime, closed, evicted) instead of just "not found".
"""

from __future__ import annotations

import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
from nextchar.server.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from nextchar.server.logs import bind_session
from nextchar.server.registry import ModelVersion

ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
TOMBSTONES = 100_000  # remembered reasons for gone sessions; the oldest are forgotten first


class Session:
    """One hidden state pinned to one model version, and its position in the client's text."""

    __slots__ = ("created", "gen", "id", "last_used", "model", "offset", "probs", "state")

    def __init__(self, session_id: str, model: ModelVersion, state: np.ndarray, probs: np.ndarray) -> None:
        self.id = session_id
        self.model = model
        self.state = state  # (S,) hidden state after the last consumed character
        self.probs = probs  # (V,) prediction for the next character
        self.offset = 0  # characters consumed
        self.created = self.last_used = time.time()
        self.gen = 0  # bumped on reset/close: batch results for an older gen are dropped

    @classmethod
    def fresh(cls, session_id: str, model: ModelVersion) -> Session:
        net = model.require()
        assert model.initial_probs is not None
        return cls(session_id, model, net.initial_state(1)[0], model.initial_probs)

    def copy(self, session_id: str) -> Session:
        twin = Session(session_id, self.model, self.state.copy(), self.probs.copy())
        twin.offset = self.offset
        return twin

    def reset(self) -> None:
        net = self.model.require()
        assert self.model.initial_probs is not None
        self.state, self.probs = net.initial_state(1)[0], self.model.initial_probs
        self.offset = 0
        self.gen += 1


def new_id(requested: str = "") -> str:
    if not requested:
        # 128 random bits from the OS: a server-assigned id is the session's only key (docs/api.md)
        return secrets.token_hex(16)
    if not ID_RE.match(requested):
        raise InvalidArgument("session_id: must be 1-128 characters of [A-Za-z0-9._:-]")
    return requested


class SessionStore(Protocol):
    """Where sessions live. Implementations enforce expiry; the caller enforces the cap."""

    def get(self, session_id: str) -> Session: ...  # raises NotFound naming the reason
    def contains(self, session_id: str) -> bool: ...
    def add(self, session: Session) -> None: ...  # raises AlreadyExists
    def remove(self, session_id: str, reason: str) -> Session: ...
    def page(self, start: int, size: int) -> list[Session]: ...
    def sweep(self, now: float) -> int: ...  # remove expired sessions; returns how many
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Session]: ...


class InMemorySessionStore:
    """A dict in insertion (= creation) order, with lazy and swept expiry."""

    def __init__(
        self, idle_timeout: float, lifetime: float = 0.0, on_remove: Callable[[str, str], None] | None = None
    ) -> None:
        self.idle_timeout = idle_timeout
        self.lifetime = lifetime
        self.on_remove = on_remove  # (session id, reason): the metrics' counter of ended sessions
        self._sessions: dict[str, Session] = {}
        self._gone: OrderedDict[str, str] = OrderedDict()

    def _expiry_reason(self, session: Session, now: float) -> str | None:
        if now - session.last_used > self.idle_timeout:
            return f"idle for more than {self.idle_timeout:g} s"
        if self.lifetime and now - session.created > self.lifetime:
            return f"lifetime of {self.lifetime:g} s ended"
        return None

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            reason = self._gone.get(session_id)
            if reason is None:
                raise NotFound(f"session {session_id!r}: no such session")
            raise NotFound(f"session {session_id!r}: expired or gone ({reason})")
        reason = self._expiry_reason(session, time.time())
        if reason is not None:
            self.remove(session_id, reason)
            raise NotFound(f"session {session_id!r}: expired or gone ({reason})")
        return session

    def contains(self, session_id: str) -> bool:
        return session_id in self._sessions

    def add(self, session: Session) -> None:
        if session.id in self._sessions:
            raise AlreadyExists(f"session_id: {session.id!r} is already in use")
        self._gone.pop(session.id, None)
        self._sessions[session.id] = session

    def remove(self, session_id: str, reason: str) -> Session:
        session = self._sessions.pop(session_id)
        session.gen += 1
        self._gone[session_id] = reason
        if len(self._gone) > TOMBSTONES:
            self._gone.popitem(last=False)
        if self.on_remove is not None:
            self.on_remove(session_id, reason)
        return session

    def page(self, start: int, size: int) -> list[Session]:
        out: list[Session] = []
        for i, session in enumerate(self._sessions.values()):
            if i >= start + size:
                break
            if i >= start:
                out.append(session)
        return out

    def sweep(self, now: float) -> int:
        expired = [(s.id, r) for s in self._sessions.values() if (r := self._expiry_reason(s, now))]
        for session_id, reason in expired:
            self.remove(session_id, reason)
        return len(expired)

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))


class Sessions:
    """The session rules around a store: the cap, draining, and ids."""

    def __init__(self, store: SessionStore, max_sessions: int) -> None:
        self.store = store
        self.max_sessions = max_sessions
        self.draining = False

    def admit(self, requested_id: str) -> str:
        """Check a NEW session may be created; returns its id. Live sessions are never touched."""
        if self.draining:
            raise Unavailable("server is draining: no new sessions; reconnect to another server")
        session_id = new_id(requested_id)
        if self.store.contains(session_id):
            raise AlreadyExists(f"session_id: {session_id!r} is already in use")
        if len(self.store) >= self.max_sessions:
            raise ResourceExhausted(
                f"session cap of {self.max_sessions} reached; close idle sessions or retry later"
            )
        return session_id

    def add(self, session: Session) -> Session:
        self.admit(session.id)  # re-check: the cap or the id may have changed while priming
        self.store.add(session)
        bind_session(session.id)
        return session

    def get(self, session_id: str) -> Session:
        if not session_id:
            raise InvalidArgument("session_id: required")
        bind_session(session_id)  # this call's log records name the session
        session = self.store.get(session_id)
        session.last_used = time.time()
        return session

    def close(self, session_id: str) -> Session:
        session = self.get(session_id)
        return self.store.remove(session.id, "closed by the client")

    def evict_model(self, model: ModelVersion) -> int:
        """Remove the sessions of a deleted model version."""
        doomed = [s.id for s in self.store if s.model is model]
        for session_id in doomed:
            self.store.remove(session_id, f"evicted: model {model.name} v{model.version} was deleted")
        return len(doomed)
