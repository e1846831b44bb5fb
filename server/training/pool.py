"""The trainer pool: takes jobs from a job store's queue and runs each in a trainer process.

``nextchar serve`` runs one with ``max_jobs`` slots (``--trainers 0``: none) and
``nextchar trainer`` runs one alone; with the Redis store they all take from the
same queue. A thread looks for work while a slot is free, whenever the store says a
job changed (one was queued, or a trainer let one go) and every IDLE_POLL besides
(a dead trainer's lease runs out without a word); each job gets a thread
that fetches the job's text and checkpoint (nextchar.server.training.store),
starts its trainer process (nextchar.server.training.trainer, at nice 10) and
follows it: progress records go to the store as they come, each checkpoint too,
the claim's lease is renewed every third of the lease, and the job's cancel flag is
read every CANCEL_POLL (the trainer stops, or is terminated CANCEL_GRACE later). The finished model is
registered here, in the parent (the registry has one writer per process).

A trainer process that dies is seen at once (its pipe closes): the job goes back
to the queue and resumes from its checkpoint, up to MAX_ATTEMPTS starts; a whole
pool that dies (SIGKILL, a lost machine) takes its trainers with it (they die
with their parent), and its jobs come back through their leases. ``shutdown``
pauses every trainer (it checkpoints and stops) and puts its job back in the
queue. A pool whose claim was taken over (its lease ran out while it was stuck)
terminates that trainer and writes nothing more; its log says which job, who holds it
now (another trainer, nobody, or nobody because the job is gone from the store) and
what becomes of the work (``_lost``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import assert_never

from nextchar.core import checkpoint as ck
from nextchar.core.adapt import AdaptConfig
from nextchar.server.errors import NotFound, ServiceError
from nextchar.server.registry import ModelVersion, Registry
from nextchar.server.training import pipe
from nextchar.server.training.store import (
    CANCELLED,
    CHECKPOINT_FILE,
    FAILED,
    QUEUED,
    RUNNING,
    STATE,
    SUCCEEDED,
    TEXT_FILE,
    Change,
    Claim,
    Job,
    JobStore,
)
from nextchar.server.training.trainer import below_serving, run_training

MAX_ATTEMPTS = 3  # trainer starts per job: a trainer that keeps dying fails its job
CANCEL_GRACE = 5.0  # seconds a cancelled trainer gets to notice before it is terminated
TICK = 0.1  # seconds between looks at a running trainer's pipe
CANCEL_POLL = 0.5  # seconds between looks at a running job's cancel flag
IDLE_POLL = 0.5  # seconds between looks at the queue while a slot is free
log = logging.getLogger("nextchar.server")

Final = tuple[str, str, tuple[str, int] | None]  # state, error, the model registered


class LostClaim(Exception):
    """Another trainer has taken the job over: this one must stop and write nothing more."""


@dataclass
class Running:
    process: SpawnProcess
    stop: Event  # cancel
    pause: Event  # checkpoint and stop
    thread: threading.Thread


JOB_KEY = "job_id"  # in a registered model's summary: the job that trained it


def registered_by(mv: ModelVersion, job: Job) -> bool:
    return mv.name == job.model_name and mv.summary.get(JOB_KEY) == job.id


class TrainerPool:
    def __init__(
        self,
        store: JobStore,
        registry: Registry,
        slots: int,
        checkpoint_seconds: float,
        lease: float,
        name: str = "",
    ) -> None:
        self.store, self.registry, self.slots = store, registry, slots
        self.checkpoint_seconds = checkpoint_seconds
        self.lease = lease
        self.renew_every = lease / 3
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.running: dict[str, Running] = {}  # by job id
        self._ctx = mp.get_context("spawn")  # fork would copy the server's threads and sockets
        self._closing = threading.Event()
        self._wake = threading.Event()  # a trainer ended (a slot is free), or the store changed
        self._taking = threading.Lock()  # one fill at a time
        self._failing = False  # the queue was unreachable at the last look
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.slots:
            self.store.subscribe(self._heard)
            self._thread = threading.Thread(target=self._loop, name="trainer-pool", daemon=True)
            self._thread.start()

    def _heard(self, job_id: str, change: Change) -> None:
        """The store's listener (any thread): a change of state may have queued a job."""
        if change == STATE:
            self._wake.set()

    def fill(self) -> None:
        """Take jobs from the queue while slots are free, and start them; blocking."""
        with self._taking:
            try:
                while not self._closing.is_set() and len(self.running) < self.slots:
                    claim = self.store.take(self.name)
                    if claim is None:
                        break
                    self._begin(claim)
                self._failing = False
            except ServiceError as exc:
                if not self._failing:  # once per outage
                    log.warning("trainer %s: cannot reach the job queue: %s", self.name, exc)
                self._failing = True
            except Exception:  # whatever one job's start met, the pool goes on with the others
                log.exception("trainer %s: a job could not be started", self.name)

    def _loop(self) -> None:
        while not self._closing.is_set():
            self._wake.clear()  # before the look: a change during it brings the next one at once
            self.fill()
            self._wake.wait(IDLE_POLL)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Take no more jobs; pause the running ones (they checkpoint, stop and go back to the
        queue) and wait for them, up to timeout, then terminate what is left. Blocking."""
        self._closing.set()
        self._wake.set()
        running = list(self.running.values())
        for r in running:
            r.pause.set()
        deadline = time.monotonic() + timeout
        for r in running:
            r.thread.join(max(0.0, deadline - time.monotonic()))
            if r.process.is_alive():
                r.process.terminate()
                r.thread.join(5)

    # ------------------------------------------------------------ one job

    def _begin(self, claim: Claim) -> None:
        try:
            job = self.store.get(claim.job_id)
            if job.done:  # cancelled while it waited
                self.store.release(claim, requeue=False)
                return
            if self.store.cancel_requested(job.id):
                self._end(claim, job, (CANCELLED, "cancelled by request before it started", None))
                return
            if job.attempts >= MAX_ATTEMPTS:  # its trainers died with their pool each time
                self._end(claim, job, (FAILED, f"trainer died {job.attempts} times", None))
                return
            try:
                directory = self.store.fetch(job)
            except OSError as exc:  # its text is gone, or this machine cannot hold it
                self._end(claim, job, (FAILED, f"could not fetch its text: {exc}", None))
                return
            checkpoint = directory / CHECKPOINT_FILE
            resuming = checkpoint.is_file()
            if resuming:  # the records after the checkpoint come again, from the resumed run
                self.store.trim(job.id, len(ck.meta_of(checkpoint)["history"]))
            job.state, job.attempts, job.trainer = RUNNING, job.attempts + 1, self.name
            job.started = job.started or time.time()
            self._check(self.store.save(job, claim))
        except LostClaim:  # another trainer took it between the take and the start, or it went
            log.warning("%s", self._lost(claim.job_id, "did not start its run"))
            return
        except ServiceError as exc:  # the claim's lease runs out and the job comes back
            log.warning("job %s: could not be taken up (%s); it stays in the queue", claim.job_id, exc)
            return
        parent, child = self._ctx.Pipe(duplex=False)
        stop, pause = self._ctx.Event(), self._ctx.Event()
        process = self._ctx.Process(
            target=run_training,
            args=(
                str(directory / TEXT_FILE),
                str(checkpoint),
                job.model_config,
                job.train_config,
                self.checkpoint_seconds,
                child,
                stop,
                pause,
                os.getpid(),
            ),
            name=f"nextchar-{job.id}",
            daemon=True,
        )
        process.start()
        assert process.pid is not None  # (started)
        below_serving(process.pid)
        child.close()
        thread = threading.Thread(
            target=self._follow, args=(claim, job, checkpoint, parent), name=f"trainer-{job.id}", daemon=True
        )
        self.running[job.id] = Running(process, stop, pause, thread)
        how = "resumed from its checkpoint" if resuming else "started"
        log.info(
            "job %s (%s): %s on trainer %s (pid %d, attempt %d)",
            job.id,
            job.model_name,
            how,
            self.name,
            process.pid,
            job.attempts,
        )
        thread.start()

    def _follow(self, claim: Claim, job: Job, checkpoint: Path, conn: Connection) -> None:
        running = self.running[job.id]
        try:
            final = self._watch(claim, job, checkpoint, conn, running)
            self._end(claim, job, final)
        except LostClaim:
            running.process.terminate()
            log.warning("%s", self._lost(job.id, "terminated its run", job.model_name))
        except ServiceError as exc:  # the store went away: the lease runs out, another trainer resumes
            running.process.terminate()
            if self._gone(job.id):  # the store answers again, without the job (e.g. restarted empty)
                log.warning("%s", self._lost(job.id, "terminated its run", job.model_name))
            else:
                log.warning("job %s: the job store failed (%s); the job resumes elsewhere", job.id, exc)
        finally:
            conn.close()
            running.process.join(10)
            self.running.pop(job.id, None)
            self._wake.set()

    @staticmethod
    def _check(held: bool) -> None:
        if not held:
            raise LostClaim

    def _gone(self, job_id: str) -> bool:
        """The store answers, and has no such job."""
        try:
            return self.store.holder(job_id) is None
        except ServiceError:
            return False

    def _lost(self, job_id: str, stopped: str, model_name: str = "") -> str:
        """The log line of a trainer whose write was refused: which job, who holds it now (asked
        of the store), and what becomes of the work this trainer had done (stopped: what this
        trainer did about it, "terminated its run")."""
        job = f"job {job_id}" + (f" ({model_name})" if model_name else "")
        this = f"this trainer ({self.name})"
        try:
            holder = self.store.holder(job_id)
            record = self.store.get(job_id) if holder == "" else None
        except NotFound:  # removed between the two questions
            holder, record = None, None
        except ServiceError as exc:
            return (
                f"{job}: {this} no longer holds it: it {stopped} and writes nothing more for it; "
                f"who holds it now is unknown (the job store failed: {exc})"
            )
        if holder is None:
            return (
                f"{job}: gone from the job store (removed, or the store lost its data, e.g. a "
                f"Redis restarted empty); {this} {stopped} and dropped its work, writing nothing "
                "more for the job, and no trainer will resume it"
            )
        if holder == self.name:
            return (
                f"{job}: {this} let its lease run out ({self.lease:g} s without renewal) and took the "
                f"job up again itself; it {stopped} of the earlier claim, which writes nothing more: "
                "the new run resumes from the job's last checkpoint"
            )
        if holder:
            return (
                f"{job}: taken over by another trainer, {holder}, after {this} let its lease run out "
                f"({self.lease:g} s without renewal: paused or stuck); {this} {stopped} and writes "
                f"nothing more: {holder} resumes the job from its last checkpoint (the start if "
                "none), so what this run did since then is redone there (the model is registered "
                "once, by whichever finishes)"
            )
        assert record is not None
        if record.done:
            ended = record.state + (
                f", registered as {record.result[0]} v{record.result[1]}" if record.result else ""
            )
            by = (
                f"taken over by another trainer, {record.trainer}, which ran it to its end ({ended})"
                if record.trainer and record.trainer != self.name
                else f"ended meanwhile ({ended})"
            )
            return (
                f"{job}: {by}, after {this} let its lease run out ({self.lease:g} s without renewal: "
                f"paused or stuck); {this} {stopped} and dropped its work, writing nothing more"
            )
        return (
            f"{job}: {this} let its lease run out ({self.lease:g} s without renewal) and no "
            f"trainer holds the job now ({record.state}); {this} {stopped} and writes nothing "
            "more: the next trainer to take it resumes from its last checkpoint"
        )

    def _watch(self, claim: Claim, job: Job, checkpoint: Path, conn: Connection, running: Running) -> Final:
        """Follow the trainer until its pipe closes; its final state."""
        final: Final | None = None
        renewed = polled = time.monotonic()
        cancel_at = 0.0
        while True:
            if conn.poll(TICK):
                try:
                    message = pipe.receive(conn)
                except (EOFError, OSError):
                    break
                except pipe.PipeError as exc:  # a trainer that cannot be understood is stopped
                    final = (FAILED, str(exc), None)
                    running.process.terminate()
                    break
                match message:
                    case pipe.Progress(record):
                        self._check(self.store.append(claim, record))
                        if record.get("kind") == "tune":
                            log.info("job %s (%s): trained; tuning its adaptation", job.id, job.model_name)
                    case pipe.Checkpointed(position):
                        self._check(self.store.keep_checkpoint(claim, checkpoint))
                        # every epoch of every job: DEBUG; INFO says when a job starts and how it ends
                        log.debug("job %s (%s): checkpointed at %s", job.id, job.model_name, position)
                    case pipe.Paused():
                        final = (QUEUED, "", None)
                    case pipe.Done():
                        final = self._register(claim, job, message)
                    case pipe.Cancelled(why):
                        final = (CANCELLED, why, None)
                    case pipe.Failed(why):
                        final = (FAILED, why, None)
                    case _:
                        assert_never(message)
            now = time.monotonic()
            if now - renewed >= self.renew_every:
                renewed = now
                self._check(self.store.renew(claim))
            if not cancel_at and now - polled >= CANCEL_POLL:
                polled = now
                if self.store.cancel_requested(job.id):
                    running.stop.set()  # the trainer stops at its next step
                    cancel_at = now + CANCEL_GRACE
            if cancel_at and now > cancel_at and running.process.is_alive():
                running.process.terminate()
        running.process.join(10)
        if final is not None:
            return final
        code = running.process.exitcode
        if running.stop.is_set():
            return (CANCELLED, "cancelled by request (trainer terminated)", None)
        if running.pause.is_set():
            return (QUEUED, "", None)  # stopped while its pool shuts down: resumes from its checkpoint
        if job.attempts < MAX_ATTEMPTS:
            log.warning("job %s: trainer died (exit code %s); resuming from its checkpoint", job.id, code)
            return (QUEUED, "", None)
        return (FAILED, f"trainer died {job.attempts} times (last exit code {code})", None)

    def _register(self, claim: Claim, job: Job, done: pipe.Done) -> Final:
        """Register the job's model once, and only while this trainer holds the job. The version is
        reserved first, in the job's record and fenced by the claim (a trainer that lost the job
        cannot reserve one); whichever trainer finishes the job then publishes exactly that
        version (publishing is first-come: a second publisher of it finds it taken) or finds it
        published, the model's summary naming the job. A trainer paused past its lease anywhere in
        here can thus neither add a second version (it only ever publishes the reserved one) nor
        move the default: the promotion comes after a fenced write of the result. (A resumed job
        finishes with the same weights: training is deterministic.)"""
        try:
            mv, how = self._publish(claim, job, done)
            job.result = (mv.name, mv.version)
            self._check(self.store.save(job, claim))  # still ours: only now may the default move
            if job.promote and self.registry.default is not mv:  # (versions are kept as loaded)
                self.registry.set_default(mv.name, mv.version)
        except LostClaim:
            raise
        except Exception as exc:  # a failed save registers nothing
            return (FAILED, f"could not register the model: {type(exc).__name__}: {exc}", None)
        log.info(
            "model %s v%d %s by job %s%s",
            mv.name,
            mv.version,
            how,
            job.id,
            " (default)" if job.promote else "",
        )
        return (SUCCEEDED, "", (mv.name, mv.version))

    def _publish(self, claim: Claim, job: Job, done: pipe.Done) -> tuple[ModelVersion, str]:
        """The version the job registered: the reserved one, published here or found published."""
        model = done.model.model()
        adapt = None if done.adapt is None else AdaptConfig.from_dict(done.adapt)
        summary = {**done.summary, JOB_KEY: job.id}
        while True:
            self.registry.refresh(force=True)  # the versions other replicas registered meanwhile
            mv = next((v for v in self.registry.versions() if registered_by(v, job)), None)
            if mv is not None:
                return mv, "found registered already"
            if not job.version:
                job.version = self.registry.next_version(job.model_name)
                self._check(self.store.save(job, claim))
            published = self.registry.register_as(
                job.model_name, job.version, model, history=done.history, summary=summary, adapt=adapt
            )
            if published is not None:
                return published, "registered"
            job.version = 0  # taken: by this job's other trainer (found above) or by another job

    def _end(self, claim: Claim, job: Job, final: Final) -> None:
        """Record how the job ended (or that it is back in the queue), tidy its files, let it go."""
        if final[0] == FAILED and self.store.cancel_requested(job.id):  # its text went with the cancel
            final = (CANCELLED, "cancelled by request", None)
        job.state, job.error, job.result = final
        if job.state == QUEUED:
            log.info("job %s (%s): back in the queue, to resume from its checkpoint", job.id, job.model_name)
        else:
            job.finished = time.time()
            log.info(
                "job %s (%s): %s%s", job.id, job.model_name, job.state, f": {job.error}" if job.error else ""
            )
        self._check(self.store.save(job, claim))
        if job.state in (SUCCEEDED, CANCELLED):  # nothing left to resume: the text and checkpoint go
            with contextlib.suppress(ServiceError, OSError):
                self.store.discard(job.id)
        self.store.release(claim, requeue=job.state == QUEUED)
