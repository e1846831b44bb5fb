"""Service: the nextchar.v1 operations on messages, for every protocol.

Each method reads its request message, calls the session core (nextchar.server.sessions),
the catalog, the registry or the jobs, and maps the answer to the response message. It
knows no transport: the gRPC servicer calls it as it is (nextchar.server.servicer), the
HTTP API with the messages in their JSON form (nextchar.server.http). The two
hot paths, Predict and PredictStream, are written by each protocol itself (gRPC
writes their replies as bytes); their rules are the session core's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Callable

import numpy as np
from nextchar.proto import nextchar_pb2 as pb
from nextchar.server import messages
from nextchar.server.catalog import Catalog
from nextchar.server.config import ServerConfig
from nextchar.server.errors import InvalidArgument, ServiceError
from nextchar.server.registry import DEFAULT_NAME, ModelVersion, Registry
from nextchar.server.sessions.limits import sampling
from nextchar.server.sessions.manager import Draft, SessionManager
from nextchar.server.sessions.session import Session
from nextchar.server.training.jobs import FORSAKEN, JobManager, parse_configs
from nextchar.server.training.texts import TextStore

GENERATE_PIECE = 64  # characters per Generate response
# the largest ListSessions page token (an offset): far past any listing, and start + page size
# stays inside Redis's 64-bit integers (past them, ZRANGE failed and the call said "retry")
MAX_PAGE_TOKEN = 1 << 53


def expected_offset(
    request: pb.PredictRequest | pb.PredictStreamRequest | pb.RewindSessionRequest,
) -> int | None:
    return request.expect_offset if request.HasField("expect_offset") else None


def adapt_choice(
    request: pb.CreateSessionRequest | pb.PredictRequest | pb.PredictStreamRequest,
) -> bool | None:
    """Whether the request asks for an adaptive session; None: the server's default."""
    return request.adapt if request.HasField("adapt") else None


class Service:
    def __init__(
        self,
        config: ServerConfig,
        registry: Registry,
        sessions: SessionManager,
        jobs: JobManager,
        texts: TextStore,
    ) -> None:
        self.config = config
        self.registry = registry
        self.catalog: Catalog = sessions.catalog
        self.sessions = sessions
        self.jobs = jobs
        self.texts = texts

    def info(self, session: Session) -> pb.SessionInfo:
        return messages.session_info(session, self.config.idle_timeout, self.config.session_lifetime)

    async def model(self, ref: pb.ModelRef) -> ModelVersion:
        return await self.sessions.model(ref.name, ref.version)

    async def CreateSession(self, request: pb.CreateSessionRequest) -> pb.CreateSessionResponse:
        self.sessions.limits.prime(request.prime_text)
        model = await self.model(request.model)
        session = await self.sessions.create(
            request.session_id, model, request.prime_text, adapt_choice(request)
        )
        return pb.CreateSessionResponse(session=self.info(session), vocab=model.vocab_chars)

    async def GetSession(self, request: pb.GetSessionRequest) -> pb.GetSessionResponse:
        session = await self.sessions.get(request.session_id, fresh=True)
        return pb.GetSessionResponse(session=self.info(session))

    async def ListSessions(self, request: pb.ListSessionsRequest) -> pb.ListSessionsResponse:
        size = min(request.page_size or 100, 1000)
        try:
            start = int(request.page_token or 0)
            if not 0 <= start <= MAX_PAGE_TOKEN:
                raise ValueError
        except ValueError:
            raise InvalidArgument("page_token: not a token from ListSessions") from None
        page, total = await self.sessions.page(start, size)
        token = str(start + size) if start + size < total else ""
        infos = [self.info(s) for s in page]
        if self.config.token:  # ids are keys: token holders see the load, not others' sessions (docs/api.md)
            for info in infos:
                info.ClearField("session_id")
        return pb.ListSessionsResponse(sessions=infos, next_page_token=token, total=total)

    async def ResetSession(self, request: pb.ResetSessionRequest) -> pb.ResetSessionResponse:
        session = await self.sessions.reset(request.session_id)
        return pb.ResetSessionResponse(session=self.info(session))

    async def ForkSession(self, request: pb.ForkSessionRequest) -> pb.ForkSessionResponse:
        twin = await self.sessions.fork(request.source_session_id, request.session_id)
        return pb.ForkSessionResponse(session=self.info(twin))

    async def CloseSession(self, request: pb.CloseSessionRequest) -> pb.CloseSessionResponse:
        return pb.CloseSessionResponse(session=self.info(await self.sessions.close(request.session_id)))

    async def ExportSession(self, request: pb.ExportSessionRequest) -> pb.ExportSessionResponse:
        session, blob = await self.sessions.export(request.session_id)
        return pb.ExportSessionResponse(blob=blob, session=self.info(session))

    async def ImportSession(self, request: pb.ImportSessionRequest) -> pb.ImportSessionResponse:
        session = await self.sessions.import_blob(request.session_id, request.blob)
        return pb.ImportSessionResponse(session=self.info(session))

    async def RewindSession(self, request: pb.RewindSessionRequest) -> pb.RewindSessionResponse:
        if not request.chars:
            raise InvalidArgument("chars: must be at least 1")
        session = await self.sessions.get(request.session_id, fresh=True)
        net = await self.catalog.network(session.model)
        k = self.sessions.limits.top_k(request.top_k, net.vocab.size)
        value = await self.sessions.rewind(session, request.chars, expected_offset(request))
        reply = pb.RewindSessionResponse(session=self.info(session), vocab=session.model.vocab_chars)
        messages.fill_next(reply.next, value.probs, k)
        return reply

    # ------------------------------------------------------------ predictions

    async def Generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        how = sampling(
            request.temperature if request.HasField("temperature") else 1.0,
            request.top_k,
            request.top_p if request.HasField("top_p") else 1.0,
        )
        source: Session | Draft
        if request.session_id:
            # fresh: a generation cannot be re-run after a lost race (its random draws are spent),
            # so start from the shared copy; a race lost anyway answers ABORTED (StaleSession)
            session = await self.sessions.get(request.session_id, fresh=True)
            source = Draft(session.model, session.value) if request.fork else session
        else:
            source = Draft(await self.model(request.model))
        reported_id = "" if request.fork or not request.session_id else request.session_id
        rng = np.random.default_rng(request.seed if request.HasField("seed") else None)
        ref = messages.model_ref(source.model)
        pieces = self.sessions.generate(source, request.prime_text, request.length, rng, how, GENERATE_PIECE)
        async for piece in pieces:
            yield pb.GenerateResponse(text=piece.text, offset=piece.offset, session_id=reported_id, model=ref)

    async def Complete(self, request: pb.CompleteRequest) -> pb.CompleteResponse:
        self.sessions.limits.completion(request.n, request.max_chars)
        source: Session | Draft
        if request.session_id:
            source = await self.sessions.get(request.session_id, fresh=True)
        else:
            source = Draft(await self.model(request.model))
        offset, found = await self.sessions.complete(source, request.prime_text, request.n, request.max_chars)
        reply = pb.CompleteResponse(model=messages.model_ref(source.model), offset=offset)
        for c in found:
            reply.completions.add(text=c.text, prob=c.prob, complete=c.complete)
        return reply

    # ------------------------------------------------------------ training

    async def Train(
        self, request: pb.TrainRequest, expired: Callable[[], bool] = lambda: False
    ) -> AsyncIterator[pb.TrainResponse]:
        """expired: whether the caller's deadline has passed (it was told DEADLINE_EXCEEDED): a job
        whose first event nobody can be told of is cancelled, never left queued."""
        mc = request.model_config
        model_fields = {
            k: v
            for k, v in {
                "cell": mc.cell,
                "hidden": mc.hidden,
                "layers": mc.layers,
                "loss": mc.loss,
                "dtype": mc.dtype,
            }.items()
            if v
        }
        train_fields = {f.name: value for f, value in request.train_config.ListFields()}  # only those sent
        model_config, train_config = parse_configs(model_fields, train_fields)
        if request.text and request.text_id:
            raise InvalidArgument("text, text_id: give the text inline or an uploaded text's id, not both")
        await asyncio.to_thread(self.registry.check_room, self.config.max_model_bytes)
        inline = not request.text_id
        path = (
            await self.texts.keep(request.text)
            if inline
            else await asyncio.to_thread(self.texts.path, request.text_id)
        )
        try:
            job = await self.jobs.start(
                request.model_name or DEFAULT_NAME, path, model_config, train_config, request.promote
            )
        except BaseException:
            if inline:  # a refused job's text is nobody's (an upload stays, for a retry)
                await self.texts.release(path)
            raise
        told = False
        try:  # from here a cancel (the caller's deadline) cancels the job, whatever it meets
            await self.texts.release(path)  # the job took the file: it counts no longer
            if not inline:
                await asyncio.to_thread(self.texts.forget, request.text_id)
            async for current, record, place in self.jobs.follow(job.id):
                if not told and expired():
                    return  # the caller was told DEADLINE_EXCEEDED, never the job
                told = True  # handed to the caller: one that goes away from here on knew the job
                yield pb.TrainResponse(event=messages.job_event(current, record, place))
        finally:
            if not told:  # a job nobody was told of is nobody's
                with contextlib.suppress(ServiceError):
                    await self.jobs.cancel(job.id, FORSAKEN)

    async def ListJobs(self, request: pb.ListJobsRequest) -> pb.ListJobsResponse:
        jobs = await self.jobs.all()
        places = await self.jobs.places()
        return pb.ListJobsResponse(jobs=[messages.job_info(j, places.get(j.id, 0)) for j in jobs])

    async def WatchJob(self, request: pb.WatchJobRequest) -> AsyncIterator[pb.WatchJobResponse]:
        async for job, record, place in self.jobs.follow(request.job_id):
            yield pb.WatchJobResponse(event=messages.job_event(job, record, place))

    async def CancelJob(self, request: pb.CancelJobRequest) -> pb.CancelJobResponse:
        return pb.CancelJobResponse(job=messages.job_info(await self.jobs.cancel(request.job_id)))

    async def ResumeJob(self, request: pb.ResumeJobRequest) -> pb.ResumeJobResponse:
        job = await self.jobs.resume(request.job_id)
        return pb.ResumeJobResponse(job=messages.job_info(job, await self.jobs.place_of(job)))

    # ------------------------------------------------------------ models

    async def ListModels(self, request: pb.ListModelsRequest) -> pb.ListModelsResponse:
        await asyncio.to_thread(functools.partial(self.registry.refresh, force=True))
        default = self.registry.default
        return pb.ListModelsResponse(
            models=[messages.model_info(mv, default) for mv in self.registry.versions()],
            default_model=messages.model_ref(default),
        )

    async def DescribeModel(self, request: pb.DescribeModelRequest) -> pb.DescribeModelResponse:
        mv = await self.catalog.resolve(request.model.name, request.model.version, need_available=False)
        config = mv.config
        return pb.DescribeModelResponse(
            info=messages.model_info(mv, self.registry.default),
            vocab=mv.vocab_chars,
            config_json=json.dumps(config.to_dict()) if config is not None else "",
            summary_json=json.dumps(mv.summary, default=str),
            meta_json=json.dumps({k: v for k, v in mv.meta.items() if k != "history"}, default=str),
        )

    async def GetModelHistory(self, request: pb.GetModelHistoryRequest) -> pb.GetModelHistoryResponse:
        mv = await self.catalog.resolve(request.model.name, request.model.version)
        return pb.GetModelHistoryResponse(
            model=messages.model_ref(mv), records=[messages.progress(r) for r in mv.history]
        )

    async def SetDefaultModel(self, request: pb.SetDefaultModelRequest) -> pb.SetDefaultModelResponse:
        mv, previous = await asyncio.to_thread(
            self.registry.set_default, request.model.name, request.model.version
        )
        return pb.SetDefaultModelResponse(
            default_model=messages.model_ref(mv), previous=messages.model_ref(previous)
        )

    async def DeleteModel(self, request: pb.DeleteModelRequest) -> pb.DeleteModelResponse:
        if not request.model.name:
            raise InvalidArgument("model.name: give the model to delete")
        mv = await asyncio.to_thread(self.registry.delete, request.model.name, request.model.version)
        await self.sessions.evict_model(mv)
        return pb.DeleteModelResponse(model=messages.model_ref(mv))
