"""Training jobs: each one a trainer process whose progress streams back over a pipe.

A job outlives the RPC that started it: a client that disconnects only stops
watching. A reader thread per job receives the trainer's messages, registers the
finished model (atomic file write, then publish) and hands every event to the
event loop, where watchers follow the job's record list. A job that fails,
diverges, is cancelled or whose process dies registers nothing and says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing as mp
import os
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
from nextchar.core.config import ModelConfig, TrainConfig, check_text
from nextchar.core.model import CharRNN
from nextchar.core.vocab import Vocab
from nextchar.server.errors import InvalidArgument, NotFound, ResourceExhausted, shown
from nextchar.server.registry import ModelVersion, Registry, check_name
from nextchar.server.training.trainer import run_training

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"
CANCEL_GRACE = 5.0  # seconds a cancelled trainer gets to notice before it is terminated


def validate(
    text_path: Path, model_config: dict[str, Any], train_config: dict[str, Any], max_vocab: int
) -> None:
    """Raise InvalidArgument naming the field, before any process is started (blocking: reads the text)."""
    text = text_path.read_text(encoding="utf-8")
    if not text:
        raise InvalidArgument("text: empty; give the training text")
    distinct = len(set(text))
    if distinct > max_vocab:
        raise InvalidArgument(
            f"text: {distinct} distinct characters exceed max_vocab ({max_vocab}); "
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
        check_text(text, tc)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc


@dataclass(eq=False)
class Job:
    id: str
    model_name: str
    promote: bool
    model_config: dict[str, Any]
    train_config: dict[str, Any]
    state: str = RUNNING
    error: str = ""
    result: ModelVersion | None = None
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    stop: Event | None = None
    process: SpawnProcess | None = None

    @property
    def done(self) -> bool:
        return self.state != RUNNING

    def notify(self) -> None:
        """Wake every watcher; each waits on the Event it saw, so none misses a change."""
        self.changed.set()
        self.changed = asyncio.Event()

    async def follow(self) -> AsyncIterator[dict[str, Any] | None]:
        """None first (status), then every record so far and as they come; ends when the job does."""
        yield None
        seen = 0
        while True:
            changed = self.changed
            while seen < len(self.records):
                seen += 1
                yield self.records[seen - 1]
            if self.done:
                return
            await changed.wait()


class JobManager:
    def __init__(self, registry: Registry, max_jobs: int, max_vocab: int) -> None:
        self.registry = registry
        self.max_jobs = max_jobs
        self.max_vocab = max_vocab
        self.jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._ctx = mp.get_context("spawn")  # fork would copy the server's threads and sockets

    def running(self) -> list[Job]:
        return [j for j in self.jobs.values() if not j.done]

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"job {shown(job_id)}: no such job", subject="job")
        return job

    async def start(
        self,
        model_name: str,
        text_path: Path,
        model_config: dict[str, Any],
        train_config: dict[str, Any],
        promote: bool,
    ) -> Job:
        """Start a job training on the text in text_path (nextchar.server.training.texts)."""
        check_name(model_name)
        # off the loop: a training text can be a hundred MB
        await asyncio.to_thread(validate, text_path, model_config, train_config, self.max_vocab)
        if len(self.running()) >= self.max_jobs:
            raise ResourceExhausted(f"{self.max_jobs} training job(s) already running; wait or cancel one")
        job = Job(
            f"job-{next(self._ids)}-{int(time.time())}", model_name, promote, model_config, train_config
        )
        parent, child = self._ctx.Pipe(duplex=False)
        job.stop = self._ctx.Event()
        job.process = self._ctx.Process(
            target=run_training,
            args=(str(text_path), model_config, train_config, child, job.stop, os.getpid()),
            name=f"nextchar-{job.id}",
            daemon=True,
        )
        job.process.start()
        child.close()
        self.jobs[job.id] = job
        loop = asyncio.get_running_loop()
        threading.Thread(
            target=self._read, args=(job, parent, loop), name=f"reader-{job.id}", daemon=True
        ).start()
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if not job.done and job.stop is not None:
            job.stop.set()
            asyncio.get_running_loop().call_later(CANCEL_GRACE, self._terminate, job)
        return job

    def _terminate(self, job: Job) -> None:
        if job.process is not None and job.process.is_alive():
            job.process.terminate()

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Cancel running jobs (they register nothing) and wait briefly for their processes."""
        for job in self.running():
            if job.stop is not None:
                job.stop.set()
        deadline = time.monotonic() + timeout
        for job in list(self.jobs.values()):
            if job.process is None:
                continue
            while job.process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if job.process.is_alive():
                job.process.terminate()

    # ------------------------------------------------------------ reader thread

    def _read(self, job: Job, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        final: tuple[str, str, ModelVersion | None] | None = None
        while True:
            try:
                kind, body = conn.recv()
            except (EOFError, OSError):
                break
            if kind == "progress":
                loop.call_soon_threadsafe(self._on_record, job, body)
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
        if final is None:
            code = job.process.exitcode
            final = (FAILED, f"trainer process ended without a result (exit code {code})", None)
            if job.stop is not None and job.stop.is_set():
                final = (CANCELLED, "cancelled by request (trainer terminated)", None)
        with contextlib.suppress(RuntimeError):  # the loop may be closed at shutdown
            loop.call_soon_threadsafe(self._on_end, job, *final)

    def _register(self, job: Job, body: dict[str, Any]) -> ModelVersion:
        params = {k: np.asarray(v) for k, v in body["params"].items()}
        model = CharRNN(ModelConfig(**body["config"]), Vocab(body["vocab"]), params)
        return self.registry.register(
            job.model_name, model, history=body["history"], summary=body["summary"], promote=job.promote
        )

    @staticmethod
    def _on_record(job: Job, record: dict[str, Any]) -> None:
        job.records.append(record)
        job.notify()

    @staticmethod
    def _on_end(job: Job, state: str, error: str, result: ModelVersion | None) -> None:
        job.state, job.error, job.result = state, error, result
        job.finished = time.time()
        job.notify()
