"""Where a batch is computed, behind one interface: on the loop, in a thread, or in the compute process.

The scheduler picks by cost: a batch cheap enough that a hop would cost more than
the arithmetic runs inline on the event loop; a bigger one goes off the loop, to
the compute process (free of the server's GIL) or, for adaptive sessions' generations
and after the process failed, to a thread. Every executor computes the same thing (``work.compute``
or its packed arrays), so the choice changes the speed, never the answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
from nextchar.server.batching.process import ComputeProcess
from nextchar.server.batching.work import (
    BatchStats,
    GenerateWork,
    PredictWork,
    Result,
    Work,
    commit_draws,
    compute,
    pack,
    prediction_groups,
    static_generated,
    unpack,
)

log = logging.getLogger("nextchar.server")


class Executor(Protocol):
    @property
    def pid(self) -> int | None: ...  # the process computing, when it is not the server's own
    def start(self) -> None: ...  # with the event loop running
    async def run(self, batch: Sequence[Work]) -> list[Result]: ...
    async def close(self) -> None: ...


class InlineExecutor:
    """On the event loop itself: for batches whose arithmetic costs less than any hop."""

    def __init__(self, stats: BatchStats) -> None:
        self.stats = stats

    pid = None

    def start(self) -> None:
        """Nothing to start."""

    async def run(self, batch: Sequence[Work]) -> list[Result]:
        return compute(batch, self.stats)

    async def close(self) -> None:
        """Nothing runs once the loop stops."""


class ThreadExecutor:
    """In one batch thread: NumPy releases the GIL in its products, so they overlap gRPC work."""

    def __init__(self, stats: BatchStats) -> None:
        self.stats = stats
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nextchar-step")

    pid = None

    def start(self) -> None:
        """The thread starts with the first batch."""

    async def run(self, batch: Sequence[Work]) -> list[Result]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, compute, batch, self.stats)

    async def close(self) -> None:
        # wait for a batch still in the thread: it must not outlive the server
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)


class ProcessExecutor:
    """Predictions and static sessions' generations in the compute process; adaptive sessions'
    generations, and everything once the process failed, in the thread (slower, never wrong)."""

    def __init__(self, stats: BatchStats, fallback: ThreadExecutor) -> None:
        self.stats = stats
        self.fallback = fallback
        self.process: ComputeProcess | None = ComputeProcess()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        assert self.process is not None
        self.process.start()
        self.fallback.start()

    async def run(self, batch: Sequence[Work]) -> list[Result]:
        process = self.process
        if process is not None and all(
            isinstance(w, PredictWork) or (isinstance(w, GenerateWork) and w.adapting is None) for w in batch
        ):
            try:
                return await self._remote(process, batch)
            except Exception as exc:
                if self.process is process:
                    log.warning("compute process failed (%s); computing in a thread from now on", exc)
                    self.process = None
                    await process.close()
        return await self.fallback.run(batch)

    async def _remote(self, process: ComputeProcess, batch: Sequence[Work]) -> list[Result]:
        start = time.perf_counter()
        out: list[Result | None] = [None] * len(batch)
        draws: list[tuple[GenerateWork, np.random.Generator]] = []
        for i, work in enumerate(batch):
            if isinstance(work, GenerateWork):
                drawn = await process.generate(
                    work.net, work.state, work.probs, work.length, work.rng, work.sampling
                )
                out[i] = static_generated(work, drawn.text, drawn.state, drawn.probs)
                draws.append((work, drawn.rng))
        for members, works in prediction_groups(batch):
            packed = pack(works)
            answer = await process.advance(works[0].net, packed)
            for i, result in zip(members, unpack(works, packed, answer), strict=True):
                out[i] = result
            self.stats.count(works)
        commit_draws(draws)  # (a batch that fails part way is computed again in the thread)
        self.stats.batches += 1
        self.stats.remote_batches += 1
        self.stats.compute_seconds += time.perf_counter() - start
        return out  # type: ignore[return-value]  # predictions and draws (run() checked): every position filled

    async def close(self) -> None:
        if self.process is not None:
            await self.process.close()
        await self.fallback.close()
