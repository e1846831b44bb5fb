"""The batcher: every session with text waiting is advanced together, one model.step per time step.

Stream handlers never touch NumPy. They hand a chunk to ``Batcher.predict`` and
await the result; a single loop task takes everything queued, groups it by model
version and runs, for each group, ONE ``model.step(states (N, S), idx (N,))`` per
character position (a lone chunk uses ``model.run``, the faster one-session path).
At H=256 that turns ~17 µs per character of a one-session step into ~4 µs per
character when 100-1,000 sessions step together (see /work/shared/ANCHORS.md).

Batching is free of timers: while one batch computes (in a worker thread, so the
event loop keeps serving gRPC and NumPy's matrix products run without the GIL),
the next one accumulates. Tiny batches run inline on the loop, because a thread
hop would cost more than the step itself for a lone one-character ping-pong.

Only the loop thread writes session state: results are applied after the compute
returns, and dropped (ABORTED) if the session was reset or closed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from nextchar.core.model import CharRNN
from nextchar.core.sampling import generate
from nextchar.server.errors import Aborted
from nextchar.server.sessions import Session


@dataclass(slots=True)
class ChunkResult:
    """Predictions for one chunk of n characters; arrays are the caller's to keep."""

    start_offset: int
    top_index: np.ndarray  # (n, k) uint32, most likely first
    top_prob: np.ndarray  # (n, k) float32
    surprisal_bits: np.ndarray  # (n,) float32
    distribution: np.ndarray | None  # (n, V) when asked for
    state: np.ndarray  # (S,) after the chunk
    probs: np.ndarray  # (V,) prediction after the chunk


@dataclass(slots=True)
class GenerateResult:
    start_offset: int
    text: str
    state: np.ndarray
    probs: np.ndarray


@dataclass(slots=True)
class PredictWork:
    session: Session
    idx: np.ndarray  # (n,) int64
    top_k: int
    full: bool
    gen: int
    future: asyncio.Future[ChunkResult]


@dataclass(slots=True)
class GenerateWork:
    session: Session
    length: int
    rng: np.random.Generator
    temperature: float
    top_k: int
    top_p: float
    gen: int
    future: asyncio.Future[GenerateResult]


Work = PredictWork | GenerateWork


@dataclass
class BatchStats:
    """Counters for tests and the benchmark: how well the batching works."""

    batches: int = 0
    steps: int = 0
    chars: int = 0
    max_sessions: int = 0
    sessions_stepped: list[int] = field(default_factory=list)


def top_k_rows(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries of each row of probs (M, V), largest first: (indices, values)."""
    V = probs.shape[1]
    if k >= V:
        order = np.argsort(-probs, axis=1, kind="stable")
        return order.astype(np.uint32), np.take_along_axis(probs, order, axis=1)
    part = np.argpartition(probs, V - k, axis=1)[:, V - k :]  # (M, k) unordered
    vals = np.take_along_axis(probs, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1).astype(np.uint32), np.take_along_axis(vals, order, axis=1)


def step_chunks(model: CharRNN, works: Sequence[PredictWork]) -> list[ChunkResult]:
    """Advance every work's session through its chunk, all sessions stepped together.

    Works are sorted longest first, so the sessions still active at position t
    are a prefix of the batch: step t is one ``model.step(states[:n_t], idx[t, :n_t])``.
    """
    order = sorted(range(len(works)), key=lambda i: -len(works[i].idx))
    ws = [works[i] for i in order]
    N = len(ws)
    lens = np.fromiter((len(w.idx) for w in ws), dtype=np.int64, count=N)
    T, V = int(lens[0]), model.vocab.size
    K = max(w.top_k for w in ws)
    probs_seq = np.empty((T + 1, N, V), dtype=model.dtype)  # [0]: before the chunk; [t+1]: after char t
    idx = np.zeros((T, N), dtype=np.int64)
    if N == 1:
        w = ws[0]
        idx[:, 0] = w.idx
        probs_seq[0, 0] = w.session.probs
        final, run_probs = model.run(w.session.state, w.idx)  # (S,), (T, V)
        probs_seq[1:, 0] = run_probs
        states = final[None, :]
    else:
        for i, w in enumerate(ws):
            idx[: lens[i], i] = w.idx
        states = np.stack([w.session.state for w in ws])  # (N, S)
        probs_seq[0] = np.stack([w.session.probs for w in ws])
        active = (lens[None, :] > np.arange(T)[:, None]).sum(axis=1)  # (T,) sessions still going
        for t in range(T):
            n = int(active[t])
            new_states, probs = model.step(states[:n], idx[t, :n])  # ONE product for n sessions
            states[:n] = new_states  # rows past n keep their final state
            probs_seq[t + 1, :n] = probs
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # padding rows (past a chunk's end) hold garbage; they are computed, never read
        surprisal = -np.log2(np.take_along_axis(probs_seq[:T], idx[:, :, None], axis=2)[:, :, 0])
        top_i, top_p = top_k_rows(probs_seq[1:].reshape(T * N, V), K)
    top_i, top_p = top_i.reshape(T, N, K), top_p.reshape(T, N, K).astype(np.float32, copy=False)
    results: list[ChunkResult | None] = [None] * N
    for i, w in enumerate(ws):
        n, k = int(lens[i]), w.top_k
        results[order[i]] = ChunkResult(
            start_offset=w.session.offset,
            top_index=np.ascontiguousarray(top_i[:n, i, :k]),
            top_prob=np.ascontiguousarray(top_p[:n, i, :k]),
            surprisal_bits=surprisal[:n, i].astype(np.float32),
            distribution=probs_seq[1 : n + 1, i].astype(np.float32) if w.full else None,
            state=states[i].copy(),
            probs=probs_seq[n, i].copy(),
        )
    return [r for r in results if r is not None]


def compute(batch: Sequence[Work], stats: BatchStats) -> list[ChunkResult | GenerateResult]:
    """Run one batch: predictions grouped by model version, generations one by one."""
    out: dict[int, ChunkResult | GenerateResult] = {}
    groups: dict[int, list[int]] = {}
    for i, work in enumerate(batch):
        if isinstance(work, PredictWork):
            groups.setdefault(id(work.session.model), []).append(i)
        else:
            s = work.session
            text, state, probs = generate(
                s.model.require(),
                s.state,
                s.probs,
                work.length,
                work.rng,
                work.temperature,
                work.top_k,
                work.top_p,
            )
            out[i] = GenerateResult(s.offset, text, state, probs)
    for members in groups.values():
        works = [batch[i] for i in members]
        assert all(isinstance(w, PredictWork) for w in works)
        predict_works = [w for w in works if isinstance(w, PredictWork)]
        results = step_chunks(predict_works[0].session.model.require(), predict_works)
        out.update(zip(members, results, strict=True))
        stats.steps += max(len(w.idx) for w in predict_works)
        stats.chars += sum(len(w.idx) for w in predict_works)
        stats.max_sessions = max(stats.max_sessions, len(predict_works))
    stats.batches += 1
    return [out[i] for i in range(len(batch))]


class Batcher:
    """Queues work from handlers; one loop task computes it in batches and applies the results."""

    def __init__(self, inline_chars: int = 16) -> None:
        self.inline_chars = inline_chars
        self.stats = BatchStats()
        self._pending: list[Work] = []
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nextchar-step")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="nextchar-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for work in self._pending:
            if not work.future.done():
                work.future.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def predict(self, session: Session, idx: np.ndarray, top_k: int, full: bool) -> ChunkResult:
        """Consume idx (n,) in session; returns the chunk's predictions once its batch ran."""
        future: asyncio.Future[ChunkResult] = asyncio.get_running_loop().create_future()
        self._pending.append(PredictWork(session, idx, top_k, full, session.gen, future))
        self._wake.set()
        return await future

    async def generate(
        self,
        session: Session,
        length: int,
        rng: np.random.Generator,
        temperature: float,
        top_k: int,
        top_p: float,
    ) -> GenerateResult:
        future: asyncio.Future[GenerateResult] = asyncio.get_running_loop().create_future()
        self._pending.append(
            GenerateWork(session, length, rng, temperature, top_k, top_p, session.gen, future)
        )
        self._wake.set()
        return await future

    def _take(self) -> list[Work]:
        """Everything queued, at most one work per session (the rest waits its turn, in order)."""
        batch: list[Work] = []
        later: list[Work] = []
        seen: set[int] = set()
        for work in self._pending:
            if work.future.done():  # the caller went away (cancelled) before its turn
                continue
            key = id(work.session)
            if key in seen:
                later.append(work)
            else:
                seen.add(key)
                batch.append(work)
        self._pending = later
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch = self._take()
            if self._pending:
                self._wake.set()
            if not batch:
                continue
            size = sum(len(w.idx) if isinstance(w, PredictWork) else w.length for w in batch)
            try:
                if size <= self.inline_chars:
                    results = compute(batch, self.stats)
                else:
                    results = await loop.run_in_executor(self._executor, compute, batch, self.stats)
            except Exception as exc:  # a failed batch must fail its callers, not the loop
                for work in batch:
                    if not work.future.done():
                        work.future.set_exception(exc)
                continue
            for work, result in zip(batch, results, strict=True):
                self._apply(work, result)

    @staticmethod
    def _apply(work: Work, result: ChunkResult | GenerateResult) -> None:
        session = work.session
        if work.gen != session.gen:
            if not work.future.done():
                work.future.set_exception(
                    Aborted(f"session {session.id!r} was reset or closed during the request")
                )
            return
        session.state, session.probs = result.state, result.probs
        session.offset += len(work.idx) if isinstance(work, PredictWork) else work.length
        if work.future.done():
            return
        if isinstance(work, PredictWork):
            assert isinstance(result, ChunkResult)
            work.future.set_result(result)
        else:
            assert isinstance(result, GenerateResult)
            work.future.set_result(result)
