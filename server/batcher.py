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
returns, and dropped (ABORTED) if the session was reset or closed meanwhile. With
a shared store (Redis) a batch's results are first written back with one
pipelined round trip (``commit``); a result the store refuses (another replica
advanced the session) fails its caller instead of being applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from nextchar.core.model import CharRNN
from nextchar.core.sampling import generate
from nextchar.server.compute import ComputeProcess
from nextchar.server.errors import Aborted, ServiceError
from nextchar.server.sessions import Commit, Session, WriteBack
from nextchar.server.stepping import Advanced, Packed, advance


@dataclass(slots=True)
class ChunkResult:
    """Predictions for one chunk of n characters: views into its batch's arrays, sliced on demand.

    Slicing lazily keeps per-session work in the batch thread to two row copies
    (state, probs); the handler turns the views into reply fields.
    """

    start_offset: int
    n: int
    k: int
    col: int  # this chunk's column in the batch arrays
    batch_top_index: np.ndarray  # (T, N, K) uint32
    batch_top_prob: np.ndarray  # (T, N, K) float32
    batch_surprisal: np.ndarray  # (T, N) float32
    batch_probs: np.ndarray | None  # (T + 1, N, V) when the full distribution was asked for
    state: np.ndarray  # (S,) after the chunk, a copy
    probs: np.ndarray  # (V,) prediction after the chunk, a copy

    @property
    def top_index(self) -> np.ndarray:  # (n, k), most likely first
        return self.batch_top_index[: self.n, self.col, : self.k]

    @property
    def top_prob(self) -> np.ndarray:  # (n, k)
        return self.batch_top_prob[: self.n, self.col, : self.k]

    @property
    def surprisal_bits(self) -> np.ndarray:  # (n,)
        return self.batch_surprisal[: self.n, self.col]

    @property
    def distribution(self) -> np.ndarray | None:  # (n, V)
        return None if self.batch_probs is None else self.batch_probs[1 : self.n + 1, self.col]


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
log = logging.getLogger("nextchar.server")
LONE_WINDOW = 0.002  # seconds: another session asking within this means streams overlap
GATHER_LIMIT = 4096  # chunks per batch cut


@dataclass
class BatchStats:
    """Counters for tests and the benchmark: how well the batching works."""

    batches: int = 0
    steps: int = 0
    chars: int = 0
    max_sessions: int = 0
    compute_seconds: float = 0.0  # wall time inside compute(), inline or in the thread
    remote_batches: int = 0  # batches the compute worker process ran


def pack(works: Sequence[PredictWork]) -> Packed:
    """Gather the works' chunks and states into batch arrays, longest chunk first."""
    lens = [len(w.idx) for w in works]
    uniform = min(lens) == max(lens)
    order = list(range(len(works))) if uniform else sorted(range(len(works)), key=lambda i: -lens[i])
    ws = [works[i] for i in order]
    lens = [lens[i] for i in order]
    if uniform:
        idx = np.stack([w.idx for w in ws], axis=1)  # (T, N)
    else:
        idx = np.zeros((lens[0], len(ws)), dtype=np.int64)
        for i, w in enumerate(ws):
            idx[: lens[i], i] = w.idx
    states = np.stack([w.session.state for w in ws])  # (N, S)
    probs0 = np.stack([w.session.probs for w in ws])  # (N, V)
    return Packed(order, lens, idx, states, probs0, max(w.top_k for w in ws), any(w.full for w in ws))


def unpack(works: Sequence[PredictWork], packed: Packed, out: Advanced) -> list[ChunkResult]:
    """One ChunkResult per work, in the works' order; per session only two row copies."""
    results: list[ChunkResult | None] = [None] * len(works)
    for i, j in enumerate(packed.order):
        w, n = works[j], packed.lens[i]
        results[j] = ChunkResult(
            w.session.offset,
            n,
            w.top_k,
            i,
            out.top_index,
            out.top_prob,
            out.surprisal,
            out.probs_seq,
            out.states[i].copy(),
            out.last_probs[i].copy(),
        )
    return [r for r in results if r is not None]


def step_chunks(model: CharRNN, works: Sequence[PredictWork]) -> list[ChunkResult]:
    """Advance every work's session through its chunk, all sessions stepped together (see advance)."""
    packed = pack(works)
    return unpack(
        works,
        packed,
        advance(model, packed.idx, packed.lens, packed.states, packed.probs0, packed.k, packed.full),
    )


def step_one(model: CharRNN, work: PredictWork) -> ChunkResult:
    """One session, one character: the ping-pong case, with a third of step_chunks' NumPy calls."""
    session, k = work.session, work.top_k
    new_states, probs = model.step(session.state[None, :], work.idx)  # (1, S), (1, V)
    p = probs[0]
    V = p.shape[0]
    if k < V:
        part = np.argpartition(p, V - k)[V - k :]
        order = part[np.argsort(-p[part], kind="stable")]
    else:
        order = np.argsort(-p, kind="stable")
    before = float(session.probs[work.idx[0]])
    surprisal = np.array([[-math.log2(before) if before > 0 else math.inf]], dtype=np.float32)
    full = np.stack([session.probs, p])[:, None, :] if work.full else None
    return ChunkResult(
        session.offset,
        1,
        k,
        0,
        order.astype(np.uint32).reshape(1, 1, k),
        p[order].astype(np.float32).reshape(1, 1, k),
        surprisal,
        full,
        new_states[0],  # a view of a one-row array: nothing else is kept alive
        p,
    )


def compute(batch: Sequence[Work], stats: BatchStats) -> list[ChunkResult | GenerateResult]:
    """Run one batch: predictions grouped by model version, generations one by one."""
    start = time.perf_counter()
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
        model = predict_works[0].session.model.require()
        if len(predict_works) == 1 and len(predict_works[0].idx) == 1:
            results = [step_one(model, predict_works[0])]
        else:
            results = step_chunks(model, predict_works)
        out.update(zip(members, results, strict=True))
        stats.steps += max(len(w.idx) for w in predict_works)
        stats.chars += sum(len(w.idx) for w in predict_works)
        stats.max_sessions = max(stats.max_sessions, len(predict_works))
    stats.batches += 1
    stats.compute_seconds += time.perf_counter() - start
    return [out[i] for i in range(len(batch))]


def compute_remote(
    batch: Sequence[Work], worker: ComputeProcess, stats: BatchStats
) -> list[ChunkResult | GenerateResult]:
    """compute() for prediction-only batches, with the arithmetic in the worker process."""
    start = time.perf_counter()
    groups: dict[int, list[int]] = {}
    for i, work in enumerate(batch):
        groups.setdefault(id(work.session.model), []).append(i)
    out: dict[int, ChunkResult | GenerateResult] = {}
    for members in groups.values():
        works = [w for w in (batch[i] for i in members) if isinstance(w, PredictWork)]
        packed = pack(works)
        results = unpack(works, packed, worker.advance(works[0].session.model.require(), packed))
        out.update(zip(members, results, strict=True))
        stats.steps += packed.lens[0]
        stats.chars += sum(packed.lens)
        stats.max_sessions = max(stats.max_sessions, len(works))
    stats.batches += 1
    stats.remote_batches += 1
    stats.compute_seconds += time.perf_counter() - start
    return [out[i] for i in range(len(batch))]


def _size(work: Work) -> int:
    """Characters a work consumes or produces."""
    return len(work.idx) if isinstance(work, PredictWork) else work.length


class Batcher:
    """Queues work from handlers; one loop task computes it in batches and applies the results."""

    def __init__(
        self,
        inline_chars: int = 1024,
        compute_process: bool = False,
        on_batch: Callable[[int, int], None] | None = None,
        commit: Commit | None = None,
    ) -> None:
        self.inline_chars = inline_chars
        self.commit = commit  # a shared store's write-back; None: sessions live only here
        self.on_batch = on_batch or (lambda sessions, chars: None)  # per batch run (metrics)
        self._worker = ComputeProcess() if compute_process else None
        self.stats = BatchStats()
        self._pending: list[Work] = []
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nextchar-step")
        self._task: asyncio.Task[None] | None = None
        self._busy = False  # a batch is computing in the thread
        self._last_session: Session | None = None
        self._last_time = 0.0

    def start(self) -> None:
        if self._worker is not None:
            self._worker.start()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="nextchar-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for work in self._pending:
            if not work.future.done():
                work.future.cancel()
        # wait for a running batch: the worker's pipe must not be written from two threads
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        if self._worker is not None:
            await asyncio.to_thread(self._worker.close)

    async def predict(self, session: Session, idx: np.ndarray, top_k: int, full: bool) -> ChunkResult:
        """Consume idx (n,) in session; returns the chunk's predictions once its batch ran."""
        future: asyncio.Future[ChunkResult] = asyncio.get_running_loop().create_future()
        work = PredictWork(session, idx, top_k, full, session.gen, future)
        if self._alone(session, len(idx)):
            await self._run_now(work)
        else:
            self._pending.append(work)
            self._wake.set()
        return await future

    def _alone(self, session: Session, size: int) -> bool:
        """True when nobody could share this step: the batcher is idle and no OTHER session
        asked within LONE_WINDOW. A lone ping-pong stream then skips two hops through the
        batch task; as soon as streams overlap, everything queues and batches again."""
        now = time.perf_counter()
        alone = (
            size <= self.inline_chars
            and not self._pending
            and not self._busy
            and (session is self._last_session or now - self._last_time > LONE_WINDOW)
        )
        self._last_session, self._last_time = session, now
        return alone

    async def _run_now(self, work: PredictWork) -> None:
        try:
            result = compute([work], self.stats)[0]
        except Exception as exc:
            work.future.set_exception(exc)
            return
        self.on_batch(1, len(work.idx))
        await self._finish([work], [result])

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

    async def _gather(self) -> None:
        """Let every handler that can run now add its chunk before the batch is cut.

        One loop iteration per round (sleep(0) also polls the sockets); stop when a
        round brings nothing new. No timer, so an idle server adds no latency.
        """
        seen = -1
        while seen != len(self._pending) and len(self._pending) < GATHER_LIMIT:
            seen = len(self._pending)
            await asyncio.sleep(0)

    def _compute_big(self, batch: list[Work]) -> list[ChunkResult | GenerateResult]:
        """In the batch thread: the worker process when there is one, else right here."""
        if self._worker is not None and all(isinstance(w, PredictWork) for w in batch):
            try:
                return compute_remote(batch, self._worker, self.stats)
            except Exception as exc:
                log.warning("compute worker failed (%s); computing in-process from now on", exc)
                self._worker.close()
                self._worker = None
        return compute(batch, self.stats)

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
            if sum(_size(w) for w in self._pending) <= self.inline_chars:
                await self._gather()  # small work: wait for more to share the step
            # else: enough for the compute worker already; the rest forms the next batch
            batch = self._take()
            if self._pending:
                self._wake.set()
            if not batch:
                continue
            size = sum(_size(w) for w in batch)
            try:
                if size <= self.inline_chars:
                    results = compute(batch, self.stats)
                else:
                    self._busy = True
                    try:
                        results = await loop.run_in_executor(self._executor, self._compute_big, batch)
                    finally:
                        self._busy = False
            except Exception as exc:  # a failed batch must fail its callers, not the loop
                for work in batch:
                    if not work.future.done():
                        work.future.set_exception(exc)
                continue
            self.on_batch(len(batch), size)
            await self._finish(batch, results)

    async def _finish(self, batch: Sequence[Work], results: Sequence[ChunkResult | GenerateResult]) -> None:
        """Write the batch back to a shared store (one round trip), then apply what it accepted."""
        versions: list[int | ServiceError | None] = [None] * len(batch)
        stored = [i for i, w in enumerate(batch) if w.session.version != 0 and w.gen == w.session.gen]
        if self.commit is not None and stored:
            backs = []
            for i in stored:
                work, result = batch[i], results[i]
                n = len(work.idx) if isinstance(work, PredictWork) else work.length
                backs.append(WriteBack(work.session, result.state, result.probs, result.start_offset + n, n))
            self._busy = True  # lone requests queue meanwhile: their session may be in this batch
            try:
                outcomes: Sequence[int | ServiceError] = await self.commit(backs)
            except ServiceError as exc:
                outcomes = [exc] * len(stored)
            finally:
                self._busy = False
            for i, outcome in zip(stored, outcomes, strict=True):
                versions[i] = outcome
        for work, result, version in zip(batch, results, versions, strict=True):
            self._apply(work, result, version)

    @staticmethod
    def _apply(work: Work, result: ChunkResult | GenerateResult, version: int | ServiceError | None) -> None:
        """version: the shared store's new version of the session, its refusal, or None (not stored)."""
        session = work.session
        if work.gen != session.gen or isinstance(version, ServiceError):
            if not work.future.done():
                work.future.set_exception(
                    version
                    if isinstance(version, ServiceError)
                    else Aborted(f"session {session.id!r} was reset or closed during the request")
                )
            return
        # absolute, not +=: a shared store's copy adopted meanwhile must not be advanced twice
        session.state, session.probs = result.state, result.probs
        session.offset = result.start_offset + (
            len(work.idx) if isinstance(work, PredictWork) else work.length
        )
        if version is not None:
            session.version = version
        if work.future.done():
            return
        if isinstance(work, PredictWork):
            assert isinstance(result, ChunkResult)
            work.future.set_result(result)
        else:
            assert isinstance(result, GenerateResult)
            work.future.set_result(result)
