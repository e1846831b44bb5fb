"""Training jobs, the API side: queue one, list, follow, cancel and resume them, through a job store.

A job outlives the RPC that started it, and the server too: it lives in a job
store (nextchar.server.training.store: the journal beside the model registry, or
the shared Redis), and trainers anywhere take it from the store's queue
(nextchar.server.training.pool). This side never talks to a trainer: it writes
the job, its cancel request or its requeue into the store and reads progress
back, so any replica answers for any job. A request's configs are checked in one
place (``parse_configs``) and travel typed from there to the trainer; ``start``
validates the text (a piece at a time, so a corpus of any size costs one piece of
memory). ``follow`` wakes when the store says the job changed, and the queue's
places are computed once per change, whoever asks for them.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from nextchar.core.config import ModelConfig, TrainConfig, check_length
from nextchar.server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, ServiceError, shown
from nextchar.server.registry import check_name
from nextchar.server.training.store import CANCELLED, FAILED, QUEUED, STATE, Change, Job, JobStore

READ_PIECE = 1 << 18  # bytes of a training text read at a time to validate it
CODE_POINTS = 0x110000  # Unicode's
FIRST_LOOK = 1.0  # seconds start waits for a free trainer to take a new job, so its first status says so
BACKSTOP = 5.0  # seconds: a watcher looks again even without news (a shared store's lost notification)
FORSAKEN = "cancelled: its Train call ended (deadline or cancel) before it heard of the job"
log = logging.getLogger("nextchar.server")
Event = tuple[Job, dict[str, Any] | None, int]  # the job, a progress record or None (a status), its place


async def succeeded(work: asyncio.Future[Any]) -> bool:
    """Whether work, which goes on while its awaiter is cancelled, ends without an error."""
    try:
        await work
    except Exception:
        return False
    return True


def parse_configs(
    model_fields: dict[str, Any], train_fields: dict[str, Any]
) -> tuple[ModelConfig, TrainConfig]:
    """The configs of the fields a request sent (the rest take their defaults); InvalidArgument
    naming the field (model_config.<field>, train_config.<field>) when one is out of range."""
    for name, value in train_fields.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidArgument(f"train_config.{name}: must be finite, got {value}")
    try:
        model_config = ModelConfig(**model_fields)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"model_config.{exc}") from exc
    try:
        train_config = TrainConfig(**train_fields)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"train_config.{exc}") from exc
    return model_config, train_config


def validate(text_path: Path, train_config: TrainConfig, max_vocab: int) -> None:
    """Raise InvalidArgument naming the field, before the job is queued (blocking: reads the
    text, a piece at a time, so a corpus of any size costs the server one piece of memory).

    Runs in a thread beside the event loop, so every step is a C loop over a whole piece: the
    characters a text holds are marked in a table of code points by NumPy, not gathered in a
    set by Python, which held the GIL for ~20 ms per MB: a few Trains at once kept the loop
    from answering streams (make bench-abuse's train_storm)."""
    chars, seen = 0, np.zeros(CODE_POINTS, dtype=bool)
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(text_path, "rb") as f:
            while piece := f.read(READ_PIECE):
                text = decoder.decode(piece)
                chars += len(text)
                if text.isascii():
                    seen[np.frombuffer(text.encode("ascii"), dtype=np.uint8)] = True
                else:
                    seen[np.frombuffer(text.encode("utf-32-le"), dtype="<u4")] = True
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"text: not UTF-8 ({exc.reason} near byte {exc.start})") from None
    if not chars:
        raise InvalidArgument("text: empty; give the training text")
    distinct = int(np.count_nonzero(seen))
    if distinct > max_vocab:
        raise InvalidArgument(
            f"text: {distinct} distinct characters exceed max_vocab ({max_vocab}); "
            "the output layer and every step's arrays grow with the vocabulary"
        )
    try:
        check_length(chars, train_config)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc


class JobManager:
    """The job API over a store. It listens to the store's changes (``load`` subscribes): each
    wakes the watchers of that job, and a change of state (which may move every queued job's
    place) wakes them all and drops the places computed before it."""

    def __init__(self, store: JobStore, max_vocab: int, max_queued: int = 100) -> None:
        self.store = store
        self.max_vocab = max_vocab
        self.max_queued = max_queued  # each keeps its text in the store until a trainer runs it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchers: dict[str, set[asyncio.Event]] = {}  # by job id
        self._places: dict[str, int] | None = None  # as of the last change; None: to compute again
        self._places_at = 0.0  # monotonic time they were computed
        self._changes = 0  # state changes heard so far
        self._placing = asyncio.Lock()  # one computation of the places at a time

    async def load(self) -> None:
        """Ready the store and hear its changes; the jobs a previous run left unfinished are back
        in the queue."""
        self._loop = asyncio.get_running_loop()
        self.store.subscribe(self._heard)
        for job in await asyncio.to_thread(self.store.load):
            log.info("job %s (%s): back in the queue from the journal", job.id, job.model_name)

    def _heard(self, job_id: str, change: Change) -> None:
        """The store's listener: any thread."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is watching
                self._loop.call_soon_threadsafe(self._changed, job_id, change)

    def _changed(self, job_id: str, change: Change) -> None:
        if change == STATE or not job_id:
            self._changes += 1
            self._places = None
            woken = [e for events in self._watchers.values() for e in events]
        else:
            woken = list(self._watchers.get(job_id, ()))
        for event in woken:
            event.set()

    @contextlib.contextmanager
    def _watching(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set at the job's next change; made before the caller reads, so no change
        between its read and its wait goes unheard."""
        event = asyncio.Event()
        self._watchers.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            events = self._watchers[job_id]
            events.discard(event)
            if not events:
                del self._watchers[job_id]

    async def get(self, job_id: str) -> Job:
        return await asyncio.to_thread(self.store.get, job_id)

    async def all(self) -> list[Job]:
        return await asyncio.to_thread(self.store.all)

    def states(self) -> list[str]:
        """Every job's state, for a metrics scrape (its own thread); none while the store is down."""
        with contextlib.suppress(ServiceError):
            return [j.state for j in self.store.all()]
        return []

    async def places(self) -> dict[str, int]:
        """Each queued job's place in the queue (1 = next), by id, in the order trainers take them;
        jobs not queued are absent. Computed once per change of state, whoever asks (and again
        after BACKSTOP, should a shared store's notification have been lost)."""
        async with self._placing:
            if self._places is None or time.monotonic() - self._places_at > BACKSTOP:
                changes = self._changes
                places = await asyncio.to_thread(self._read_places)
                if changes != self._changes:  # a change came while they were read: read again next time
                    return places
                self._places, self._places_at = places, time.monotonic()
            return self._places

    def _read_places(self) -> dict[str, int]:
        """(blocking) The store's queue may still hold a job cancelled while it waited (a trainer
        drops its turn when it comes), so only the QUEUED jobs are counted."""
        queued = [j.id for j in self.store.all() if j.state == QUEUED]  # oldest first
        order = [i for i in dict.fromkeys(self.store.queue()) if i in set(queued)]
        placed = set(order)
        order += [i for i in queued if i not in placed]  # (none, unless racing)
        return {job_id: place for place, job_id in enumerate(order, 1)}

    async def place_of(self, job: Job) -> int:
        """A job's place in the queue, 1 = next; 0 when it is not queued."""
        return (await self.places()).get(job.id, 0) if job.state == QUEUED else 0

    async def start(
        self,
        model_name: str,
        text_path: Path,
        model_config: ModelConfig,
        train_config: TrainConfig,
        promote: bool,
    ) -> Job:
        """Queue a job training on the text in text_path (nextchar.server.training.texts); the
        text moves into the store, so whichever trainer runs or resumes the job has its data.
        Refused (RESOURCE_EXHAUSTED) while max_queued jobs wait: each holds its text in the store.
        (Two Trains at once can both take the last place: a soft cap, by one per replica.) A
        start cancelled before it returns (the caller's deadline) cancels the job it queued: its
        caller never heard of it. The job is returned once a free trainer has taken it (RUNNING),
        or after FIRST_LOOK when none did."""
        check_name(model_name)
        waiting = len(await self.places())
        if waiting >= self.max_queued:
            raise ResourceExhausted(
                f"{waiting} jobs are waiting for a trainer (max_queued_jobs {self.max_queued}); "
                "retry once the queue is shorter",
                limit="max_queued_jobs",
            )
        # off the loop: a training text can be a hundred MB
        await asyncio.to_thread(validate, text_path, train_config, self.max_vocab)
        job_id = f"job-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        job = Job(job_id, model_name, promote, model_config, train_config)
        with self._watching(job.id) as changed:
            adding = asyncio.ensure_future(asyncio.to_thread(self.store.add, job, text_path))
            try:
                await asyncio.shield(adding)
                self._changed(job.id, STATE)  # this process's own readers see it at once
                log.info("job %s (%s): queued, place %d", job.id, model_name, await self.place_of(job))
                current = job
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FIRST_LOOK):
                        while True:
                            changed.clear()  # before the read: a change after it wakes the wait
                            current = await self.get(job.id)
                            if current.state != QUEUED:
                                break
                            await changed.wait()
            except asyncio.CancelledError:
                if await succeeded(adding):  # (a failed add queued nothing)
                    await self.cancel(job.id, FORSAKEN)
                raise
        return current

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
            with self._watching(job_id) as changed:
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
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), BACKSTOP)

    async def cancel(self, job_id: str, why: str = "cancelled by request before it started") -> Job:
        """A queued job is cancelled at once (why: its error); a running one's trainer is asked to
        stop, wherever it runs."""
        job = await self.get(job_id)
        if job.done:
            return job
        await asyncio.to_thread(self.store.request_cancel, job_id)  # also stops a trainer taking it now
        if job.state == QUEUED:
            job.state, job.error, job.finished = CANCELLED, why, time.time()
            await asyncio.to_thread(self.store.save, job)
            self._changed(job.id, STATE)
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
        self._changed(job.id, STATE)
        log.info(
            "job %s (%s): queued again to resume, place %d", job.id, job.model_name, await self.place_of(job)
        )
        return await self.get(job.id)
