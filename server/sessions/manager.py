"""SessionManager: the session core every protocol calls; the rules of sessions, and how they change.

Protocol adapters (the gRPC servicer, and any other) ask this for sessions,
predictions, rewinds and generations; they never reach into a store or the
compute path. Every change of a stored session is one path (``_change``): wait
for the session's turn (nextchar.server.sessions.turns), read its value, compute
the new value (nextchar.server.batching: arrays in, rows out), and have the store
swap it in if the value is still the one it was computed from. When a shared
store refuses because another replica moved the session on, the change is
computed again from the stored copy (at most STALE_RETRIES times), so no reply is
ever computed from an outdated value.

Work on values no store holds (priming a new session, a stateless Predict, a
forked generation) computes the same way and keeps its values to itself.

An adaptive session's value carries its adapter (nextchar.core.adapt); every path
here hands it to the compute path with the value (``_adapting``) and takes the
adapter after the work back into the new value, so a rewind, a fork, an export or
a replica taking over continues with exactly the adapter the text implies.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from nextchar.core.completion import Continuation
from nextchar.core.config import Sampling
from nextchar.core.model import CharRNN
from nextchar.server.batching.scheduler import Scheduler
from nextchar.server.batching.work import Adapting, Rows
from nextchar.server.budget import ReplyBudget, reply_bytes
from nextchar.server.catalog import Catalog
from nextchar.server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable, shown
from nextchar.server.logs import bind_session
from nextchar.server.registry import ModelVersion
from nextchar.server.sessions import snapshot
from nextchar.server.sessions.limits import Limits
from nextchar.server.sessions.session import Session, start_value
from nextchar.server.sessions.store import SessionStore, StaleSession, check_id, new_id
from nextchar.server.sessions.trail import Trail
from nextchar.server.sessions.turns import Turns
from nextchar.server.sessions.value import SessionValue

STALE_RETRIES = 3  # re-runs of a change whose session another replica advanced
T = TypeVar("T")
log = logging.getLogger("nextchar.server")


@dataclass(slots=True)
class Predicted:
    """A chunk's predictions as every protocol writes them. held: reply-budget bytes the reply
    holds until it is written (``SessionManager.written``)."""

    start_offset: int
    rows: Rows
    unknown_chars: str  # the chunk's characters the model does not know
    rewind_limit: int  # characters a rewind can take back after the chunk
    held: int


@dataclass(frozen=True, slots=True)
class Piece:
    """Part of a generation: its text, and the session's offset after it."""

    text: str
    offset: int


@dataclass(frozen=True, slots=True)
class Draft:
    """A starting point no store holds: a model's start (value None), or a copy of a session's
    value (a forked generation). Work from it moves nothing stored."""

    model: ModelVersion
    value: SessionValue | None = None


class Attachment:
    """A stream's hold on its session; revoked when another stream attaches to it."""

    __slots__ = ("revoked",)

    def __init__(self) -> None:
        self.revoked = False


class SessionManager:
    def __init__(
        self,
        store: SessionStore,
        scheduler: Scheduler,
        catalog: Catalog,
        limits: Limits,
        budget: ReplyBudget,
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.catalog = catalog
        self.limits = limits
        self.budget = budget  # the bytes of big replies not yet written (nextchar.server.budget)
        self.draining = False
        self.turns = Turns()
        self._attached: dict[str, Attachment] = {}  # session id -> the stream that holds it here
        self.on_adapter_reset: Callable[[], None] = lambda: None  # a diverging adapter was reset (metrics)

    # ------------------------------------------------------------ lifecycle

    def admit(self, requested_id: str) -> str:
        """Check a NEW session may be created (draining, id); returns its id. The store checks
        the id is free and the cap when the session is added, atomically."""
        if self.draining:
            raise Unavailable("server is draining: no new sessions; reconnect to another server")
        return new_id(requested_id)

    async def model(self, name: str, version: int) -> ModelVersion:
        """A model version to start from: name "" the default, version 0 the newest."""
        return await self.catalog.resolve(name, version)

    def adaptive(self, adapt: bool | None) -> bool:
        """Whether a new session adapts: as asked, else the server's default."""
        return self.limits.adapt if adapt is None else adapt

    async def create(
        self, requested_id: str, model: ModelVersion, prime_text: str = "", adapt: bool | None = None
    ) -> Session:
        """A new session on model, fed prime_text before anyone else can see it; adapt: whether it
        learns its writer (None: the server's default)."""
        self.limits.prime(prime_text)
        session_id = self.admit(requested_id)
        adaptive = self.adaptive(adapt)
        if adaptive:
            self._admit_adaptive()  # before priming: a refused session costs no steps
        net = await self.catalog.network(model)
        start = start_value(model, net, self.limits.rewind_chars, adaptive)
        value = await self.prime(model, net, start, prime_text)
        return await self._add(Session(session_id, model, value))

    async def fork(self, source_id: str, requested_id: str) -> Session:
        """A new session with source's value (values are immutable: shared, not copied; an
        adaptive session's fork adapts on from the same adapter)."""
        source = await self.get(source_id, fresh=True)
        return await self._add(Session(self.admit(requested_id), source.model, source.value))

    async def export(self, session_id: str) -> tuple[Session, bytes]:
        """The session and its value as a SessionSnapshot blob (without the rewind trail)."""
        session = await self.get(session_id, fresh=True)
        return session, snapshot.encode(session.model, session.value, session.id, trail=False)

    async def import_blob(self, requested_id: str, blob: bytes) -> Session:
        """A new session from an ExportSession blob, checked against this server's model."""
        try:
            snap = snapshot.parse(blob)
        except snapshot.SnapshotMismatch as exc:
            raise InvalidArgument(f"blob: {exc}") from None
        mv = await self.catalog.resolve(snap.model.name, snap.model.version)
        if not snapshot.same_model(mv, snap.model_checksum):
            raise FailedPrecondition(
                f"blob: model {mv.name} v{mv.version} on this server differs from the one the state came from"
            )
        net = await self.catalog.network(mv)
        try:
            value = snapshot.imported(net, mv.adapt_rule(net), snap, self.limits.rewind_chars)
        except snapshot.SnapshotMismatch as exc:
            raise InvalidArgument(f"blob: {exc}") from None
        return await self._add(Session(self.admit(requested_id), mv, value))

    def _admit_adaptive(self) -> None:
        cap = self.limits.max_adaptive_sessions
        if self.store.adaptive_held() >= cap:
            raise ResourceExhausted(
                f"adaptive session cap of {cap} reached on this server; create the session without "
                "adapt, close adaptive sessions, or retry later",
                limit="max_adaptive_sessions",
            )

    async def _add(self, session: Session) -> Session:
        self.admit(session.id)  # re-check: the server may have started draining while priming
        if session.value.adapter is not None:
            self._admit_adaptive()
        await self.store.add(session, self.limits.max_sessions)
        bind_session(session.id)
        return session

    async def get(self, session_id: str, *, fresh: bool = False) -> Session:
        """The session, touched. fresh: re-read a shared store's copy (calls that report or copy
        a session must not answer from a replica's stale memory)."""
        bind_session(check_id(session_id))  # this call's log records name the session
        session = await self.store.get(session_id, fresh=fresh)
        self.store.touch(session)
        return session

    def held(self, session: Session) -> Session | None:
        """``current`` without an await, when this server holds the session (the usual case);
        None: ask ``current``."""
        return self.store.resident(session.id)

    async def current(self, session: Session) -> Session:
        """A stream's session before its next message, when ``held`` could not answer: still alive
        (not closed or expired; a shared store's copy fetched), touched. Its id was checked and
        bound to the call's logs when the stream attached."""
        now = await self.store.get(session.id)
        self.store.touch(now)
        return now

    async def close(self, session_id: str) -> Session:
        session = await self.get(session_id)
        await self.store.remove(session.id, "closed by the client")
        return session

    async def reset(self, session_id: str) -> Session:
        session = await self.get(session_id, fresh=True)
        net = await self.catalog.network(session.model)

        async def restart(value: SessionValue) -> tuple[SessionValue, None]:
            # an adaptive session stays adaptive, with an adapter that has learnt nothing
            return start_value(session.model, net, self.limits.rewind_chars, value.adaptive), None

        await self._change(session, restart, full=True)
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

    def adapters(self) -> tuple[int, int]:
        """(adaptive sessions held here, the bytes their adapters hold): read when metrics are
        scraped. An array shared by several adapters (a fork's, a base not stepped since) counts once."""
        arrays: dict[int, np.ndarray] = {}
        count = 0
        for session in self.store.held():
            value = session.value
            if value.adapter is not None:
                count += 1
                for adapter in (value.adapter, value.base):
                    if adapter is not None:
                        arrays.update((id(a), a) for a in (*adapter.deltas, adapter.start, adapter.window))
        return count, sum(a.nbytes for a in arrays.values())

    async def page(self, start: int, size: int) -> tuple[list[Session], int]:
        """Sessions start..start+size in creation order, and how many there are in all."""
        return await self.store.page(start, size), await self.store.count()

    # ------------------------------------------------------------ changing a session

    async def _change(
        self,
        session: Session,
        compute: Callable[[SessionValue], Awaitable[tuple[SessionValue, T]]],
        *,
        full: bool = False,
        retries: int = STALE_RETRIES,
    ) -> tuple[SessionValue, SessionValue, T]:
        """The one way a stored session changes: in its turn, compute from its value, and have the
        store swap the new value in. Returns (the value computed from, the new one, compute's
        answer). full: the store writes the whole value (a reset, a rewind), not only what it
        must. retries: how often a change refused as stale is computed again."""
        turns, key = self.turns, session.id
        if not turns.take(key):  # (the usual case takes it without an await)
            await turns.acquire(key)
        try:
            for attempt in range(retries + 1):
                before = session.value
                after, answer = await compute(before)
                try:
                    if not self.store.commit_now(session, before, after, full=full):
                        with self.scheduler.settling():
                            await self.store.commit(session, before, after, full=full)
                    return before, after, answer
                except StaleSession:  # another replica moved it on: never answer from the old value
                    if attempt == retries:
                        raise
                    await self.store.refresh(session)
        finally:
            turns.release(key)
        raise AssertionError("unreachable")

    def _expect(self, session: Session, value: SessionValue, expect_offset: int | None) -> None:
        if expect_offset is not None and expect_offset != value.offset:
            raise FailedPrecondition(
                f"expect_offset: session {shown(session.id)} is at offset {value.offset}, not {expect_offset}; "
                "resume from the session's offset",
                field="expect_offset",
                offset=str(value.offset),
            )

    def _reserve(self, net: CharRNN, text: str, top_k: int, full: bool) -> tuple[int, int]:
        """Check a prediction request against the limits: (its k, the reply budget it holds)."""
        self.limits.text(text)
        k = self.limits.top_k(top_k, net.vocab.size)
        return k, self.budget.reserve(reply_bytes(len(text), k, net.vocab.size, full))

    def written(self, predicted: Predicted) -> None:
        """The reply of predicted left (or never will): its reply budget is free again."""
        self.budget.release(predicted.held)

    async def predict(
        self, session: Session, text: str, top_k: int, full: bool, expect_offset: int | None = None
    ) -> Predicted:
        """Advance session through text; expect_offset: refuse unless the session is there."""
        net = self.catalog.held(session.model) or await self.catalog.network(session.model)
        k, held = self._reserve(net, text, top_k, full)
        try:
            if expect_offset is not None and expect_offset != session.offset:
                await self.store.refresh(session)  # a replica's copy may be behind the shared store
            idx = net.vocab.encode(text)

            async def advance(value: SessionValue) -> tuple[SessionValue, Rows]:
                self._expect(session, value, expect_offset)
                adapting = None if value.adapter is None else self._adapting(session, net, value, len(idx))
                rows = await self.scheduler.predict(
                    session, net, idx, value.state, value.probs, k, full, adapting
                )
                after = value.advanced(idx, rows.state, rows.probs, rows.adapter, rows.base)
                if rows.adapter is not None:
                    self._count_resets(value, after)
                return after, rows

            before, after, rows = await self._change(session, advance)
        except BaseException:
            self.budget.release(held)
            raise
        return Predicted(before.offset, rows, net.vocab.unknown(text), after.rewind_limit, held)

    async def predict_once(
        self, model: ModelVersion, text: str, top_k: int, full: bool, adapt: bool | None = None
    ) -> Predicted:
        """Predictions for text from the model's start, in no session (adapt: adapting to the text
        as an adaptive session would; None: the server's default)."""
        net = await self.catalog.network(model)
        k, held = self._reserve(net, text, top_k, full)
        try:
            idx = net.vocab.encode(text)
            start = start_value(model, net, adaptive=self.adaptive(adapt))
            key = Draft(model, start)
            adapting = None if start.adapter is None else self._adapting(key, net, start, len(idx))
            rows = await self.scheduler.predict(key, net, idx, start.state, start.probs, k, full, adapting)
        except BaseException:
            self.budget.release(held)
            raise
        return Predicted(0, rows, net.vocab.unknown(text), 0, held)

    async def rewind(self, session: Session, chars: int, expect_offset: int | None = None) -> SessionValue:
        """Take back session's last chars characters: restore the trail's mark before them and
        re-feed what lies between (nextchar.server.sessions.trail). Returns the value after."""
        if chars < 1:
            raise InvalidArgument("chars: must be at least 1")
        if expect_offset is not None and expect_offset != session.offset:
            await self.store.refresh(session)
        net = await self.catalog.network(session.model)

        async def take_back(value: SessionValue) -> tuple[SessionValue, None]:
            self._expect(session, value, expect_offset)
            reach = value.rewind_limit
            if chars > reach:
                raise FailedPrecondition(
                    f"rewind: session {shown(session.id)} can take back at most {reach} characters now, "
                    f"not {chars} (the server keeps {self.limits.rewind_chars}; rewind_limit in SessionInfo)",
                    field="rewind",
                    rewind_limit=str(reach),
                )
            target = value.offset - chars
            # an adaptive session's adapter is known at the oldest mark only (value.base)
            replay = value.trail.replay(value.offset, chars, oldest=value.adaptive)
            # (the re-fed text leaves no marks: the trail after the rewind is the old one, cut back)
            mark = SessionValue(
                replay.mark.state, replay.mark.probs, replay.mark.offset, Trail(0), value.base
            )
            fed = await self._feed(session, net, mark, replay.text)
            trail = value.trail.rewound(target)
            return SessionValue(fed.state, fed.probs, target, trail, fed.adapter, value.base), None

        return (await self._change(session, take_back, full=True))[1]

    async def prime(self, model: ModelVersion, net: CharRNN, value: SessionValue, text: str) -> SessionValue:
        """value fed text, for a session no store holds yet (nobody else can see it)."""
        if not text:
            return value
        fed = await self._feed(Draft(model, value), net, value, net.vocab.encode(text))
        self._count_resets(value, fed)
        return fed

    async def _feed(
        self, key: Session | Draft, net: CharRNN, value: SessionValue, idx: np.ndarray
    ) -> SessionValue:
        """value advanced through idx, in chunks of max_chunk_chars."""
        step = self.limits.max_chunk_chars
        for start in range(0, len(idx), step):
            chunk = idx[start : start + step]
            adapting = None if value.adapter is None else self._adapting(key, net, value, len(chunk))
            rows = await self.scheduler.predict(key, net, chunk, value.state, value.probs, 1, False, adapting)
            value = value.advanced(chunk, rows.state, rows.probs, rows.adapter, rows.base)
        return value

    def _adapting(self, source: Session | Draft, net: CharRNN, value: SessionValue, chars: int) -> Adapting:
        """What an adaptive value's next chars characters need computed beside the static work:
        its adapter and the trail's base to move (SessionValue.base_source)."""
        assert value.adapter is not None
        base, replay = value.base_source(chars)
        return Adapting(source.model.adapt_rule(net), value.adapter, base, replay)

    def _count_resets(self, before: SessionValue, after: SessionValue) -> None:
        """Log and count (nextchar_adapter_resets_total) the times a diverging adapter was reset
        to the model's weights between two values of one session, over text it had not seen
        (a rewind's replay repeats resets already counted)."""
        if before.adapter is None or after.adapter is None:
            return
        resets = after.adapter.resets - before.adapter.resets
        if resets > 0:
            log.warning("adaptive session: a diverging adapter was reset to the model's weights (%d)", resets)
            for _ in range(resets):
                self.on_adapter_reset()

    async def generate(
        self,
        source: Session | Draft,
        prime_text: str,
        length: int,
        rng: np.random.Generator,
        sampling: Sampling,
        piece: int,
    ) -> AsyncIterator[Piece]:
        """Feed prime_text, then sample length characters, piece at a time. A stored session
        advances with each piece; a draft's value moves here alone. A piece is not re-run
        after a lost race (its random draws are spent): that answers ABORTED. An adaptive
        session's pieces end where its adapter steps (GenerateWork says why)."""
        net = await self.catalog.network(source.model)
        self.limits.generation(length, sampling, net.vocab.size)
        self.limits.prime(prime_text)
        idx = net.vocab.encode(prime_text)
        draft = None if isinstance(source, Session) else self._draft_value(source, net)
        left = length  # characters still to draw

        async def move(
            compute: Callable[[SessionValue], Awaitable[tuple[SessionValue, str]]],
        ) -> tuple[SessionValue, str]:
            """Apply one step: to the stored session (in its turn), or to the draft's value."""
            nonlocal draft
            if isinstance(source, Session):
                _, after, text = await self._change(source, compute, retries=0)
                return after, text
            assert draft is not None
            draft, text = await compute(draft)
            return draft, text

        async def prime(value: SessionValue) -> tuple[SessionValue, str]:
            fed = await self._feed(source, net, value, idx)
            self._count_resets(value, fed)
            return fed, ""

        def drawing(most: int) -> Callable[[SessionValue], Awaitable[tuple[SessionValue, str]]]:
            async def draw(value: SessionValue) -> tuple[SessionValue, str]:
                nonlocal left
                n, adapting = most, None
                if value.adapter is not None:  # up to and including the character that completes its window
                    room = source.model.adapt_rule(net).config.segment - len(value.adapter.window)
                    n = min(most, room + 1)
                    adapting = self._adapting(source, net, value, n)
                out = await self.scheduler.generate(
                    source, net, value.state, value.probs, n, rng, sampling, adapting
                )
                after = value.advanced(out.idx, out.state, out.probs, out.adapter, out.base)
                self._count_resets(value, after)
                left -= n  # drawn: a lost race is not drawn again (ABORTED)
                return after, out.text

            return draw

        if prime_text:
            await move(prime)
        while left > 0:
            after, text = await move(drawing(min(left, piece)))
            yield Piece(text, after.offset)

    async def complete(
        self, source: Session | Draft, prime_text: str, n: int, max_chars: int
    ) -> tuple[int, list[Continuation]]:
        """The likeliest continuations from where source is, after prime_text (a draft's only):
        (the offset they continue from, the continuations). Nothing stored moves."""
        n, max_chars = self.limits.completion(n, max_chars)
        net = await self.catalog.network(source.model)
        if isinstance(source, Session):
            if prime_text:
                raise InvalidArgument("prime_text: a session completes from where it is; send no prime_text")
            value = source.value
        else:
            self.limits.prime(prime_text)
            value = await self.prime(source.model, net, self._draft_value(source, net), prime_text)
        found = await self.scheduler.complete(
            source, net, value.state, value.probs, n, max_chars, value.adapter
        )
        return value.offset, found

    @staticmethod
    def _draft_value(draft: Draft, net: CharRNN) -> SessionValue:
        return draft.value if draft.value is not None else start_value(draft.model, net)
