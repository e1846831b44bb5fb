"""Session: one hidden state on the server, as an object that survives dropped connections.

The session remembers the last offset the server acknowledged. Every chunk it
sends carries ``expect_offset``, so the server refuses a chunk that would be fed
twice. When a stream breaks, ``stream`` reconnects, asks the server where the
session stands, drops the unacknowledged characters the server already consumed
(their replies were lost with the connection; ``lost_chars`` counts them), and
resends the rest: nothing is fed twice and nothing is skipped.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from itertools import accumulate
from types import TracebackType

from nextchar.client.channel import Connection, StreamCall
from nextchar.client.errors import Cancelled, OffsetMismatch, SessionNotFound, Unavailable
from nextchar.client.results import (
    Candidate,
    Completion,
    Generation,
    ModelRef,
    Predictions,
    Rewind,
    SessionInfo,
    candidates,
)
from nextchar.proto import nextchar_pb2 as pb

RESUMABLE = (Unavailable, Cancelled)  # what a dropped connection or a server-side drop looks like
Item = str | Rewind  # what Session.stream sends: text to consume, or characters to take back


def sample(
    conn: Connection,
    request: pb.GenerateRequest,
    prime: str,
    length: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    on_piece: Callable[[str], None] | None,
) -> Generation:
    """Run a Generate whose source (a session, or a model) is already set in request."""
    request.prime_text, request.length = prime, length
    request.temperature, request.top_k, request.top_p = temperature, top_k, top_p
    if seed is not None:
        request.seed = seed
    pieces = conn.stream(conn.stub.Generate, request, timeout=conn.timeout)
    return Generation.collect(pieces, on_piece, prime)


class Session:
    """A live session; get one from ``NextCharClient.session``, ``attach`` or ``import_session``."""

    def __init__(self, conn: Connection, info: SessionInfo, vocab: str = "", *, resume_attempts: int = 5):
        self._conn = conn
        self.info = info
        self.vocab = vocab  # learnt from the first prediction when attaching
        self.resume_attempts = resume_attempts
        self.lost_chars = 0  # characters consumed during a drop whose predictions never arrived
        self.resumes = 0  # how many times a stream was resumed
        self.closed = False

    @property
    def id(self) -> str:
        return self.info.session_id

    @property
    def model(self) -> ModelRef:
        return self.info.model

    @property
    def offset(self) -> int:
        """Characters the server has acknowledged consuming."""
        return self.info.offset

    def _set_offset(self, offset: int) -> None:
        self.info = SessionInfo(**{**self.info.__dict__, "offset": offset})

    # ------------------------------------------------------------ unary calls

    def refresh(self) -> SessionInfo:
        """Ask the server where the session stands (offset, expiry)."""
        resp = self._conn.call(self._conn.stub.GetSession, pb.GetSessionRequest(session_id=self.id))
        self.info = SessionInfo.from_pb(resp.session)
        return self.info

    def feed(self, text: str, *, top_k: int = 3, full_distribution: bool = False) -> Predictions:
        """Consume text and return a prediction for every character of it."""
        request = pb.PredictRequest(
            session_id=self.id,
            text=text,
            top_k=top_k,
            full_distribution=full_distribution,
            expect_offset=self.offset,  # a retry after a lost reply is refused, not fed twice
        )
        try:
            resp = self._conn.call(self._conn.stub.Predict, request)
        except Unavailable:
            resp = self._conn.call(self._conn.stub.Predict, request, wait_for_ready=True)
        self.vocab = resp.vocab or self.vocab
        self._set_offset(resp.predictions.start_offset + resp.predictions.count)
        return Predictions(resp.predictions, self.vocab, text)

    def rewind(self, chars: int = 1, *, top_k: int = 3) -> tuple[Candidate, ...]:
        """Take back the last chars characters (at most ``info.rewind_limit``); returns the
        prediction where the session now stands. FailedPrecondition when it cannot reach back."""
        request = pb.RewindSessionRequest(
            session_id=self.id, chars=chars, top_k=top_k, expect_offset=self.offset
        )
        resp = self._conn.call(self._conn.stub.RewindSession, request)
        self.info, self.vocab = SessionInfo.from_pb(resp.session), resp.vocab
        return candidates(resp.next, self.vocab)

    def complete(self, n: int = 3, *, max_chars: int = 12) -> list[Completion]:
        """The n likeliest continuations from where the session stands, up to a word boundary
        or max_chars; the session does not move."""
        request = pb.CompleteRequest(session_id=self.id, n=n, max_chars=max_chars)
        return completions(self._conn.call(self._conn.stub.Complete, request))

    def stream(
        self, chunks: Iterable[Item], *, top_k: int = 3, full_distribution: bool = False
    ) -> Iterator[Predictions]:
        """Stream chunks of text (and Rewind items) over one PredictStream; yield each one's
        predictions in order (for a Rewind: an empty Predictions whose ``next`` is the
        prediction where the session went back to).

        A dropped stream is resumed (up to ``resume_attempts`` times in a row) at the
        last acknowledged offset.
        """
        feeder = _Feeder(iter(chunks), self.id, top_k, full_distribution)
        failures = 0
        while True:
            call: StreamCall[pb.PredictStreamResponse] | None = None
            try:
                if failures:
                    self._resync(feeder)
                call = self._conn.stream(self._conn.stub.PredictStream, feeder.requests(self.offset))
                for resp in call:
                    item = feeder.acknowledge()
                    self.vocab = resp.vocab or self.vocab
                    self._set_offset(resp.predictions.start_offset + resp.predictions.count)
                    failures = 0
                    after = resp.next if isinstance(item, Rewind) else None
                    text = "" if isinstance(item, Rewind) else item
                    yield Predictions(resp.predictions, self.vocab, text, after, resp.rewind_limit)
                feeder.raise_source_error()
                return
            except RESUMABLE:
                feeder.retire()  # the broken stream's request iterator must not pull any more
                feeder.raise_source_error()
                failures += 1
                if failures > self.resume_attempts:
                    raise
            finally:
                if call is not None:
                    call.cancel()

    def _resync(self, feeder: _Feeder) -> None:
        """After a drop: wait for the server, learn its offset, skip what it already consumed."""
        resp = self._conn.call(
            self._conn.stub.GetSession, pb.GetSessionRequest(session_id=self.id), wait_for_ready=True
        )
        server_offset = resp.session.offset
        try:
            consumed = feeder.drop_consumed(self.offset, server_offset)
        except ValueError:
            raise OffsetMismatch(
                f"session {self.id!r}: the server is at offset {server_offset}, but this client "
                f"acknowledged {self.offset}; the session was reset or fed by someone else",
                offset=server_offset,
            ) from None
        self.lost_chars += consumed
        self.resumes += 1
        self.info = SessionInfo.from_pb(resp.session)

    def generate(
        self,
        length: int,
        *,
        prime: str = "",
        fork: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        on_piece: Callable[[str], None] | None = None,
    ) -> Generation:
        """Sample length characters after prime; advances the session unless fork is set.

        on_piece sees the text piece by piece as the server sends it.
        """
        request = pb.GenerateRequest(session_id=self.id, fork=fork)
        generation = sample(self._conn, request, prime, length, temperature, top_k, top_p, seed, on_piece)
        if not fork:
            self._set_offset(generation.offset)
        return generation

    def fork(self, session_id: str = "") -> Session:
        """A new session starting from a copy of this one's state."""
        request = pb.ForkSessionRequest(source_session_id=self.id, session_id=session_id)
        resp = self._conn.call(self._conn.stub.ForkSession, request)
        return Session(
            self._conn, SessionInfo.from_pb(resp.session), self.vocab, resume_attempts=self.resume_attempts
        )

    def reset(self) -> SessionInfo:
        """Back to the model's initial state and offset 0."""
        resp = self._conn.call(self._conn.stub.ResetSession, pb.ResetSessionRequest(session_id=self.id))
        self.info = SessionInfo.from_pb(resp.session)
        return self.info

    def export(self) -> bytes:
        """The session's state as a portable blob for ``NextCharClient.import_session``."""
        resp = self._conn.call(self._conn.stub.ExportSession, pb.ExportSessionRequest(session_id=self.id))
        self.info = SessionInfo.from_pb(resp.session)
        return resp.blob

    def close(self) -> None:
        """Close the session on the server; closing twice is harmless."""
        if self.closed:
            return
        with suppress(SessionNotFound):  # already gone (expired or closed elsewhere): the goal is reached
            self._conn.call(self._conn.stub.CloseSession, pb.CloseSessionRequest(session_id=self.id))
        self.closed = True

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Session(id={self.id!r}, model={self.model}, offset={self.offset})"


class _Feeder:
    """The chunks of one ``Session.stream`` call: pulled from the caller's iterable once, kept until acknowledged.

    gRPC consumes a request iterator on its own thread, and after a drop the old
    iterator may still be blocked pulling from the source while a new stream starts.
    So pulling is serialized, every pulled chunk lands in ``pending`` in order, and
    an iterator whose stream was replaced stops before sending anything more.
    """

    def __init__(self, source: Iterator[Item], session_id: str, top_k: int, full_distribution: bool) -> None:
        self.source = source
        self.session_id, self.top_k, self.full_distribution = session_id, top_k, full_distribution
        self.pending: deque[Item] = deque()  # pulled from source, not yet acknowledged
        self.acked = 0  # sequence number of pending[0]
        self.exhausted = False
        self.source_error: BaseException | None = None
        self.generation = 0  # bumped when a new stream replaces the old one
        self.lock = threading.Lock()
        self.pull_lock = threading.Lock()

    def retire(self) -> None:
        """Stop the current stream's request iterator before it pulls or sends anything more."""
        with self.lock:
            self.generation += 1

    def requests(self, offset: int) -> Iterator[pb.PredictStreamRequest]:
        """The requests of one stream: every unacknowledged chunk, then new ones from the source."""
        with self.lock:
            self.generation += 1
            generation, seq = self.generation, self.acked
        while True:
            with self.lock:
                if generation != self.generation:
                    return
                chunk = self.pending[seq - self.acked] if seq - self.acked < len(self.pending) else None
            if chunk is None:
                if not self._pull(seq):
                    return
                continue
            request = pb.PredictStreamRequest(
                session_id=self.session_id,
                top_k=self.top_k,
                full_distribution=self.full_distribution,
                expect_offset=offset,
            )
            if isinstance(chunk, Rewind):
                request.rewind = chunk.chars
            else:
                request.text = chunk
            yield request
            offset += _moves(chunk)
            seq += 1

    def _pull(self, seq: int) -> bool:
        """Make chunk seq available; False when the source has no more."""
        with self.pull_lock:
            with self.lock:
                if seq - self.acked < len(self.pending):
                    return True  # another stream's iterator pulled it meanwhile
                if self.exhausted:
                    return False
            try:
                chunk = next(self.source)
            except StopIteration:
                self.exhausted = True
                return False
            except BaseException as error:
                self.source_error, self.exhausted = error, True
                return False
            with self.lock:
                if chunk:
                    self.pending.append(chunk)
            return True

    def acknowledge(self) -> Item:
        with self.lock:
            self.acked += 1
            return self.pending.popleft()

    def drop_consumed(self, start: int, now: int) -> int:
        """The server took a session at offset start to offset now with the first unacknowledged
        items: never send those again. Returns the characters of them (their replies were lost);
        ValueError when no prefix of the items leads there, or more than one does (rewinds)."""
        with self.lock:
            ends = list(accumulate(map(_moves, self.pending), initial=start))
            matches = [j for j, end in enumerate(ends) if end == now]
            if len(matches) != 1:
                raise ValueError(f"no single prefix of the unacknowledged items leads to offset {now}")
            done = [self.pending.popleft() for _ in range(matches[0])]
            self.acked += len(done)
            return sum(len(item) for item in done if isinstance(item, str))

    def raise_source_error(self) -> None:
        if self.source_error is not None:
            raise self.source_error


def _moves(item: Item) -> int:
    """How far an item moves its session's offset."""
    return -item.chars if isinstance(item, Rewind) else len(item)


def completions(resp: pb.CompleteResponse) -> list[Completion]:
    return [Completion(c.text, c.prob, c.complete) for c in resp.completions]
