"""The batcher: every session with text waiting is advanced together, one model.step per time step.

Stream handlers never touch NumPy. They hand a chunk to ``Batcher.predict`` and
await the result; a single loop task takes everything queued, groups it by model
version and runs, for each group, ONE ``model.step(states (N, S), idx (N,))`` per
character position (a lone chunk uses ``model.run``, the faster one-session path).
At H=256 that turns ~17 µs per character of a one-session step into ~4 µs per
character when 100-1,000 sessions step together (see /work/shared/ANCHORS.md).

Batching is free of timers: while one batch computes (in the compute worker
process, or a thread), the next one accumulates. Once it holds every stream the
previous batch answered, it is sent to queue behind the computing one (MAX_IN_FLIGHT),
so the worker does not wait for the event loop between two batches: 64-character
chunks at 100 streams went from ~185k to ~205k characters/s. A session is in one
batch at a time.
Tiny batches run inline on the loop, because a process hop would cost more than
the step itself for a lone one-character ping-pong.

Only the loop thread writes session state: results are applied after the compute
returns, and dropped (ABORTED) if the session was reset or closed meanwhile. With
a shared store (Redis) a batch's results are first written back with one
pipelined round trip (``commit``); a result the store refuses (another replica
advanced the session) fails its caller instead of being applied.
"""

from __future__ import annotations

import asyncio
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
    batch_top_index: np.ndarray  # (T, N, K) of integers
    batch_top_prob: np.ndarray  # (T, N, K) of floats
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

    def reply_lists(self) -> tuple[list[int], list[float], list[float]]:
        """(top_index n*k, top_prob n*k, surprisal_bits n) as flat lists, for the reply.
        One character (the ping-pong case) takes half the NumPy calls of the general slice."""
        col, k = self.col, self.k
        if self.n == 1:
            return (
                self.batch_top_index[0, col, :k].tolist(),
                self.batch_top_prob[0, col, :k].tolist(),
                [float(self.batch_surprisal[0, col])],
            )
        return (
            self.top_index.ravel().tolist(),
            self.top_prob.ravel().tolist(),
            self.surprisal_bits.tolist(),
        )


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
MAX_IN_FLIGHT = 2  # big batches at once: one computing, the next queued behind it


@dataclass
class BatchStats:
    """Counters for tests and the benchmark: how well the batching works."""

    batches: int = 0
    steps: int = 0
    chars: int = 0
    max_sessions: int = 0
    compute_seconds: float = 0.0  # wall time inside compute(), inline or in the thread
    remote_batches: int = 0  # batches the compute worker process ran


def rows(vectors: list[np.ndarray]) -> np.ndarray:
    """Equal-length vectors as the rows of one array: a third of np.stack's time at 150 rows."""
    return np.concatenate(vectors).reshape(len(vectors), -1)


def pack(works: Sequence[PredictWork]) -> Packed:
    """Gather the works' chunks and states into batch arrays, longest chunk first."""
    lens = [len(w.idx) for w in works]
    uniform = min(lens) == max(lens)
    order = list(range(len(works))) if uniform else sorted(range(len(works)), key=lambda i: -lens[i])
    ws = [works[i] for i in order]
    lens = [lens[i] for i in order]
    if uniform:
        idx = rows([w.idx for w in ws]).T  # (T, N)
    else:
        idx = np.zeros((lens[0], len(ws)), dtype=np.int64)
        for i, w in enumerate(ws):
            idx[: lens[i], i] = w.idx
    states = rows([w.session.state for w in ws])  # (N, S)
    probs0 = rows([w.session.probs for w in ws])  # (N, V)
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
    order = np.argsort(-p, kind="stable")[:k]  # one sort of V values: fewer calls than a partition
    before = float(session.probs[work.idx[0]])
    surprisal = np.array([[-math.log2(before) if before > 0 else math.inf]], dtype=np.float32)
    full = np.stack([session.probs, p])[:, None, :] if work.full else None
    return ChunkResult(
        session.offset,
        1,
        k,
        0,
        order.reshape(1, 1, k),
        p[order].reshape(1, 1, k),
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


async def compute_remote(
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
        results = unpack(works, packed, await worker.advance(works[0].session.model.require(), packed))
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
    """Queues work from handlers; one loop task cuts it into batches, computes them and applies the results."""

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
        self._flights: set[asyncio.Task[None]] = set()  # big batches computing (or queued to)
        self._flying: set[int] = set()  # ids of the sessions in those batches
        self._returning = GATHER_LIMIT  # sessions the last finished flight answered (see _worth_sending)
        self._busy = 0  # flights and shared-store commits under way: a lone request must queue
        self._last_session: Session | None = None
        self._last_time = 0.0
        self._last_batch = 0  # sessions in the batch cut last

    @property
    def worker_pid(self) -> int | None:
        """The compute worker's process id; None while big batches compute in the thread."""
        return self._worker.pid if self._worker is not None else None

    def start(self) -> None:
        if self._worker is not None:
            self._worker.start()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="nextchar-batcher")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._flights) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for work in self._pending:
            if not work.future.done():
                work.future.cancel()
        # wait for a batch still in the thread: it must not outlive the server
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        if self._worker is not None:
            await self._worker.close()

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
        """True when nobody could share this step: the batcher is idle, the last batch had
        one session, and no OTHER session asked within LONE_WINDOW. A lone ping-pong stream
        then skips two hops through the batch task; as soon as streams overlap, everything
        queues and batches again. (Without the last-batch rule, the first request after
        each wave of replies to many streams was stepped alone.)"""
        now = time.perf_counter()
        alone = (
            size <= self.inline_chars
            and self._last_batch <= 1
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

    async def _compute_big(self, batch: list[Work]) -> list[ChunkResult | GenerateResult]:
        """The worker process when there is one, else the batch thread."""
        worker = self._worker
        if worker is not None and all(isinstance(w, PredictWork) for w in batch):
            try:
                return await compute_remote(batch, worker, self.stats)
            except Exception as exc:
                if self._worker is worker:
                    log.warning("compute worker failed (%s); computing in-process from now on", exc)
                    self._worker = None
                    await worker.close()
        return await asyncio.get_running_loop().run_in_executor(self._executor, compute, batch, self.stats)

    def _take(self) -> list[Work]:
        """Everything queued, at most one work per session and none whose session is in a
        batch already (the rest waits its turn, in order)."""
        batch: list[Work] = []
        later: list[Work] = []
        seen: set[int] = set(self._flying)
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

    def _worth_sending(self) -> bool:
        """With a batch computing, queue the next behind it once every session of the last
        finished batch has come back: the groups of streams that alternate on the worker
        then stay whole (a smaller piece would step fewer sessions per product). Anything
        else waits until nothing computes."""
        if not self._flights:
            return True
        if len(self._flights) >= MAX_IN_FLIGHT or len(self._pending) < self._returning:
            return False  # (the second test spares building the set on most of the loop's wake-ups)
        waiting = {id(w.session) for w in self._pending} - self._flying
        return len(waiting) >= self._returning

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._flights and sum(_size(w) for w in self._pending) <= self.inline_chars:
                await self._gather()  # small work: wait for more to share the step
            if not self._worth_sending():
                continue  # a finishing batch wakes this loop again
            batch = self._take()
            if self._pending:
                self._wake.set()
            if not batch:
                continue
            self._last_batch = len(batch)
            size = sum(_size(w) for w in batch)
            if size > self.inline_chars or self._flights:
                self._fly(batch, size)
                continue
            try:
                results = compute(batch, self.stats)
            except Exception as exc:  # a failed batch must fail its callers, not the loop
                self._fail(batch, exc)
                continue
            self.on_batch(len(batch), size)
            await self._finish(batch, results)

    def _fly(self, batch: list[Work], size: int) -> None:
        """Compute a big batch off the loop; its sessions stay out of other batches meanwhile."""
        keys = [id(w.session) for w in batch]
        self._flying.update(keys)
        self._busy += 1

        async def flight() -> None:
            try:
                try:
                    results = await self._compute_big(batch)
                finally:  # the worker is free for the next batch: let the loop send it first
                    self._flights.discard(task)
                    self._wake.set()
                self.on_batch(len(batch), size)
                self._returning = len(batch)
                await self._finish(batch, results)
            except asyncio.CancelledError:
                self._fail(batch, None)
                raise
            except Exception as exc:
                self._fail(batch, exc)
            finally:
                self._flying.difference_update(keys)
                self._busy -= 1

        task = asyncio.get_running_loop().create_task(flight())
        self._flights.add(task)

    @staticmethod
    def _fail(batch: Sequence[Work], exc: BaseException | None) -> None:
        """exc None: the batch was cancelled."""
        for work in batch:
            if not work.future.done():
                if exc is None:
                    work.future.cancel()
                else:
                    work.future.set_exception(exc)

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
            self._busy += 1  # lone requests queue meanwhile: their session may be in this batch
            try:
                outcomes: Sequence[int | ServiceError] = await self.commit(backs)
            except ServiceError as exc:
                outcomes = [exc] * len(stored)
            finally:
                self._busy -= 1
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
