"""The scheduler: every session with text waiting is advanced together, one batch at a time.

Stream handlers never touch NumPy. They hand a chunk to ``Scheduler.predict`` and
await the result; one loop task takes everything queued, cuts it into a batch
(at most one work per session) and hands the batch to an executor chosen by its
size (nextchar.server.batching.executors). At H=256 stepping 100-1,000 sessions
together costs a quarter of stepping them one by one.

The policy, all of it here:
- No timers. While one batch computes off the loop, the next accumulates; small
  work waits one ``_gather`` (a few loop iterations) for company, never a clock.
- A lone request (nothing queued or computing, the last batch had one session,
  and no other session asked within LONE_WINDOW) runs at once, inline: a lone
  ping-pong stream skips two hops through the loop task.
- Big batches pipeline: once a batch holds every stream the previous one
  answered, it is sent to queue behind the one computing (MAX_IN_FLIGHT), so
  the compute process does not wait for the event loop between two batches.
- A session is in one batch at a time; its next chunk waits its turn, in order.

Only the loop thread writes session state: results are applied after the
compute returns, and dropped (ABORTED) if the session was reset or closed
meanwhile. Before they are applied, the session store accepts each advance
(``commit``): a shared store writes them in one round trip and refuses those
another replica overtook, which then fail their callers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import numpy as np
from nextchar.core.config import Sampling
from nextchar.server.batching.executors import Executor, InlineExecutor, ProcessExecutor, ThreadExecutor
from nextchar.server.batching.work import (
    BatchStats,
    ChunkResult,
    GenerateResult,
    GenerateWork,
    PredictWork,
    Result,
    Work,
)
from nextchar.server.errors import Aborted, ServiceError, shown
from nextchar.server.sessions.session import Session, WriteBack

LONE_WINDOW = 0.002  # seconds: another session asking within this means streams overlap
GATHER_LIMIT = 4096  # chunks per batch cut
MAX_IN_FLIGHT = 2  # big batches at once: one computing, the next queued behind it

# The session store's acceptance of a batch's advances: None, or the error, per write-back.
Commit = Callable[[Sequence[WriteBack]], Awaitable[list[ServiceError | None]]]


async def accept_all(backs: Sequence[WriteBack]) -> list[ServiceError | None]:
    """The commit of a scheduler without a store (tests, benchmarks): every advance stands."""
    return [None] * len(backs)


class Scheduler:
    """Queues work from handlers; one loop task cuts it into batches, computes them and applies the results."""

    def __init__(
        self,
        inline_chars: int = 1024,
        compute_process: bool = False,
        on_batch: Callable[[int, int], None] | None = None,
        commit: Commit = accept_all,
    ) -> None:
        self.inline_chars = inline_chars  # batches of at most this many characters run on the loop
        self.commit = commit
        self.on_batch = on_batch or (lambda sessions, chars: None)  # per batch run (metrics)
        self.stats = BatchStats()
        self.inline = InlineExecutor(self.stats)
        thread = ThreadExecutor(self.stats)
        self.offload: Executor = ProcessExecutor(self.stats, thread) if compute_process else thread
        self._pending: list[Work] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flights: set[asyncio.Task[None]] = set()  # batches computing off the loop (or queued to)
        self._flying: set[int] = set()  # ids of the sessions in those batches
        self._returning = GATHER_LIMIT  # sessions the last finished flight answered (see _worth_sending)
        self._busy = 0  # flights and store commits under way: a lone request must queue
        self._last_session: Session | None = None
        self._last_time = 0.0
        self._last_batch = 0  # sessions in the batch cut last

    @property
    def compute_pid(self) -> int | None:
        """The compute process's id; None while big batches compute in the thread."""
        return self.offload.pid

    def start(self) -> None:
        self.offload.start()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="nextchar-scheduler")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._flights) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for work in self._pending:
            if not work.future.done():
                work.future.cancel()
        await self.offload.close()

    # ------------------------------------------------------------ the handlers' side

    async def predict(self, session: Session, idx: np.ndarray, top_k: int, full: bool) -> ChunkResult:
        """Consume idx (n,) in session; returns the chunk's predictions once its batch ran."""
        future: asyncio.Future[ChunkResult] = asyncio.get_running_loop().create_future()
        work = PredictWork(session, idx, top_k, full, session.gen, future)
        if self._alone(session, len(idx)):
            await self._run_inline([work])
        else:
            self._queue(work)
        return await future

    async def generate(
        self, session: Session, length: int, rng: np.random.Generator, sampling: Sampling
    ) -> GenerateResult:
        future: asyncio.Future[GenerateResult] = asyncio.get_running_loop().create_future()
        self._queue(GenerateWork(session, length, rng, sampling, session.gen, future))
        return await future

    def _queue(self, work: Work) -> None:
        self._pending.append(work)
        self._wake.set()

    def _alone(self, session: Session, size: int) -> bool:
        """True when nobody could share this step: the scheduler is idle, the last batch had
        one session, and no OTHER session asked within LONE_WINDOW, nor since the last inline
        batch ended. As soon as streams overlap, everything queues and batches again.
        (Without the last-batch rule, the first request after each wave of replies to many
        streams was stepped alone. Without the batch end, a step slower than LONE_WINDOW,
        a big model's 64-character chunk, made every waiting request look alone: 100 streams
        on a GRU-512 were stepped one session at a time, at a fifth of the batched speed.)"""
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

    # ------------------------------------------------------------ the loop task

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._flights and sum(w.size for w in self._pending) <= self.inline_chars:
                await self._gather()  # small work: wait for more to share the step
            if not self._worth_sending():
                continue  # a finishing batch wakes this loop again
            batch = self._take()
            if self._pending:
                self._wake.set()
            if not batch:
                continue
            self._last_batch = len(batch)
            size = sum(w.size for w in batch)
            if size > self.inline_chars or self._flights:
                self._fly(batch, size)
            else:
                await self._run_inline(batch)

    async def _gather(self) -> None:
        """Let every handler that can run now add its chunk before the batch is cut.

        One loop iteration per round (sleep(0) also polls the sockets); stop when a
        round brings nothing new. No timer, so an idle server adds no latency.
        """
        seen = -1
        while seen != len(self._pending) and len(self._pending) < GATHER_LIMIT:
            seen = len(self._pending)
            await asyncio.sleep(0)

    def _worth_sending(self) -> bool:
        """With a batch computing, queue the next behind it once every session of the last
        finished batch has come back: the groups of streams that alternate on the compute
        process then stay whole (a smaller piece would step fewer sessions per product).
        Anything else waits until nothing computes."""
        if not self._flights:
            return True
        if len(self._flights) >= MAX_IN_FLIGHT or len(self._pending) < self._returning:
            return False  # (the second test spares building the set on most of the loop's wake-ups)
        waiting = {id(w.session) for w in self._pending} - self._flying
        return len(waiting) >= self._returning

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

    async def _run_inline(self, batch: list[Work]) -> None:
        try:
            results = await self.inline.run(batch)
        except Exception as exc:  # a failed batch must fail its callers, not the loop
            self._fail(batch, exc)
            return
        finally:  # requests that waited for the loop meanwhile are not alone (see _alone)
            self._last_time = time.perf_counter()
        self.on_batch(len(batch), sum(w.size for w in batch))
        await self._finish(batch, results)

    def _fly(self, batch: list[Work], size: int) -> None:
        """Compute a big batch off the loop; its sessions stay out of other batches meanwhile."""
        keys = [id(w.session) for w in batch]
        self._flying.update(keys)
        self._busy += 1

        async def flight() -> None:
            try:
                try:
                    results = await self.offload.run(batch)
                finally:  # the executor is free for the next batch: let the loop send it first
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

    async def _finish(self, batch: Sequence[Work], results: Sequence[Result]) -> None:
        """Have the store accept the batch's advances (one round trip), then apply what it accepted."""
        current: list[tuple[Work, Result, WriteBack]] = []
        for w, r in zip(batch, results, strict=True):
            s = w.session
            if w.gen != s.gen:  # reset or closed meanwhile
                self._refuse(w, None)
                continue
            trail = s.trail.advanced(r.start_offset, s.state, s.probs, consumed(w, r))
            current.append((w, r, WriteBack(s, r.state, r.probs, r.start_offset + w.size, w.size, trail)))
        if not current:
            return
        self._busy += 1  # lone requests queue meanwhile: their session may be in this batch
        try:
            accepted: Sequence[ServiceError | None] = await self.commit([back for _, _, back in current])
        except ServiceError as exc:
            accepted = [exc] * len(current)
        finally:
            self._busy -= 1
        for (work, result, back), refusal in zip(current, accepted, strict=True):
            session = work.session
            if refusal is not None or work.gen != session.gen:
                self._refuse(work, refusal)
                continue
            # absolute, not +=: a shared store's copy adopted meanwhile must not be advanced twice
            session.state, session.probs, session.offset, session.trail = (
                back.state,
                back.probs,
                back.offset,
                back.trail,
            )
            if not work.future.done():
                work.future.set_result(result)  # type: ignore[arg-type]  # a work's future takes its own result kind

    @staticmethod
    def _refuse(work: Work, refusal: ServiceError | None) -> None:
        """Fail a work whose advance does not stand: the store refused it, or its session was
        reset or closed while it computed (refusal None)."""
        if not work.future.done():
            session = work.session
            work.future.set_exception(
                refusal or Aborted(f"session {shown(session.id)} was reset or closed during the request")
            )


def consumed(work: Work, result: Result) -> np.ndarray:
    """The characters a work fed its session: the chunk, or what a generation drew."""
    if isinstance(work, PredictWork):
        return work.idx
    assert isinstance(result, GenerateResult)
    return work.session.model.encode(result.text)[0]
