"""Training jobs: durable records, a queue, and one trainer process per running job.

A job outlives the RPC that started it, and the server too. Each lives in
``model_dir/_jobs/<id>/``: ``job.json`` (its record, rewritten atomically on every
change of state), ``records.jsonl`` (its progress records, appended), its training
text and the trainer's latest checkpoint. Jobs wait in a queue (oldest first) for
one of ``max_jobs`` trainer slots instead of being refused. A trainer checkpoints
at every epoch's end and every ``checkpoint_seconds``; when the server drains
(SIGTERM) it asks its trainers to pause, which checkpoint and stop, and the jobs go
back to the queue. On start, a server takes up every job its journal says was
queued or running (a SIGKILLed server's too: its trainers died with it) and each
resumes from its checkpoint, to the weights an uninterrupted run ends with. A
trainer that dies under a live server is restarted from its checkpoint, up to
MAX_ATTEMPTS times. A reader thread per trainer receives its messages, registers the
finished model (atomic file write, then publish) and hands every event to the
event loop, where watchers follow the job's records. A job that fails, diverges or
is cancelled registers nothing and says why; a failed one keeps its checkpoint,
so ``ResumeJob`` can take it up again.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import multiprocessing as mp
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import numpy as np
from nextchar.core import checkpoint as ck
from nextchar.core.atomic import atomic_write
from nextchar.core.config import ModelConfig, TrainConfig, check_length
from nextchar.core.model import CharRNN
from nextchar.core.vocab import Vocab
from nextchar.server.errors import FailedPrecondition, InvalidArgument, NotFound, shown
from nextchar.server.registry import ModelVersion, Registry, check_name
from nextchar.server.training.trainer import run_training

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
CANCEL_GRACE = 5.0  # seconds a cancelled trainer gets to notice before it is terminated
READ_PIECE = 1 << 20  # bytes of a training text read at a time to validate it
MAX_ATTEMPTS = 3  # trainer starts per job: a trainer that keeps dying fails its job
JOB_FILE, RECORDS_FILE, TEXT_FILE, CHECKPOINT_FILE = "job.json", "records.jsonl", "text.txt", "checkpoint.npz"
log = logging.getLogger("nextchar.server")


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


@dataclass(eq=False)
class Job:
    id: str
    model_name: str
    promote: bool
    model_config: dict[str, Any]
    train_config: dict[str, Any]
    directory: Path
    state: str = QUEUED
    error: str = ""
    result: ModelVersion | None = None
    created: float = field(default_factory=time.time)
    started: float = 0.0  # when a trainer first took it up
    finished: float = 0.0
    attempts: int = 0  # trainer starts
    records: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    stop: Event | None = None  # cancel
    pause: Event | None = None  # checkpoint and stop (the server drains)
    process: SpawnProcess | None = None

    @property
    def done(self) -> bool:
        return self.state not in (QUEUED, RUNNING)

    def notify(self) -> None:
        """Wake every watcher; each waits on the Event it saw, so none misses a change."""
        self.changed.set()
        self.changed = asyncio.Event()

    async def follow(self) -> AsyncIterator[dict[str, Any] | None]:
        """None (a status) first and whenever the state changes, every record so far and as they
        come; ends when the job does."""
        yield None
        seen, state = 0, self.state
        while True:
            changed = self.changed
            if self.state != state and not self.done:
                state = self.state
                yield None
            while seen < len(self.records):
                seen += 1
                yield self.records[seen - 1]
            if self.done:
                return
            await changed.wait()

    # ------------------------------------------------------------ the journal

    def save(self) -> None:
        """Rewrite job.json (atomically: a crash leaves the old record or the new one)."""
        record = {
            "id": self.id,
            "model_name": self.model_name,
            "promote": self.promote,
            "model_config": self.model_config,
            "train_config": self.train_config,
            "state": self.state,
            "error": self.error,
            "result": [self.result.name, self.result.version] if self.result else None,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "attempts": self.attempts,
        }
        with atomic_write(self.directory / JOB_FILE) as f:
            f.write(json.dumps(record, indent=1).encode())

    def append(self, record: dict[str, Any]) -> None:
        with open(self.directory / RECORDS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    @classmethod
    def load(cls, directory: Path, registry: Registry) -> Job:
        record = json.loads((directory / JOB_FILE).read_text())
        job = cls(
            record["id"],
            record["model_name"],
            record["promote"],
            record["model_config"],
            record["train_config"],
            directory,
            state=record["state"],
            error=record["error"],
            created=record["created"],
            started=record["started"],
            finished=record["finished"],
            attempts=record["attempts"],
        )
        if record["result"]:
            with contextlib.suppress(NotFound):  # deleted since
                job.result = registry.resolve(*record["result"], need_available=False)
        with contextlib.suppress(OSError):
            for line in (directory / RECORDS_FILE).read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):  # a line torn by a crash
                    job.records.append(json.loads(line))
        return job


class JobManager:
    def __init__(
        self,
        registry: Registry,
        max_jobs: int,
        max_vocab: int,
        directory: Path,
        checkpoint_seconds: float = 60.0,
    ) -> None:
        self.registry = registry
        self.max_jobs = max_jobs  # trainer slots
        self.max_vocab = max_vocab
        self.directory = directory  # model_dir/_jobs
        self.checkpoint_seconds = checkpoint_seconds
        self.jobs: dict[str, Job] = {}  # by id, oldest first
        self._ctx = mp.get_context("spawn")  # fork would copy the server's threads and sockets
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False  # the server drains: no trainer starts any more

    def running(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.state == RUNNING]

    def queued(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.state == QUEUED]

    def place(self, job: Job) -> int:
        """A queued job's place in the queue, 1 = next; 0 when it is not queued."""
        queue = self.queued()
        return queue.index(job) + 1 if job in queue else 0

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"job {shown(job_id)}: no such job", subject="job")
        return job

    async def load(self) -> None:
        """Take up the journal: every job, the unfinished ones back in the queue (they resume
        from their checkpoints), then start what the slots allow."""
        self._loop = asyncio.get_running_loop()
        found = await asyncio.to_thread(self._read_journal)
        for job in found:
            self.jobs[job.id] = job
            if job.state == RUNNING:  # its server stopped without pausing it (SIGKILL, a crash)
                job.state = QUEUED
                await asyncio.to_thread(job.save)
            if job.state == QUEUED:
                log.info("job %s (%s): back in the queue from the journal", job.id, job.model_name)
        self._schedule()

    def _read_journal(self) -> list[Job]:
        jobs = []
        for path in sorted(self.directory.glob(f"*/{JOB_FILE}")):
            try:
                jobs.append(Job.load(path.parent, self.registry))
            except (OSError, ValueError, KeyError) as exc:
                log.warning("job record %s unreadable, skipped: %s", path, exc)
        return sorted(jobs, key=lambda j: j.created)

    async def start(
        self,
        model_name: str,
        text_path: Path,
        model_config: dict[str, Any],
        train_config: dict[str, Any],
        promote: bool,
    ) -> Job:
        """Queue a job training on the text in text_path (nextchar.server.training.texts); the
        text moves into the job's directory, so a resumed job has its data."""
        check_name(model_name)
        # off the loop: a training text can be a hundred MB
        await asyncio.to_thread(validate, text_path, model_config, train_config, self.max_vocab)
        job_id = f"job-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        job = Job(job_id, model_name, promote, model_config, train_config, self.directory / job_id)
        await asyncio.to_thread(self._create, job, text_path)
        self.jobs[job.id] = job
        log.info("job %s (%s): queued, place %d", job.id, model_name, self.place(job))
        self._schedule()
        return job

    @staticmethod
    def _create(job: Job, text_path: Path) -> None:
        job.directory.mkdir(parents=True)
        text_path.replace(job.directory / TEXT_FILE)  # the same file system: a rename
        job.save()

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state == QUEUED:
            self._end(job, CANCELLED, "cancelled by request before it started", None)
        elif job.state == RUNNING and job.stop is not None:
            job.stop.set()
            asyncio.get_running_loop().call_later(CANCEL_GRACE, self._terminate, job)
        return job

    def resume(self, job_id: str) -> Job:
        """Queue a failed job again: it goes on from its last checkpoint."""
        job = self.get(job_id)
        if job.state != FAILED or not (job.directory / TEXT_FILE).is_file():
            raise FailedPrecondition(
                f"job {shown(job_id)} is {job.state}: only a failed job that kept its text can resume"
            )
        job.state, job.error, job.attempts, job.finished = QUEUED, "", 0, 0.0
        job.save()
        job.notify()
        log.info("job %s (%s): queued again to resume, place %d", job.id, job.model_name, self.place(job))
        self._schedule()
        return job

    @staticmethod
    def _terminate(job: Job) -> None:
        process = job.process
        if process is not None and process.is_alive():
            process.terminate()

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Pause running jobs (they checkpoint and stop, and stay queued in the journal for the
        next start) and wait for their trainers, up to timeout."""
        self._closing = True
        for job in self.running():
            if job.pause is not None:
                job.pause.set()
        deadline = time.monotonic() + timeout
        for process in [j.process for j in self.jobs.values() if j.process is not None]:
            while process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if process.is_alive():
                process.terminate()

    # ------------------------------------------------------------ trainers

    def _schedule(self) -> None:
        """Start trainers for the oldest queued jobs while slots are free."""
        if self._closing:
            return
        for job in self.queued():
            if len(self.running()) >= self.max_jobs:
                return
            self._launch(job)

    def _launch(self, job: Job) -> None:
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        checkpoint = job.directory / CHECKPOINT_FILE
        resuming = checkpoint.is_file()
        if resuming:  # the records after the checkpoint come again, from the resumed run
            kept = len(ck.meta_of(checkpoint)["history"])
            if kept < len(job.records):
                job.records = job.records[:kept]
                with atomic_write(job.directory / RECORDS_FILE) as f:
                    f.write("".join(json.dumps(r) + "\n" for r in job.records).encode())
        parent, child = self._ctx.Pipe(duplex=False)
        job.stop, job.pause = self._ctx.Event(), self._ctx.Event()
        job.process = self._ctx.Process(
            target=run_training,
            args=(
                str(job.directory / TEXT_FILE),
                str(checkpoint),
                job.model_config,
                job.train_config,
                self.checkpoint_seconds,
                child,
                job.stop,
                job.pause,
                os.getpid(),
            ),
            name=f"nextchar-{job.id}",
            daemon=True,
        )
        job.process.start()
        child.close()
        job.state, job.attempts = RUNNING, job.attempts + 1
        job.started = job.started or time.time()
        job.save()
        job.notify()
        how = "resumed from its checkpoint" if resuming else "started"
        log.info(
            "job %s (%s): %s (trainer %d, attempt %d)",
            job.id,
            job.model_name,
            how,
            job.process.pid,
            job.attempts,
        )
        threading.Thread(
            target=self._read, args=(job, parent, loop), name=f"reader-{job.id}", daemon=True
        ).start()

    # ------------------------------------------------------------ reader thread

    def _read(self, job: Job, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        final: tuple[str, str, ModelVersion | None] | None = None
        while True:
            try:
                kind, body = conn.recv()
            except (EOFError, OSError):
                break
            if kind == "progress":
                job.append(body)
                loop.call_soon_threadsafe(self._on_record, job, body)
            elif kind == "checkpoint":
                log.info("job %s (%s): checkpointed at %s", job.id, job.model_name, body)
            elif kind == "paused":
                final = (QUEUED, "", None)
            elif kind == "done":
                try:
                    final = (SUCCEEDED, "", self._register(job, body))
                except Exception as exc:  # a failed save registers nothing
                    final = (FAILED, f"could not register the model: {type(exc).__name__}: {exc}", None)
            else:
                final = (CANCELLED if kind == "cancelled" else FAILED, str(body), None)
        conn.close()
        assert job.process is not None
        job.process.join(timeout=10)
        if final is None:  # the trainer died without a word
            code = job.process.exitcode
            if job.stop is not None and job.stop.is_set():
                final = (CANCELLED, "cancelled by request (trainer terminated)", None)
            elif job.pause is not None and job.pause.is_set():
                final = (QUEUED, "", None)  # stopped while the server drains: resumes next start
            elif job.attempts < MAX_ATTEMPTS:
                log.warning("job %s: trainer died (exit code %s); resuming from its checkpoint", job.id, code)
                final = (QUEUED, "", None)
            else:
                final = (FAILED, f"trainer died {job.attempts} times (last exit code {code})", None)
        with contextlib.suppress(RuntimeError):  # the loop may be closed at shutdown
            loop.call_soon_threadsafe(self._end, job, *final)

    def _register(self, job: Job, body: dict[str, Any]) -> ModelVersion:
        params = {k: np.asarray(v) for k, v in body["params"].items()}
        model = CharRNN(ModelConfig(**body["config"]), Vocab(body["vocab"]), params)
        mv = self.registry.register(
            job.model_name, model, history=body["history"], summary=body["summary"], promote=job.promote
        )
        log.info(
            "model %s v%d registered by job %s%s",
            mv.name,
            mv.version,
            job.id,
            " (default)" if job.promote else "",
        )
        return mv

    @staticmethod
    def _on_record(job: Job, record: dict[str, Any]) -> None:
        job.records.append(record)
        job.notify()

    def _end(self, job: Job, state: str, error: str, result: ModelVersion | None) -> None:
        """A trainer's end (or a queued job's cancel): record it, tidy the job's files, start the next."""
        job.state, job.error, job.result = state, error, result
        job.process = None
        if state != QUEUED:
            job.finished = time.time()
            log.info("job %s (%s): %s%s", job.id, job.model_name, state, f": {error}" if error else "")
            if state in (SUCCEEDED, CANCELLED):  # nothing left to resume: the text and checkpoint go
                for name in (TEXT_FILE, CHECKPOINT_FILE):
                    with contextlib.suppress(OSError):
                        (job.directory / name).unlink()
        job.save()
        job.notify()
        self._schedule()
