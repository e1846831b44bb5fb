"""NextCharClient: every capability of the nextchar service as one method call.

    from nextchar.client import NextCharClient

    with NextCharClient("127.0.0.1:50051") as c:
        with c.session(prime="hello wor") as s:
            print(s.feed("ld").next_chars)
        print(c.generate(prime="hello", length=40))  # "hello" and what follows; .text: what follows

Every call has a timeout (``timeout``, seconds) and raises a NextCharError
(nextchar.client.errors) on failure. Streams (predictions, generation, training
progress) have no overall deadline: keepalive pings find a dead server instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType

from nextchar.client.channel import Connection, Tls
from nextchar.client.defaults import DEFAULT_TARGET, DEFAULT_TIMEOUT
from nextchar.client.errors import JobNotFound, TrainingFailed
from nextchar.client.results import (
    Completion,
    Generation,
    Job,
    ModelDetails,
    ModelInfo,
    ModelLike,
    ModelRef,
    Predictions,
    Progress,
    SessionInfo,
    model_ref,
)
from nextchar.client.session import Session, completions, sample
from nextchar.client.texts import TextFiles
from nextchar.client.training import INLINE_TEXT_BYTES, TrainingRun, train_request, upload_pieces
from nextchar.core.config import ModelConfig, TrainConfig, check_length
from nextchar.proto import nextchar_pb2 as pb

UPLOAD_TIMEOUT = 600.0  # seconds an upload of a training text may take (100 MB on a slow link)


class NextCharClient:
    """A connection to one nextchar server, or to several balanced round-robin."""

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        resume_attempts: int = 5,
        token: str = "",
        tls: Tls | None = None,
    ) -> None:
        """token: the server's bearer token, sent on every call; tls: a TLS channel (Tls.from_files)."""
        self._conn = Connection(target, timeout, token, tls)
        self.resume_attempts = resume_attempts

    @property
    def target(self) -> str:
        return self._conn.target

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> NextCharClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------ health

    def health(self, service: str = "") -> str:
        """The grpc.health.v1 status: "SERVING", "NOT_SERVING" (draining), ..."""
        from grpc_health.v1 import health_pb2

        resp = self._conn.call(self._conn.health.Check, health_pb2.HealthCheckRequest(service=service))
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    # ------------------------------------------------------------ sessions

    def _session(self, info: pb.SessionInfo, vocab: str = "") -> Session:
        return Session(self._conn, SessionInfo.from_pb(info), vocab, resume_attempts=self.resume_attempts)

    def session(
        self, model: ModelLike = None, *, session_id: str = "", prime: str = "", adapt: bool | None = None
    ) -> Session:
        """Create a session on model (default model when None), optionally with its id and a priming
        text. adapt: the session learns its writer (its own weights, stepped from its text; None:
        the server's default, ``serve --adapt``)."""
        request = pb.CreateSessionRequest(
            session_id=session_id, model=model_ref(model).to_pb(), prime_text=prime, adapt=adapt
        )
        resp = self._conn.call(self._conn.stub.CreateSession, request)
        return self._session(resp.session, resp.vocab)

    def attach(self, session_id: str) -> Session:
        """A live session by id (for example after this process restarted)."""
        resp = self._conn.call(self._conn.stub.GetSession, pb.GetSessionRequest(session_id=session_id))
        return self._session(resp.session)

    def import_session(self, blob: bytes, *, session_id: str = "") -> Session:
        """A new session from a blob made by ``Session.export`` (on this or another server)."""
        request = pb.ImportSessionRequest(blob=blob, session_id=session_id)
        resp = self._conn.call(self._conn.stub.ImportSession, request)
        return self._session(resp.session)

    def sessions(self) -> list[SessionInfo]:
        """Every live session, oldest first."""
        out: list[SessionInfo] = []
        token = ""
        while True:
            request = pb.ListSessionsRequest(page_size=1000, page_token=token)
            resp = self._conn.call(self._conn.stub.ListSessions, request)
            out.extend(SessionInfo.from_pb(s) for s in resp.sessions)
            token = resp.next_page_token
            if not token:
                return out

    # ------------------------------------------------------------ predictions and generation

    def predict(
        self, text: str, model: ModelLike = None, *, top_k: int = 3, adapt: bool | None = None
    ) -> Predictions:
        """Predictions for text from a fresh state of model; the server keeps nothing. adapt:
        adapting to the text as it goes, as an adaptive session would (None: the server's default)."""
        request = pb.PredictRequest(model=model_ref(model).to_pb(), text=text, top_k=top_k, adapt=adapt)
        resp = self._conn.call(self._conn.stub.Predict, request)
        return Predictions(resp.predictions, resp.vocab, text)

    def complete(
        self, prime: str = "", model: ModelLike = None, *, n: int = 3, max_chars: int = 12
    ) -> list[Completion]:
        """The n likeliest continuations of prime (from a fresh state of model), each up to a
        word boundary or max_chars, most probable first."""
        request = pb.CompleteRequest(
            model=model_ref(model).to_pb(), prime_text=prime, n=n, max_chars=max_chars
        )
        return completions(self._conn.call(self._conn.stub.Complete, request))

    def generate(
        self,
        prime: str = "",
        model: ModelLike = None,
        *,
        length: int = 200,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        on_piece: Callable[[str], None] | None = None,
    ) -> Generation:
        """Sample length characters after prime from a fresh state of model.

        on_piece sees the text piece by piece as the server sends it (to print it live).
        """
        request = pb.GenerateRequest(model=model_ref(model).to_pb())
        return sample(self._conn, request, prime, length, temperature, top_k, top_p, seed, on_piece)

    # ------------------------------------------------------------ training

    def start_training(
        self,
        text_or_files: str | os.PathLike[str] | Sequence[os.PathLike[str]],
        *,
        name: str = "",
        model_config: ModelConfig | None = None,
        train_config: TrainConfig | None = None,
        promote: bool = False,
    ) -> TrainingRun:
        """Start a training job; returns once the server named it (its first event: the job is
        queued or running, or the request was refused and this raises); iterate the run for
        the rest of its events.

        A ``str`` is the training text itself; a path (any PathLike), or a list of them
        concatenated in order, names UTF-8 files. Files are never held whole: one over
        1 MiB is checked first (UTF-8, enough characters: a ValueError names what is
        wrong before anything is sent), then read again as it is uploaded in pieces.
        """
        parts: Iterable[str]
        if isinstance(text_or_files, str):
            text = text_or_files  # more characters than the limit has more bytes: no need to encode
            big = len(text) > INLINE_TEXT_BYTES or len(text.encode()) > INLINE_TEXT_BYTES
            chars, parts = len(text), [text]
        else:
            files = TextFiles.of(text_or_files)
            big = files.size() > INLINE_TEXT_BYTES
            text = "" if big else files.read()
            chars, parts = files.count() if big else len(text), files.pieces()
        job = (name, model_config, train_config, promote)
        if big:  # a corpus of any size, in small messages, checked before anything is sent
            check_length(chars, train_config or TrainConfig())
            pieces = upload_pieces(parts)
            text_id = self._conn.call(self._conn.stub.UploadText, pieces, timeout=UPLOAD_TIMEOUT).text_id
            request = train_request(*job, chars=chars, text_id=text_id)
        else:
            request = train_request(*job, chars=chars, text=text)
        call = self._conn.stream(self._conn.stub.Train, request)
        # the first event read here: a Ctrl-C after start_training returned always knows the job
        return TrainingRun((r.event for r in call), call.cancel, self.cancel_job).started()

    def train(
        self,
        text_or_files: str | os.PathLike[str] | Sequence[os.PathLike[str]],
        *,
        name: str = "",
        model_config: ModelConfig | None = None,
        train_config: TrainConfig | None = None,
        promote: bool = False,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> ModelInfo:
        """Train a model on the server and return the version it registered.

        Raises TrainingFailed when the job fails, diverges or is cancelled.
        """
        run = self.start_training(
            text_or_files, name=name, model_config=model_config, train_config=train_config, promote=promote
        )
        job = run.wait(on_progress)
        if job.state != "succeeded" or job.result is None:
            raise TrainingFailed(
                f"training job {job.job_id} {job.state}: {job.error or 'no reason given'}", job=job
            )
        return self.model(job.result).info

    def watch_job(self, job_id: str) -> TrainingRun:
        """Follow a job again: its recorded events, then live ones."""
        call = self._conn.stream(self._conn.stub.WatchJob, pb.WatchJobRequest(job_id=job_id))
        return TrainingRun((r.event for r in call), call.cancel, self.cancel_job)

    def cancel_job(self, job_id: str) -> Job:
        resp = self._conn.call(self._conn.stub.CancelJob, pb.CancelJobRequest(job_id=job_id))
        return Job.from_pb(resp.job)

    def resume_job(self, job_id: str) -> Job:
        """Queue a failed job again; it goes on from its last checkpoint."""
        resp = self._conn.call(self._conn.stub.ResumeJob, pb.ResumeJobRequest(job_id=job_id))
        return Job.from_pb(resp.job)

    def job(self, job_id: str) -> Job:
        """One job, as ListJobs sees it; JobNotFound when there is none."""
        for job in self.jobs():
            if job.job_id == job_id:
                return job
        raise JobNotFound(f"job {job_id!r}: no such job", code="NOT_FOUND")

    def jobs(self) -> list[Job]:
        resp = self._conn.call(self._conn.stub.ListJobs, pb.ListJobsRequest())
        return [Job.from_pb(j) for j in resp.jobs]

    # ------------------------------------------------------------ models

    def models(self) -> list[ModelInfo]:
        """Every model version in the registry, available or not, by name then version."""
        resp = self._conn.call(self._conn.stub.ListModels, pb.ListModelsRequest())
        return [ModelInfo.from_pb(m) for m in resp.models]

    def model(self, model: ModelLike = None) -> ModelDetails:
        """Config, vocabulary and metrics of one version (default model, newest version when omitted)."""
        request = pb.DescribeModelRequest(model=model_ref(model).to_pb())
        return ModelDetails.from_pb(self._conn.call(self._conn.stub.DescribeModel, request))

    def loss_history(self, model: ModelLike = None, version: int = 0) -> list[Progress]:
        """The training progress records of a version, for nextchar.core.history.export_history."""
        ref = model_ref(model)
        request = pb.GetModelHistoryRequest(model=ModelRef(ref.name, version or ref.version).to_pb())
        resp = self._conn.call(self._conn.stub.GetModelHistory, request)
        return [Progress.from_pb(r) for r in resp.records]

    def promote(self, model: ModelLike) -> tuple[ModelRef, ModelRef | None]:
        """Make a version the default for new sessions; returns (new default, previous default)."""
        request = pb.SetDefaultModelRequest(model=model_ref(model).to_pb())
        resp = self._conn.call(self._conn.stub.SetDefaultModel, request)
        previous = ModelRef.from_pb(resp.previous) if resp.previous.name else None
        return ModelRef.from_pb(resp.default_model), previous

    def delete_model(self, model: ModelLike) -> ModelRef:
        """Delete one version (give the version); the default cannot be deleted."""
        request = pb.DeleteModelRequest(model=model_ref(model).to_pb())
        return ModelRef.from_pb(self._conn.call(self._conn.stub.DeleteModel, request).model)
