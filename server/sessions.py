"""Sessions: one hidden state per client stream, kept in a SessionStore.

A Session is small on purpose (``__slots__``, the state a NumPy row): an idle
session costs its state plus about 1 KB, so 100,000 fit in well under 1 GB.
Only the batcher advances a session's state; everything here runs on the event
loop thread, so no locks are needed.

SessionStore is the seam for other backends: InMemorySessionStore here, and
RedisSessionStore (nextchar.server.redis_store), shared by several replicas. Its
methods are coroutines because a shared store answers over the network; the
in-memory store's never suspend. Removed ids leave a tombstone, so a late client
is told WHY its session is gone (idle, lifetime, closed, evicted) instead of just
"not found".
"""

from __future__ import annotations

import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from nextchar.server.errors import (
    Aborted,
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from nextchar.server.logs import bind_session
from nextchar.server.registry import ModelVersion

ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
TOMBSTONES = 100_000  # remembered reasons for gone sessions; the oldest are forgotten first


class Session:
    """One hidden state pinned to one model version, and its position in the client's text."""

    __slots__ = ("created", "dirty", "gen", "id", "last_used", "model", "offset", "probs", "state", "version")

    def __init__(self, session_id: str, model: ModelVersion, state: np.ndarray, probs: np.ndarray) -> None:
        self.id = session_id
        self.model = model
        self.state = state  # (S,) hidden state after the last consumed character
        self.probs = probs  # (V,) prediction for the next character
        self.offset = 0  # characters consumed
        self.created = self.last_used = time.time()
        self.gen = 0  # bumped on reset/close: batch results for an older gen are dropped
        # a shared store's version of (state, probs, offset): 0 = not stored (yet), -1 = unknown
        self.version = 0
        self.dirty = 0  # characters consumed since the state was last written to a shared store

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


class StaleSession(Aborted):
    """A shared store refused a write-back: another replica advanced the session since this
    replica read it. The caller reloads and re-runs the chunk, or answers ABORTED."""


def idle_reason(idle_timeout: float) -> str:
    return f"idle for more than {idle_timeout:g} s"


def lifetime_reason(lifetime: float) -> str:
    return f"lifetime of {lifetime:g} s ended"


GONE_REASONS = ("idle", "lifetime", "closed", "evicted")


def reason_label(reason: str) -> str:
    """The one-word kind of a removal reason ("idle for more than 60 s" -> "idle")."""
    word = reason.split(maxsplit=1)[0].rstrip(":") if reason else ""
    return word if word in GONE_REASONS else "other"


def gone(session_id: str, reason: str | None) -> NotFound:
    """The NotFound a client gets for a session id: with the reason when one is remembered
    (in words, and as the detail ``reason``: idle, lifetime, closed, evicted or other)."""
    if reason is None:
        return NotFound(f"session {session_id!r}: no such session", subject="session")
    return NotFound(
        f"session {session_id!r}: expired or gone ({reason})", subject="session", reason=reason_label(reason)
    )


@dataclass(slots=True)
class WriteBack:
    """A session's advance, for a shared store to write before the reply leaves the server."""

    session: Session  # still holding the state the chunk was computed from
    state: np.ndarray  # (S,) after the chunk
    probs: np.ndarray  # (V,)
    offset: int  # after the chunk
    chars: int  # the chunk's length


# A shared store's commit: one new version (or the error: StaleSession, NotFound, Unavailable)
# per write-back, in one round trip for the whole batch.
Commit = Callable[[Sequence[WriteBack]], Awaitable[list[int | ServiceError]]]


def new_id(requested: str = "") -> str:
    if not requested:
        # 128 random bits from the OS: a server-assigned id is the session's only key (docs/api.md)
        return secrets.token_hex(16)
    if not ID_RE.match(requested):
        raise InvalidArgument("session_id: must be 1-128 characters of [A-Za-z0-9._:-]")
    return requested


def check_new(session_id: str, exists: bool, count: int, cap: int) -> None:
    """The two reasons a store refuses a new session: its id is taken, or the cap is reached."""
    if exists:
        raise AlreadyExists(f"session_id: {session_id!r} is already in use")
    if count >= cap:
        raise ResourceExhausted(f"session cap of {cap} reached; close idle sessions or retry later")


class SessionStore(Protocol):
    """Where sessions live. Implementations enforce expiry, and the cap in ``add`` (atomically,
    when several replicas share the store)."""

    # raises NotFound naming the reason; fresh: re-read a shared copy another replica may have advanced
    async def get(self, session_id: str, *, fresh: bool = False) -> Session: ...
    async def add(self, session: Session, cap: int) -> None: ...  # AlreadyExists, ResourceExhausted
    async def remove(self, session_id: str, reason: str) -> Session: ...
    async def reset(self, session: Session) -> None: ...  # back to offset 0, written through
    async def refresh(self, session: Session) -> None: ...  # adopt the shared copy if it moved on
    async def page(self, start: int, size: int) -> list[Session]: ...
    async def count(self) -> int: ...  # sessions in the store (all replicas')
    async def of_model(self, model: ModelVersion) -> list[str]: ...  # ids of the sessions on model
    async def sweep(self, now: float) -> int: ...  # remove expired sessions; returns how many
    def contains(self, session_id: str) -> bool: ...  # held in this process's memory
    def __len__(self) -> int: ...  # sessions held in this process's memory


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
            return idle_reason(self.idle_timeout)
        if self.lifetime and now - session.created > self.lifetime:
            return lifetime_reason(self.lifetime)
        return None

    async def get(self, session_id: str, *, fresh: bool = False) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise gone(session_id, self._gone.get(session_id))
        reason = self._expiry_reason(session, time.time())
        if reason is not None:
            self._remove(session_id, reason)
            raise gone(session_id, reason)
        return session

    def contains(self, session_id: str) -> bool:
        return session_id in self._sessions

    async def add(self, session: Session, cap: int) -> None:
        check_new(session.id, self.contains(session.id), len(self._sessions), cap)
        self._gone.pop(session.id, None)
        self._sessions[session.id] = session

    async def remove(self, session_id: str, reason: str) -> Session:
        return self._remove(session_id, reason)

    async def reset(self, session: Session) -> None:
        session.reset()

    async def refresh(self, session: Session) -> None:
        """Nothing to do: this process holds the only copy."""

    async def count(self) -> int:
        return len(self._sessions)

    async def of_model(self, model: ModelVersion) -> list[str]:
        return [s.id for s in self._sessions.values() if s.model is model]

    def _remove(self, session_id: str, reason: str) -> Session:
        session = self._sessions.pop(session_id)
        session.gen += 1
        self._gone[session_id] = reason
        if len(self._gone) > TOMBSTONES:
            self._gone.popitem(last=False)
        if self.on_remove is not None:
            self.on_remove(session_id, reason)
        return session

    async def page(self, start: int, size: int) -> list[Session]:
        out: list[Session] = []
        for i, session in enumerate(self._sessions.values()):
            if i >= start + size:
                break
            if i >= start:
                out.append(session)
        return out

    async def sweep(self, now: float) -> int:
        expired = [(s.id, r) for s in self._sessions.values() if (r := self._expiry_reason(s, now))]
        for session_id, reason in expired:
            self._remove(session_id, reason)
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
        """Check a NEW session may be created (draining, id); returns its id. The store checks
        the id is free and the cap when the session is added, atomically."""
        if self.draining:
            raise Unavailable("server is draining: no new sessions; reconnect to another server")
        return new_id(requested_id)

    async def add(self, session: Session) -> Session:
        self.admit(session.id)  # re-check: the server may have started draining while priming
        await self.store.add(session, self.max_sessions)
        bind_session(session.id)
        return session

    async def get(self, session_id: str, *, fresh: bool = False) -> Session:
        """The session, touched. fresh: re-read a shared store's copy (RPCs that report or copy
        a session must not answer from a replica's stale memory)."""
        if not session_id:
            raise InvalidArgument("session_id: required")
        bind_session(session_id)  # this call's log records name the session
        session = await self.store.get(session_id, fresh=fresh)
        session.last_used = time.time()
        return session

    async def close(self, session_id: str) -> Session:
        session = await self.get(session_id)
        return await self.store.remove(session.id, "closed by the client")

    async def reset(self, session_id: str) -> Session:
        session = await self.get(session_id, fresh=True)
        await self.store.reset(session)
        return session

    async def evict_model(self, model: ModelVersion) -> int:
        """Remove the sessions of a deleted model version."""
        doomed = await self.store.of_model(model)
        for session_id in doomed:
            await self.store.remove(session_id, f"evicted: model {model.name} v{model.version} was deleted")
        return len(doomed)
