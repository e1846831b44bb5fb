"""Training jobs, the API side: queue one, list, follow, cancel and resume them, through a job store.

A job outlives the RPC that started it, and the server too: it lives in a job
store (nextchar.server.training.store: the journal beside the model registry, or
the shared Redis), and trainers anywhere take it from the store's queue
(nextchar.server.training.pool). This side never talks to a trainer: it writes
the job, its cancel request or its requeue into the store and reads progress
back, so any replica answers for any job. ``start`` validates the request first
(the text a piece at a time, so a corpus of any size costs one piece of memory);
``follow`` polls the store (every FOLLOW_POLL) for the job's state and records.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from nextchar.core.config import ModelConfig, TrainConfig, check_length
from nextchar.server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, ServiceError, shown
from nextchar.server.registry import check_name
from nextchar.server.training.store import CANCELLED, FAILED, QUEUED, Job, JobStore

READ_PIECE = 1 << 20  # bytes of a training text read at a time to validate it
FOLLOW_POLL = 0.2  # seconds between a watcher's looks at the store
log = logging.getLogger("nextchar.server")
Event = tuple[Job, dict[str, Any] | None, int]  # the job, a progress record or None (a status), its place


def validate(
    text_path: Path, model_config: dict[str, Any], train_config: dict[str, Any], max_vocab: int
) -> None:
    """Raise InvalidArgument naming the field, before the job is queued (blocking: reads the
    text, a piece at a time, so a corpus of any size costs the server one piece of memory)."""
    chars, distinct = 0, set[str]()
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(text_path, "rb") as f:
            while piece := f.read(READ_PIECE):
                text = decoder.decode(piece)
                chars += len(text)
                distinct.update(text)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"text: not UTF-8 ({exc.reason} near byte {exc.start})") from None
    if not chars:
        raise InvalidArgument("text: empty; give the training text")
    if len(distinct) > max_vocab:
        raise InvalidArgument(
            f"text: {len(distinct)} distinct characters exceed max_vocab ({max_vocab}); "
            "the output layer and every step's arrays grow with the vocabulary"
        )
    try:
        ModelConfig(**model_config)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"model_config.{exc}") from exc
    try:
        tc = TrainConfig(**train_config)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"train_config.{exc}") from exc
    try:
        check_length(chars, tc)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc


class JobManager:
    """on_queued: called (in a thread) when a job was queued here: this server's trainers take it
    at once when one is free, so the first status a client sees is RUNNING."""

    def __init__(
        self,
        store: JobStore,
        max_vocab: int,
        max_queued: int = 100,
        on_queued: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.max_vocab = max_vocab
        self.max_queued = max_queued  # each keeps its text in the store until a trainer runs it
        self.on_queued = on_queued

    async def load(self) -> None:
        """Ready the store; the jobs a previous run left unfinished are back in the queue."""
        for job in await asyncio.to_thread(self.store.load):
            log.info("job %s (%s): back in the queue from the journal", job.id, job.model_name)

    async def get(self, job_id: str) -> Job:
        return await asyncio.to_thread(self.store.get, job_id)

    async def all(self) -> list[Job]:
        return await asyncio.to_thread(self.store.all)

    def states(self) -> list[str]:
        """Every job's state, for a metrics scrape (its own thread); none while the store is down."""
        with contextlib.suppress(ServiceError):
            return [j.state for j in self.store.all()]
        return []

    async def places(self, jobs: list[Job]) -> dict[str, int]:
        """Each queued job's place in the queue (1 = next), by id, in the order trainers take them;
        jobs not queued are absent. The store's queue may still hold a job cancelled while it
        waited (a trainer drops its turn when it comes), so only the QUEUED jobs are counted."""
        queued = {j.id for j in jobs if j.state == QUEUED}
        order = [i for i in dict.fromkeys(await asyncio.to_thread(self.store.queue)) if i in queued]
        placed = set(order)
        order += [j.id for j in jobs if j.id in queued and j.id not in placed]  # (none, unless racing)
        return {job_id: place for place, job_id in enumerate(order, 1)}

    async def place_of(self, job: Job) -> int:
        """A job's place in the queue, 1 = next; 0 when it is not queued."""
        return (await self.places(await self.all())).get(job.id, 0) if job.state == QUEUED else 0

    async def start(
        self,
        model_name: str,
        text_path: Path,
        model_config: dict[str, Any],
        train_config: dict[str, Any],
        promote: bool,
    ) -> Job:
        """Queue a job training on the text in text_path (nextchar.server.training.texts); the
        text moves into the store, so whichever trainer runs or resumes the job has its data.
        Refused (RESOURCE_EXHAUSTED) while max_queued jobs wait: each holds its text in the store.
        (Two Trains at once can both take the last place: a soft cap, by one per replica.)"""
        check_name(model_name)
        waiting = sum(1 for j in await self.all() if j.state == QUEUED)
        if waiting >= self.max_queued:
            raise ResourceExhausted(
                f"{waiting} jobs are waiting for a trainer (max_queued_jobs {self.max_queued}); "
                "retry once the queue is shorter",
                limit="max_queued_jobs",
            )
        # off the loop: a training text can be a hundred MB
        await asyncio.to_thread(validate, text_path, model_config, train_config, self.max_vocab)
        job_id = f"job-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        job = Job(job_id, model_name, promote, model_config, train_config)
        await asyncio.to_thread(self.store.add, job, text_path)
        log.info("job %s (%s): queued, place %d", job.id, model_name, await self.place_of(job))
        await asyncio.to_thread(self.on_queued)
        return await self.get(job.id)  # RUNNING already when a trainer here was free

    async def prune(self, keep: int) -> int:
        """Remove the ended jobs beyond the newest keep (by end time); returns how many went. Until
        then an ended job stays listed, watchable and (failed) resumable; but a server that runs
        jobs for months must not list, load and hold every one it ever ran (ListJobs' reply alone
        passes max_message_bytes at ~30,000 jobs)."""
        ended = sorted((j for j in await self.all() if j.done), key=lambda j: j.finished)
        removed = 0
        for job in ended[: max(0, len(ended) - keep)]:
            removed += await asyncio.to_thread(self.store.remove, job.id)
        if removed:
            log.info(
                "%d ended job(s) removed: only the newest %d are kept (max_finished_jobs)", removed, keep
            )
        return removed

    async def follow(self, job_id: str) -> AsyncIterator[Event]:
        """A status first and whenever the state changes, every record so far and as they come,
        and the final status once the job has ended."""
        job = await self.get(job_id)
        yield job, None, await self.place_of(job)
        seen, state = 0, job.state
        while True:
            job = await self.get(job_id)  # before the records: a job read as ended has all of them
            if job.state != state and not job.done:
                state = job.state
                yield job, None, await self.place_of(job)
            for record in await asyncio.to_thread(self.store.records, job_id, seen):
                seen += 1
                yield job, record, 0
            if job.done:
                yield job, None, 0
                return
            await asyncio.sleep(FOLLOW_POLL)

    async def cancel(self, job_id: str) -> Job:
        """A queued job is cancelled at once; a running one's trainer is asked to stop, wherever it runs."""
        job = await self.get(job_id)
        if job.done:
            return job
        await asyncio.to_thread(self.store.request_cancel, job_id)  # also stops a trainer taking it now
        if job.state == QUEUED:
            job.state, job.error, job.finished = (
                CANCELLED,
                "cancelled by request before it started",
                time.time(),
            )
            await asyncio.to_thread(self.store.save, job)
            await asyncio.to_thread(self.store.discard, job_id)
            log.info("job %s (%s): cancelled: %s", job.id, job.model_name, job.error)
        return job

    async def resume(self, job_id: str) -> Job:
        """Queue a failed job again: it goes on from its last checkpoint."""
        job = await self.get(job_id)
        if job.state != FAILED:
            raise FailedPrecondition(f"job {shown(job_id)} is {job.state}: only a failed job can resume")
        job.state, job.error, job.attempts, job.finished = QUEUED, "", 0, 0.0
        await asyncio.to_thread(self.store.requeue, job)
        log.info(
            "job %s (%s): queued again to resume, place %d", job.id, job.model_name, await self.place_of(job)
        )
        await asyncio.to_thread(self.on_queued)
        return await self.get(job.id)
