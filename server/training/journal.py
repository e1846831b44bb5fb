"""LocalJobStore: the embedded job store, a journal beside the model registry (no server to run).

Each job lives in ``model_dir/_jobs/<id>/``: ``job.json`` (its record, rewritten
atomically on every change), ``records.jsonl`` (its progress records, appended),
``text.txt`` and the trainer's latest ``checkpoint.npz``, which the trainer writes
there itself. Everything is also held in memory; ``load`` reads the journal at
start. The queue is the QUEUED jobs, oldest first, that no trainer holds; the
trainers are this server's own, so a claim never expires (a trainer process that
dies is seen by its pool at once) and a job RUNNING in the journal at start belonged
to a server that stopped without pausing it: it goes back in the queue.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

from nextchar.core.atomic import atomic_write
from nextchar.server.errors import NotFound, shown
from nextchar.server.training.store import CHECKPOINT_FILE, QUEUED, RUNNING, TEXT_FILE, Claim, Job

JOB_FILE, RECORDS_FILE = "job.json", "records.jsonl"
log = logging.getLogger("nextchar.server")


class LocalJobStore:
    """The JobStore protocol on files in one directory (model_dir/_jobs); thread-safe."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}  # by id, oldest first
        self._records: dict[str, list[dict[str, Any]]] = {}
        self._held: set[str] = set()  # jobs a trainer holds
        self._cancel: set[str] = set()

    def __str__(self) -> str:
        return str(self.directory)

    def load(self) -> list[Job]:
        """Read the journal; returns the jobs put back in the queue."""
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
        (self.directory / job.id).mkdir(parents=True)
        text.replace(self.directory / job.id / TEXT_FILE)  # the same file system: a rename
        self._write(job)
        with self._lock:
            self._jobs[job.id], self._records[job.id] = job, []

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
            self._write(job)
            self._jobs[job.id] = Job.from_record(job.record())
        return True

    def requeue(self, job: Job) -> None:
        self.save(job)  # the queue is the QUEUED jobs

    def request_cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancel.add(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancel

    # ------------------------------------------------------------ the queue

    def take(self, trainer: str) -> Claim | None:
        with self._lock:
            for job in self._jobs.values():
                if job.state == QUEUED and job.id not in self._held:
                    self._held.add(job.id)
                    return Claim(job.id, "", trainer)
        return None

    def queue(self) -> list[str]:
        with self._lock:  # take's order: the jobs as they were added (a requeued one keeps its place)
            return [j.id for j in self._jobs.values() if j.state == QUEUED and j.id not in self._held]

    def renew(self, claim: Claim) -> bool:
        return True  # this server's own trainers: its pool sees a dead one at once

    def release(self, claim: Claim, requeue: bool) -> None:
        with self._lock:
            self._held.discard(claim.job_id)
            self._cancel.discard(claim.job_id)

    def append(self, claim: Claim, record: dict[str, Any]) -> bool:
        with open(self.directory / claim.job_id / RECORDS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        with self._lock:
            self._records[claim.job_id].append(record)
        return True

    def trim(self, job_id: str, keep: int) -> None:
        with self._lock:
            records = self._records[job_id][:keep]
            self._records[job_id] = records
            with atomic_write(self.directory / job_id / RECORDS_FILE) as f:
                f.write("".join(json.dumps(r) + "\n" for r in records).encode())

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
        return True
