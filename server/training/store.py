"""Where training jobs live: the job record, the JobStore protocol, and what a trainer holds (a Claim).

A job store keeps every job's record, its progress records, its text and its latest
checkpoint, and is the queue trainers take jobs from. Two implement it:
``LocalJobStore`` (nextchar.server.training.journal: files beside the model
registry, one server's trainers) and ``RedisJobStore``
(nextchar.server.training.redis_jobs: every replica and every ``nextchar trainer``
on one Redis). The job manager (the API side) and the trainer pool (the side that
runs jobs) talk to the store only, never to each other, so a job queued through one
replica can run on any trainer and be watched or cancelled through any replica;
the store tells both of each change (``subscribe``), so a watcher hears of progress
and an idle trainer of a queued job as it happens, without polling.

Every method blocks (files, or Redis round trips): the job manager calls them in
threads, the trainer pool from its own. A trainer's writes carry its Claim, and a
store refuses them (False) once another trainer has taken the job over (the
claim's lease ran out), so a trainer that was given up for dead cannot overwrite
the job's progress.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from nextchar.core.config import ModelConfig, TrainConfig, from_record

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TEXT_FILE, CHECKPOINT_FILE = "text.txt", "checkpoint.npz"  # in a job's working directory


Change = Literal["state", "progress"]
STATE: Change = "state"  # a job's record, or the queue, changed
PROGRESS: Change = "progress"  # a job's progress record came
Listener = Callable[[str, Change], None]  # (job id, or "" for any job; what changed)


@dataclass(eq=False)
class Job:
    """A job's durable record (what ListJobs shows), plus its latest progress record when read."""

    id: str
    model_name: str
    promote: bool
    model_config: ModelConfig
    train_config: TrainConfig
    state: str = QUEUED
    error: str = ""
    result: tuple[str, int] | None = None  # (name, version) registered
    version: int = 0  # the version of model_name reserved for it to register (0: none yet)
    created: float = field(default_factory=time.time)
    started: float = 0.0  # when a trainer first took it up
    finished: float = 0.0
    attempts: int = 0  # trainer starts
    trainer: str = ""  # the trainer that runs it (or last ran it): host:pid
    latest: dict[str, Any] | None = field(default=None, compare=False)  # not part of the record

    @property
    def done(self) -> bool:
        return self.state not in (QUEUED, RUNNING)

    def record(self) -> dict[str, Any]:
        fields = asdict(self)
        del fields["latest"]
        return fields

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Job:
        known = {k: v for k, v in record.items() if k in cls.__dataclass_fields__ and k != "latest"}
        if known.get("result"):
            known["result"] = (str(known["result"][0]), int(known["result"][1]))
        known["model_config"] = from_record(ModelConfig, known.get("model_config", {}))
        known["train_config"] = from_record(TrainConfig, known.get("train_config", {}))
        return cls(**known)


@dataclass(frozen=True)
class Claim:
    """A trainer's hold on one job, from the queue: its entry there, and the trainer's name."""

    job_id: str
    entry: str  # the queue entry the trainer took (a Redis stream id; "" in the local store)
    trainer: str


class JobStore(Protocol):
    def load(self) -> list[Job]:
        """Ready the store at start; returns the jobs that are back in the queue from before."""

    def subscribe(self, listener: Listener) -> None:
        """Call listener after each change to any job, wherever it was made (this process, or
        another on the same shared store), from whichever thread hears of it; it must not block.
        STATE when a job was added, saved, requeued, released or removed, or its cancel asked
        for; PROGRESS when a progress record came. Job id "" when changes may have been missed
        (a lost connection): every job may have changed."""

    # ------------------------------------------------------------ records (the API side)

    def add(self, job: Job, text: Path) -> None:
        """Keep a new job and its text (the file moves into the store), and queue it."""

    def get(self, job_id: str) -> Job:
        """The job, with its latest progress record; NotFound when there is none."""

    def all(self) -> list[Job]:
        """Every job, oldest first."""

    def records(self, job_id: str, start: int = 0) -> list[dict[str, Any]]:
        """The job's progress records from index start on."""

    def save(self, job: Job, claim: Claim | None = None) -> bool:
        """Rewrite the job's record. With a claim: only while it holds the job (else False)."""

    def requeue(self, job: Job) -> None:
        """Save a job set back to QUEUED (ResumeJob) and put it in the queue again."""

    def request_cancel(self, job_id: str) -> None:
        """Ask whichever trainer runs the job to stop (it polls cancel_requested)."""

    def cancel_requested(self, job_id: str) -> bool: ...

    # ------------------------------------------------------------ the queue (the trainers' side)

    def take(self, trainer: str) -> Claim | None:
        """The next job for this trainer: one whose trainer's lease ran out first, else the oldest
        queued; None when there is none."""

    def queue(self) -> list[str]:
        """The ids of the jobs waiting in the queue, in the order trainers will take them."""

    def renew(self, claim: Claim) -> bool:
        """Keep the claim's lease; False when another trainer has taken the job over."""

    def holder(self, job_id: str) -> str | None:
        """The name of the trainer that holds the job now; "" when no trainer does (it waits in the
        queue, or has ended); None when the store has no such job (removed, or a shared store that
        lost its data). What a trainer whose write was refused asks, to say why."""

    def release(self, claim: Claim, requeue: bool) -> None:
        """The trainer is done with the job; requeue puts it back in the queue (a drain, a dead
        trainer process) for any trainer to resume from its checkpoint."""

    def append(self, claim: Claim, record: dict[str, Any]) -> bool:
        """Add a progress record; False when the claim is lost."""

    def trim(self, job_id: str, keep: int) -> None:
        """Drop the progress records after the first keep (a run resumed from a checkpoint that far
        reports the rest again)."""

    # ------------------------------------------------------------ files a trainer needs

    def fetch(self, job: Job) -> Path:
        """A directory on this machine holding the job's TEXT_FILE and, when it has one, its latest
        CHECKPOINT_FILE (where the trainer writes the next ones)."""

    def keep_checkpoint(self, claim: Claim, path: Path) -> bool:
        """The trainer wrote a new checkpoint at path: make it the job's (False: the claim is lost)."""

    def discard(self, job_id: str) -> None:
        """The job ended with nothing to resume: drop its text and checkpoint."""

    def remove(self, job_id: str) -> bool:
        """Forget an ended job entirely (record, progress records, files); False, changing nothing,
        when it is not ended (any more: a ResumeJob may have queued it since it was read)."""
