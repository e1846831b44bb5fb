"""SessionManager: the session rules around a store (the cap, draining, ids) and advancing sessions.

The servicer asks this for sessions and predictions; it never reaches into the
store. Advancing a session goes through the scheduler; when a shared store
refuses the advance because another replica moved the session on, the chunk is
re-run here from the stored copy (at most STALE_RETRIES times), so no reply is
ever computed from an outdated state.
"""

from __future__ import annotations

import time

import numpy as np
from nextchar.core.config import Sampling
from nextchar.server.batching.scheduler import Scheduler
from nextchar.server.batching.work import ChunkResult, GenerateResult
from nextchar.server.errors import FailedPrecondition, Unavailable, shown
from nextchar.server.logs import bind_session
from nextchar.server.registry import ModelVersion
from nextchar.server.sessions.session import Session
from nextchar.server.sessions.store import SessionStore, StaleSession, check_id, new_id

STALE_RETRIES = 3  # re-runs of a chunk whose session another replica advanced meanwhile


class Attachment:
    """A PredictStream's hold on its session; revoked when another stream attaches to it."""

    __slots__ = ("revoked",)

    def __init__(self) -> None:
        self.revoked = False


class SessionManager:
    def __init__(
        self, store: SessionStore, scheduler: Scheduler, max_sessions: int, max_chunk_chars: int
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.max_sessions = max_sessions
        self.max_chunk_chars = max_chunk_chars  # priming text is fed in chunks of this size
        self.draining = False
        self._attached: dict[str, Attachment] = {}  # session id -> the stream that holds it here

    # ------------------------------------------------------------ lifecycle

    def admit(self, requested_id: str) -> str:
        """Check a NEW session may be created (draining, id); returns its id. The store checks
        the id is free and the cap when the session is added, atomically."""
        if self.draining:
            raise Unavailable("server is draining: no new sessions; reconnect to another server")
        return new_id(requested_id)

    async def create(self, requested_id: str, model: ModelVersion, prime_text: str = "") -> Session:
        """A new session on model, fed prime_text before anyone else can see it."""
        session = Session.fresh(self.admit(requested_id), model)
        if prime_text:
            await self.prime(session, prime_text)
        return await self.add(session)

    async def add(self, session: Session) -> Session:
        self.admit(session.id)  # re-check: the server may have started draining while priming
        await self.store.add(session, self.max_sessions)
        bind_session(session.id)
        return session

    async def get(self, session_id: str, *, fresh: bool = False) -> Session:
        """The session, touched. fresh: re-read a shared store's copy (RPCs that report or copy
        a session must not answer from a replica's stale memory)."""
        bind_session(check_id(session_id))  # this call's log records name the session
        session = await self.store.get(session_id, fresh=fresh)
        session.last_used = time.time()
        return session

    async def again(self, session: Session) -> Session:
        """A stream's session before its next chunk: still alive (not closed or expired), touched.
        Its id was checked and bound to the call's logs when the stream attached."""
        current = await self.store.get(session.id)
        current.last_used = time.time()
        return current

    async def close(self, session_id: str) -> Session:
        session = await self.get(session_id)
        return await self.store.remove(session.id, "closed by the client")

    async def reset(self, session_id: str) -> Session:
        session = await self.get(session_id, fresh=True)
        await self.store.reset(session)
        return session

    def attach(self, session_id: str) -> Attachment:
        """Attach a stream to a session: the last stream attached is the one that advances it
        (a client resuming after a drop takes over from its half-dead stream); the stream
        attached before ends at its next message. Per replica: across replicas, clients
        that need exclusivity send expect_offset (docs/api.md)."""
        previous = self._attached.get(session_id)
        if previous is not None:
            previous.revoked = True
        attachment = self._attached[session_id] = Attachment()
        return attachment

    def detach(self, session_id: str, attachment: Attachment) -> None:
        if self._attached.get(session_id) is attachment:
            del self._attached[session_id]

    async def evict_model(self, model: ModelVersion) -> int:
        """Remove the sessions of a deleted model version."""
        doomed = await self.store.of_model(model)
        for session_id in doomed:
            await self.store.remove(session_id, f"evicted: model {model.name} v{model.version} was deleted")
        return len(doomed)

    async def page(self, start: int, size: int) -> tuple[list[Session], int]:
        """Sessions start..start+size in creation order, and how many there are in all."""
        return await self.store.page(start, size), await self.store.count()

    # ------------------------------------------------------------ advancing

    async def predict(
        self, session: Session, text: str, top_k: int, full: bool, expect_offset: int | None = None
    ) -> ChunkResult:
        """Advance session through text; expect_offset: refuse unless the session is there."""
        if expect_offset is not None and expect_offset != session.offset:
            await self.store.refresh(session)  # a replica's copy may be behind the shared store
        idx, has_unknown = session.model.encode(text)
        for attempt in range(STALE_RETRIES + 1):
            if expect_offset is not None and expect_offset != session.offset:
                raise FailedPrecondition(
                    f"expect_offset: session {shown(session.id)} is at offset {session.offset}, not {expect_offset}; "
                    "resume from the session's offset",
                    field="expect_offset",
                    offset=str(session.offset),
                )
            try:
                result = await self.scheduler.predict(session, idx, top_k, full)
                break
            except StaleSession:  # another replica advanced it: never answer from the old state
                if attempt == STALE_RETRIES:
                    raise
                await self.store.refresh(session)
        if has_unknown:
            result.unknown_chars = session.model.require().vocab.unknown(text)
        return result

    async def prime(self, session: Session, text: str) -> None:
        """Feed text to a session not yet in the store (nobody else can advance it)."""
        step = self.max_chunk_chars
        for start in range(0, len(text), step):
            await self.scheduler.predict(
                session, session.model.encode(text[start : start + step])[0], 1, False
            )

    async def generate(
        self, session: Session, length: int, rng: np.random.Generator, sampling: Sampling
    ) -> GenerateResult:
        """Sample length characters from session, advancing it. A generation is not re-run after a
        lost race (its random draws are spent): that answers ABORTED (StaleSession)."""
        return await self.scheduler.generate(session, length, rng, sampling)
