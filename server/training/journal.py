"""LocalJobStore: the embedded job store, a journal beside the model registry (no server to run).

Each job lives in ``model_dir/_jobs/<id>/``: ``job.json`` (its record, rewritten
atomically on every change), ``records.jsonl`` (its progress records, appended),
``text.txt`` and the trainer's latest ``checkpoint.npz``, which the trainer writes
there itself. Everything is also held in memory; ``load`` reads the journal at
start. The queue is the QUEUED jobs, oldest first, that no trainer holds; the
trainers are this server's own, so a claim never expires (a trainer process that
dies is seen by its pool at once) and a job RUNNING in the journal at start belonged
to a server that stopped without pausing it: it goes back in the queue. Every writer
is in this process, so each tells the listeners itself once its change is made.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from nextchar.core.atomic import atomic_write
from nextchar.server.errors import NotFound, shown
from nextchar.server.training.store import (
    CHECKPOINT_FILE,
    PROGRESS,
    QUEUED,
    RUNNING,
    STATE,
    TEXT_FILE,
    Change,
    Claim,
    Job,
    Listener,
)

JOB_FILE, RECORDS_FILE = "job.json", "records.jsonl"
STRAY_AGE = 60.0  # seconds: a job directory still without a record this long after it was made is a stray
log = logging.getLogger("nextchar.server")


class LocalJobStore:
    """The JobStore protocol on files in one directory (model_dir/_jobs); thread-safe."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}  # by id, oldest first
        self._records: dict[str, list[dict[str, Any]]] = {}
        self._held: dict[str, Claim] = {}  # the claims trainers hold, by job id
        self._cancel: set[str] = set()
        self._listeners: list[Listener] = []

    def __str__(self) -> str:
        return str(self.directory)

    def load(self) -> list[Job]:
        """Read the journal; returns the jobs put back in the queue. A directory without a record
        is what an add a crash cut short left: it is removed (unless it is new: an add under way)."""
        if self.directory.is_dir():
            for directory in self.directory.iterdir():
                if (
                    not (directory / JOB_FILE).exists()
                    and time.time() - directory.stat().st_mtime > STRAY_AGE
                ):
                    log.info("job directory %s holds no job record: removed", directory)
                    shutil.rmtree(directory, ignore_errors=True)
        found: list[tuple[Job, list[dict[str, Any]]]] = []
        for path in sorted(self.directory.glob(f"*/{JOB_FILE}")):
            try:
                found.append(self._read(path.parent))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("job record %s unreadable, skipped: %s", path, exc)
        requeued = []
        for job, records in sorted(found, key=lambda f: f[0].created):
            if job.state == RUNNING:  # its server stopped without pausing it (SIGKILL, a crash)
                job.state = QUEUED
                self._write(job)
            if job.state == QUEUED:
                requeued.append(job)
            with self._lock:
                self._jobs[job.id], self._records[job.id] = job, records
        return requeued

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _tell(self, job_id: str, change: Change = STATE) -> None:
        for listener in self._listeners:
            listener(job_id, change)

    @staticmethod
    def _read(directory: Path) -> tuple[Job, list[dict[str, Any]]]:
        job = Job.from_record(json.loads((directory / JOB_FILE).read_text()))
        records = []
        with contextlib.suppress(OSError):
            for line in (directory / RECORDS_FILE).read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):  # a line torn by a crash
                    records.append(json.loads(line))
        return job, records

    def _write(self, job: Job) -> None:
        with atomic_write(self.directory / job.id / JOB_FILE) as f:
            f.write(json.dumps(job.record(), indent=1).encode())

    # ------------------------------------------------------------ records

    def add(self, job: Job, text: Path) -> None:
        directory = self.directory / job.id
        directory.mkdir(parents=True)
        try:
            text.replace(directory / TEXT_FILE)  # the same file system: a rename
            self._write(job)
        except BaseException:  # (the text gone meanwhile, a full disk): no job, and no directory
            shutil.rmtree(directory, ignore_errors=True)
            raise
        with self._lock:
            self._jobs[job.id], self._records[job.id] = job, []
        self._tell(job.id)

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise NotFound(f"job {shown(job_id)}: no such job", subject="job")
            return self._copy(job)

    def all(self) -> list[Job]:
        with self._lock:
            return [self._copy(j) for j in self._jobs.values()]

    def _copy(self, job: Job) -> Job:
        """A snapshot for a reader (the caller holds the lock): the records change under it."""
        copy = Job.from_record(job.record())
        records = self._records[job.id]
        copy.latest = records[-1] if records else None
        return copy

    def records(self, job_id: str, start: int = 0) -> list[dict[str, Any]]:
        with self._lock:
            return self._records.get(job_id, [])[start:]

    def save(self, job: Job, claim: Claim | None = None) -> bool:
        with self._lock:
            if claim is not None and self._held.get(job.id) != claim:
                return False
            self._write(job)
            self._jobs[job.id] = Job.from_record(job.record())
        self._tell(job.id)
        return True

    def requeue(self, job: Job) -> None:
        self.save(job)  # the queue is the QUEUED jobs

    def request_cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancel.add(job_id)
        self._tell(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancel

    # ------------------------------------------------------------ the queue

    def take(self, trainer: str) -> Claim | None:
        with self._lock:
            for job in self._jobs.values():
                if job.state == QUEUED and job.id not in self._held:
                    claim = self._held[job.id] = Claim(job.id, "", trainer)
                    return claim
        return None

    def queue(self) -> list[str]:
        with self._lock:  # take's order: the jobs as they were added (a requeued one keeps its place)
            return [j.id for j in self._jobs.values() if j.state == QUEUED and j.id not in self._held]

    def renew(self, claim: Claim) -> bool:
        return True  # this server's own trainers: its pool sees a dead one at once

    def holder(self, job_id: str) -> str | None:
        with self._lock:
            if job_id not in self._jobs:
                return None
            claim = self._held.get(job_id)
            return claim.trainer if claim else ""

    def release(self, claim: Claim, requeue: bool) -> None:
        with self._lock:
            if self._held.get(claim.job_id) == claim:
                del self._held[claim.job_id]
            self._cancel.discard(claim.job_id)
        self._tell(claim.job_id)

    def append(self, claim: Claim, record: dict[str, Any]) -> bool:
        with open(self.directory / claim.job_id / RECORDS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        with self._lock:
            self._records[claim.job_id].append(record)
        self._tell(claim.job_id, PROGRESS)
        return True

    def trim(self, job_id: str, keep: int) -> None:
        with self._lock:
            records = self._records[job_id][:keep]
            self._records[job_id] = records
            with atomic_write(self.directory / job_id / RECORDS_FILE) as f:
                f.write("".join(json.dumps(r) + "\n" for r in records).encode())
        self._tell(job_id, PROGRESS)

    # ------------------------------------------------------------ files

    def fetch(self, job: Job) -> Path:
        directory = self.directory / job.id
        if not (directory / TEXT_FILE).is_file():
            raise FileNotFoundError(f"job {job.id}: its text is gone from {directory}")
        return directory

    def keep_checkpoint(self, claim: Claim, path: Path) -> bool:
        return True  # the trainer wrote it in place

    def discard(self, job_id: str) -> None:
        for name in (TEXT_FILE, CHECKPOINT_FILE):
            with contextlib.suppress(OSError):
                (self.directory / job_id / name).unlink()

    def remove(self, job_id: str) -> bool:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or not job.done:
                return False
            del self._jobs[job_id], self._records[job_id]
            # the record first: a removal a crash cuts short leaves no job, only files
            (self.directory / job_id / JOB_FILE).unlink(missing_ok=True)
        shutil.rmtree(self.directory / job_id, ignore_errors=True)
        self._tell(job_id)
        return True
