"""The scheduler: every chunk waiting to be computed is computed together, one batch at a time.

The compute service of the server: callers (the session manager) hand it arrays
(a network, states, predictions, a chunk) and await rows back; it never sees a
session, and changes nothing but its own queue. One loop task takes everything
queued, cuts it into a batch (at most one work per caller's key) and hands the
batch to an executor chosen by its cost (nextchar.server.batching.executors). At
H=256 stepping 100-1,000 sessions together costs a quarter of stepping them one by one.

The policy, all of it here:
- No timers. While one batch computes off the loop, the next accumulates; small
  work waits one ``_gather`` (a few loop iterations) for company, never a clock.
- A lone request (nothing queued or computing, the last batch had one caller,
  and no other caller asked within LONE_WINDOW) runs at once, inline: a lone
  ping-pong stream skips two hops through the loop task.
- Big batches pipeline: once a batch holds every caller the previous one
  answered, it is sent to queue behind the one computing (MAX_IN_FLIGHT), so
  the compute process does not wait for the event loop between two batches.
- A key is in one batch at a time; its next work waits its turn, in order.
- Work is weighed by its cost (nextchar.server.batching.work's DRAW_COST): a batched
  character costs one, a character a Generate draws several (its own step, and a draw).
- Long work (costing LONG_CHARS and more: a prime, a rewind's re-feed, a big chunk, a
  Generate's piece) never shares a batch with shorter work, and while it computes off
  the loop, short work goes on being batched and answered: a batch costs its longest
  chunk's steps, so one-character messages batched with a 4,096-character chunk waited
  for all of it.
- A batch that fails is computed again work by work, so an error stays with the
  work that caused it and never fails the callers batched beside it.
- Work that learns (an adapter's gradient steps) never runs on the loop: it is cut
  into a batch of its own and computed off it. An adaptive chunk that completes no
  window is like any other.
- While callers settle what a batch answered (``settling``: a shared store's commit
  round trip), the next batch waits for them, SETTLE_LIMIT at most: the streams that
  just came back and those still settling then share one batch. (Cutting a batch from the first few
  messages to arrive made batches on Redis 5.7 sessions wide instead of 7.9 for 16
  streams, and the throughput 15% lower.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from nextchar.core.adapt import Adapter
from nextchar.core.completion import Continuation
from nextchar.core.config import Sampling
from nextchar.core.model import CharRNN
from nextchar.server.batching.executors import Executor, InlineExecutor, ProcessExecutor, ThreadExecutor
from nextchar.server.batching.work import (
    Adapting,
    AdaptWork,
    BatchStats,
    CompleteWork,
    Generated,
    GenerateWork,
    PredictWork,
    Rows,
    Work,
)

LONE_WINDOW = 0.002  # seconds: another caller asking within this means streams overlap
GATHER_LIMIT = 4096  # chunks per batch cut
MAX_IN_FLIGHT = 2  # big batches at once: one computing, the next queued behind it (each for long work)
LONG_CHARS = 256  # the cost that makes a work long (see the module's docstring)
SETTLE_LIMIT = 0.005  # seconds the next batch waits for callers settling (a Redis round trip: ~0.5 ms)


class Scheduler:
    """Queues work from callers; one loop task cuts it into batches and computes them."""

    def __init__(
        self,
        inline_chars: int = 1024,
        compute_process: bool = False,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self.inline_chars = inline_chars  # batches costing at most this many characters run on the loop
        self.on_batch = on_batch or (lambda sessions, chars: None)  # per batch run (metrics)
        self.stats = BatchStats()
        self.inline = InlineExecutor(self.stats)
        thread = ThreadExecutor(self.stats)
        self.offload: Executor = ProcessExecutor(self.stats, thread) if compute_process else thread
        self._pending: list[Work] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._offloaded: set[asyncio.Task[None]] = set()  # batches computing off the loop (or queued to)
        self._offloaded_keys: set[int] = set()  # ids of the keys in those batches
        self._long: set[asyncio.Task[None]] = set()  # the offloaded batches of long work
        self._returning = GATHER_LIMIT  # keys the last finished offloaded batch answered (see _worth_sending)
        self._busy = 0  # offloaded batches under way: a lone request must queue
        self._last_key: object = None
        self._last_time = 0.0
        self._last_batch = 0  # works in the batch cut last
        self._settling = 0  # callers settling a result (see ``settling``)
        self._settled = asyncio.Event()
        self._settled.set()

    @property
    def compute_pid(self) -> int | None:
        """The compute process's id; None while big batches compute in the thread."""
        return self.offload.pid

    def start(self) -> None:
        self.offload.start()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="nextchar-scheduler")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._offloaded) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for work in self._pending:
            if not work.future.done():
                work.future.cancel()
        await self.offload.close()

    # ------------------------------------------------------------ the callers' side

    async def predict(
        self,
        key: object,
        net: CharRNN,
        idx: np.ndarray,
        state: np.ndarray,
        probs: np.ndarray,
        top_k: int,
        full: bool,
        adapting: Adapting | None = None,
    ) -> Rows:
        """The rows of chunk idx (n,) fed from state (S,) with prediction probs (V,); adapting: an
        adaptive session's (the rows carry its adapters after the chunk)."""
        future: asyncio.Future[Rows] = asyncio.get_running_loop().create_future()
        work: PredictWork | AdaptWork
        if adapting is None:
            work = PredictWork(key, net, idx, state, probs, top_k, full, future)
        else:
            work = AdaptWork(key, net, idx, state, probs, top_k, full, adapting, future)
        if not work.learns and self._alone(key, work.cost):
            await self._run_inline([work])
        else:
            self._queue(work)
        return await future

    async def generate(
        self,
        key: object,
        net: CharRNN,
        state: np.ndarray,
        probs: np.ndarray,
        length: int,
        rng: np.random.Generator,
        sampling: Sampling,
        adapting: Adapting | None = None,
    ) -> Generated:
        future: asyncio.Future[Generated] = asyncio.get_running_loop().create_future()
        self._queue(GenerateWork(key, net, state, probs, length, rng, sampling, future, adapting))
        return await future

    async def complete(
        self,
        key: object,
        net: CharRNN,
        state: np.ndarray,
        probs: np.ndarray,
        n: int,
        max_chars: int,
        adapter: Adapter | None = None,
    ) -> list[Continuation]:
        future: asyncio.Future[list[Continuation]] = asyncio.get_running_loop().create_future()
        self._queue(CompleteWork(key, net, state, probs, n, max_chars, future, adapter))
        return await future

    @contextlib.contextmanager
    def settling(self) -> Iterator[None]:
        """A caller settles the result it was given (a shared store's commit): the next batch
        waits until no caller is settling, so the batch answered together comes back together."""
        self._settling += 1
        self._settled.clear()
        try:
            yield
        finally:
            self._settling -= 1
            if not self._settling:
                self._settled.set()

    def _queue(self, work: Work) -> None:
        self._pending.append(work)
        self._wake.set()

    def _alone(self, key: object, cost: int) -> bool:
        """True when nobody could share this step: the scheduler is idle, the last batch had
        one work, and no OTHER caller asked within LONE_WINDOW, nor since the last inline
        batch ended. As soon as streams overlap, everything queues and batches again.
        (Without the last-batch rule, the first request after each wave of replies to many
        streams was stepped alone. Without the batch end, a step slower than LONE_WINDOW,
        a big model's 64-character chunk, made every waiting request look alone: 100 streams
        on a GRU-512 were stepped one session at a time, at a fifth of the batched speed.)"""
        now = time.perf_counter()
        alone = (
            cost <= self.inline_chars
            and self._last_batch <= 1
            and not self._pending
            and not self._busy
            and (key is self._last_key or now - self._last_time > LONE_WINDOW)
        )
        self._last_key, self._last_time = key, now
        return alone

    # ------------------------------------------------------------ the loop task

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._settling:  # (bounded: a store that stopped answering holds nobody else up)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._settled.wait(), SETTLE_LIMIT)
            short_offloaded = len(self._offloaded) - len(self._long)
            if not short_offloaded and sum(w.cost for w in self._pending) <= self.inline_chars:
                await self._gather()  # small work: wait for more to share the step
            if not self._worth_sending():
                continue  # a finishing batch wakes this loop again
            batch = self._take()
            if self._pending and batch:  # more may be ready; what is left waits for a batch to end
                self._wake.set()
            long = [w for w in batch if w.cost >= LONG_CHARS]
            if long:
                self._offload(long, long=True)
                batch = [w for w in batch if w.cost < LONG_CHARS]
            learning = [w for w in batch if w.learns]
            if learning:
                self._offload(learning)
                batch = [w for w in batch if not w.learns]
            if not batch:
                continue
            self._last_batch = len(batch)
            if sum(w.cost for w in batch) > self.inline_chars or short_offloaded:
                self._offload(batch)
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
        Anything else waits until nothing computes. Long work computing holds nothing back."""
        short_offloaded = len(self._offloaded) - len(self._long)
        if not short_offloaded:
            return True
        if short_offloaded >= MAX_IN_FLIGHT or len(self._pending) < self._returning:
            return False  # (the second test spares building the set on most of the loop's wake-ups)
        waiting = {id(w.key) for w in self._pending} - self._offloaded_keys
        return len(waiting) >= self._returning

    def _take(self) -> list[Work]:
        """Everything queued, at most one work per key and none whose key is in a batch
        already, nor long work while MAX_IN_FLIGHT batches of it compute (the rest waits
        its turn, in order)."""
        batch: list[Work] = []
        later: list[Work] = []
        seen: set[int] = set(self._offloaded_keys)
        long_room = len(self._long) < MAX_IN_FLIGHT
        for work in self._pending:
            if work.future.done():  # the caller went away (cancelled) before its turn
                continue
            key = id(work.key)
            if key in seen or (work.cost >= LONG_CHARS and not long_room):
                later.append(work)
            else:
                seen.add(key)
                batch.append(work)
        self._pending = later
        return batch

    async def _run_inline(self, batch: list[Work]) -> None:
        try:
            await self._compute(self.inline, batch)
        finally:  # requests that waited for the loop meanwhile are not alone (see _alone)
            self._last_time = time.perf_counter()
        self.on_batch(len(batch), sum(w.size for w in batch))

    async def _compute(self, executor: Executor, batch: list[Work]) -> None:
        """Compute batch and answer each work. A batch that fails is computed again work by
        work, so the error reaches only the works that cause it (a state no model could
        produce, say), never the callers batched beside them."""
        try:
            results = await executor.run(batch)
        except Exception as exc:
            if len(batch) == 1:
                self._fail(batch, exc)
                return
            for work in batch:
                await self._compute(executor, [work])
            return
        for work, result in zip(batch, results, strict=True):
            if not work.future.done():
                work.future.set_result(result)  # type: ignore[arg-type]  # a work's future takes its own result kind

    def _offload(self, batch: list[Work], *, long: bool = False) -> None:
        """Compute a big batch (or one of long work) off the loop; its keys stay out of other
        batches meanwhile."""
        keys = [id(w.key) for w in batch]
        self._offloaded_keys.update(keys)
        self._busy += 1

        async def offloaded() -> None:
            try:
                try:
                    await self._compute(self.offload, batch)
                finally:  # the executor is free for the next batch: let the loop send it first
                    self._offloaded.discard(task)
                    self._long.discard(task)
                    self._wake.set()
                self.on_batch(len(batch), sum(w.size for w in batch))
                if not long:
                    self._returning = len(batch)
            except asyncio.CancelledError:
                self._fail(batch, None)
                raise
            finally:
                self._offloaded_keys.difference_update(keys)
                self._busy -= 1

        task = asyncio.get_running_loop().create_task(offloaded())
        self._offloaded.add(task)
        if long:
            self._long.add(task)

    @staticmethod
    def _fail(batch: Sequence[Work], exc: BaseException | None) -> None:
        """exc None: the batch was cancelled."""
        for work in batch:
            if not work.future.done():
                if exc is None:
                    work.future.cancel()
                else:
                    work.future.set_exception(exc)
