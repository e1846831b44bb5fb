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
from nextchar.core.completion import Continuation, complete
from nextchar.core.config import Sampling
from nextchar.server.batching.scheduler import Scheduler
from nextchar.server.batching.work import ChunkResult, GenerateResult
from nextchar.server.errors import FailedPrecondition, Unavailable, shown
from nextchar.server.logs import bind_session
from nextchar.server.registry import ModelVersion
from nextchar.server.sessions.session import Session, WriteBack
from nextchar.server.sessions.store import SessionStore, StaleSession, check_id, new_id

STALE_RETRIES = 3  # re-runs of a chunk (or a reset, a rewind) whose session another replica advanced


class Attachment:
    """A PredictStream's hold on its session; revoked when another stream attaches to it."""

    __slots__ = ("revoked",)

    def __init__(self) -> None:
        self.revoked = False


class SessionManager:
    def __init__(
        self,
        store: SessionStore,
        scheduler: Scheduler,
        max_sessions: int,
        max_chunk_chars: int,
        rewind_chars: int = 0,
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.max_sessions = max_sessions
        self.max_chunk_chars = max_chunk_chars  # priming text is fed in chunks of this size
        self.rewind_chars = rewind_chars  # what each session's trail keeps (nextchar.server.sessions.trail)
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
        session = Session.fresh(self.admit(requested_id), model, self.rewind_chars)
        if prime_text:
            await self.prime(session, prime_text)
        return await self.add(session)

    def imported(
        self, requested_id: str, model: ModelVersion, state: np.ndarray, probs: np.ndarray
    ) -> Session:
        """A new session from an exported state (not yet added): its rewinds reach back to here."""
        return Session(self.admit(requested_id), model, state, probs, self.rewind_chars)

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
        await self.store.remove(session.id, "closed by the client")
        return session

    async def reset(self, session_id: str) -> Session:
        session = await self.get(session_id, fresh=True)
        for attempt in range(STALE_RETRIES + 1):
            try:
                await self.store.put(session.start())
                return session
            except StaleSession:
                if attempt == STALE_RETRIES:
                    raise
                await self.store.refresh(session)
        raise AssertionError("unreachable")

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
            self._expect(session, expect_offset)
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

    async def rewind(self, session: Session, chars: int, expect_offset: int | None = None) -> None:
        """Take back session's last chars characters: restore the trail's mark before them and
        re-feed what lies between (nextchar.server.sessions.trail)."""
        if expect_offset is not None and expect_offset != session.offset:
            await self.store.refresh(session)
        for attempt in range(STALE_RETRIES + 1):
            self._expect(session, expect_offset)
            reach = session.trail.reach(session.offset)
            if chars > reach:
                raise FailedPrecondition(
                    f"rewind: session {shown(session.id)} can take back at most {reach} characters now, "
                    f"not {chars} (the server keeps {self.rewind_chars}; rewind_limit in SessionInfo)",
                    field="rewind",
                    rewind_limit=str(reach),
                )
            trail, target = session.trail, session.offset - chars
            replay = trail.replay(session.offset, chars)
            back = Session(session.id, session.model, replay.mark.state, replay.mark.probs)
            back.offset = replay.mark.offset
            if len(replay.text):
                await self.prime_indices(back, replay.text)
            try:
                if session.trail is not trail:  # the session moved while the text was re-fed
                    raise StaleSession(f"session {shown(session.id)} advanced during the rewind")
                await self.store.put(
                    WriteBack(session, back.state, back.probs, target, 0, trail.rewound(target))
                )
                return
            except StaleSession:
                if attempt == STALE_RETRIES:
                    raise
                await self.store.refresh(session)

    def _expect(self, session: Session, expect_offset: int | None) -> None:
        if expect_offset is not None and expect_offset != session.offset:
            raise FailedPrecondition(
                f"expect_offset: session {shown(session.id)} is at offset {session.offset}, not {expect_offset}; "
                "resume from the session's offset",
                field="expect_offset",
                offset=str(session.offset),
            )

    def complete(self, session: Session, n: int, max_chars: int) -> list[Continuation]:
        """The session's likeliest continuations; the session does not move. A few small
        products (make bench-complete): computed here, on the loop, like a small batch."""
        return complete(session.model.require(), session.state, session.probs, n, max_chars)

    async def prime(self, session: Session, text: str) -> None:
        """Feed text to a session not yet in the store (nobody else can advance it)."""
        await self.prime_indices(session, session.model.encode(text)[0])

    async def prime_indices(self, session: Session, idx: np.ndarray) -> None:
        step = self.max_chunk_chars
        for start in range(0, len(idx), step):
            await self.scheduler.predict(session, idx[start : start + step], 1, False)

    async def generate(
        self, session: Session, length: int, rng: np.random.Generator, sampling: Sampling
    ) -> GenerateResult:
        """Sample length characters from session, advancing it. A generation is not re-run after a
        lost race (its random draws are spent): that answers ABORTED (StaleSession)."""
        return await self.scheduler.generate(session, length, rng, sampling)
