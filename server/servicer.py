"""NextCharService: the thin adapter between nextchar.v1 messages and the server's parts.

Each method reads its request, calls the session core (nextchar.server.sessions:
the manager, and SessionStream for PredictStream) or the registry / jobs, and maps
the answer to a message. The rules (limits, attach and take-over, rewind, the
reply budget) live in the session core, where every protocol shares them; errors
become gRPC statuses at one boundary (nextchar.server.grpc_errors). No model math
and no session rules here.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np
from nextchar.proto import nextchar_pb2 as pb
from nextchar.proto import nextchar_pb2_grpc as pb_grpc
from nextchar.server import messages, replies
from nextchar.server.catalog import Catalog
from nextchar.server.config import ServerConfig
from nextchar.server.errors import InvalidArgument
from nextchar.server.grpc_errors import Ctx, accepted, duplex, streaming, unary
from nextchar.server.open_calls import OpenCalls
from nextchar.server.registry import DEFAULT_NAME, ModelVersion, Registry
from nextchar.server.sessions.limits import sampling
from nextchar.server.sessions.manager import Draft, SessionManager
from nextchar.server.sessions.session import Session
from nextchar.server.sessions.stream import Rewound, SessionStream, StreamMessage
from nextchar.server.training.jobs import JobManager
from nextchar.server.training.texts import TextStore
from nextchar.server.wire import Refused

GENERATE_PIECE = 64  # characters per Generate response


def expected_offset(
    request: pb.PredictRequest | pb.PredictStreamRequest | pb.RewindSessionRequest,
) -> int | None:
    return request.expect_offset if request.HasField("expect_offset") else None


class NextCharServicer(pb_grpc.NextCharServiceServicer):
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
        self.open_calls = OpenCalls(config.max_streams)  # streams and uploads: the drain waits for them
        self.on_message: Callable[[float], None] = lambda seconds: None  # latency hook (metrics)
        self.on_refused: Callable[[str, str], None] = lambda method, code: None  # (metrics)

    # ------------------------------------------------------------ helpers

    def _info(self, session: Session) -> pb.SessionInfo:
        return messages.session_info(session, self.config.idle_timeout, self.config.session_lifetime)

    async def _model(self, ref: pb.ModelRef) -> ModelVersion:
        return await self.sessions.model(ref.name, ref.version)

    # ------------------------------------------------------------ sessions

    @unary
    async def CreateSession(self, request: pb.CreateSessionRequest, context: Ctx) -> pb.CreateSessionResponse:
        self.sessions.limits.prime(request.prime_text)
        model = await self._model(request.model)
        session = await self.sessions.create(request.session_id, model, request.prime_text)
        return pb.CreateSessionResponse(session=self._info(session), vocab=model.vocab_chars)

    @unary
    async def GetSession(self, request: pb.GetSessionRequest, context: Ctx) -> pb.GetSessionResponse:
        session = await self.sessions.get(request.session_id, fresh=True)
        return pb.GetSessionResponse(session=self._info(session))

    @unary
    async def ListSessions(self, request: pb.ListSessionsRequest, context: Ctx) -> pb.ListSessionsResponse:
        size = min(request.page_size or 100, 1000)
        try:
            start = int(request.page_token or 0)
        except ValueError:
            raise InvalidArgument("page_token: not a token from ListSessions") from None
        page, total = await self.sessions.page(start, size)
        token = str(start + size) if start + size < total else ""
        infos = [self._info(s) for s in page]
        if self.config.token:  # ids are keys: token holders see the load, not others' sessions (docs/api.md)
            for info in infos:
                info.ClearField("session_id")
        return pb.ListSessionsResponse(sessions=infos, next_page_token=token, total=total)

    @unary
    async def ResetSession(self, request: pb.ResetSessionRequest, context: Ctx) -> pb.ResetSessionResponse:
        session = await self.sessions.reset(request.session_id)
        return pb.ResetSessionResponse(session=self._info(session))

    @unary
    async def ForkSession(self, request: pb.ForkSessionRequest, context: Ctx) -> pb.ForkSessionResponse:
        twin = await self.sessions.fork(request.source_session_id, request.session_id)
        return pb.ForkSessionResponse(session=self._info(twin))

    @unary
    async def CloseSession(self, request: pb.CloseSessionRequest, context: Ctx) -> pb.CloseSessionResponse:
        return pb.CloseSessionResponse(session=self._info(await self.sessions.close(request.session_id)))

    @unary
    async def ExportSession(self, request: pb.ExportSessionRequest, context: Ctx) -> pb.ExportSessionResponse:
        session, blob = await self.sessions.export(request.session_id)
        return pb.ExportSessionResponse(blob=blob, session=self._info(session))

    @unary
    async def ImportSession(self, request: pb.ImportSessionRequest, context: Ctx) -> pb.ImportSessionResponse:
        session = await self.sessions.import_blob(request.session_id, request.blob)
        return pb.ImportSessionResponse(session=self._info(session))

    @unary
    async def RewindSession(self, request: pb.RewindSessionRequest, context: Ctx) -> pb.RewindSessionResponse:
        if not request.chars:
            raise InvalidArgument("chars: must be at least 1")
        session = await self.sessions.get(request.session_id, fresh=True)
        net = await self.catalog.network(session.model)
        k = self.sessions.limits.top_k(request.top_k, net.vocab.size)
        value = await self.sessions.rewind(session, request.chars, expected_offset(request))
        reply = pb.RewindSessionResponse(session=self._info(session), vocab=session.model.vocab_chars)
        messages.fill_next(reply.next, value.probs, k)
        return reply

    # ------------------------------------------------------------ predictions

    @unary
    async def Predict(self, request: pb.PredictRequest, context: Ctx) -> bytes:  # type: ignore[override]  # a serialized PredictResponse
        start = time.perf_counter()
        text, k, full = request.text, request.top_k, request.full_distribution
        if request.session_id:
            session = await self.sessions.get(request.session_id)
            model = session.model
            predicted = await self.sessions.predict(session, text, k, full, expected_offset(request))
        else:
            model = await self._model(request.model)
            predicted = await self.sessions.predict_once(model, text, k, full)
        self.on_message(time.perf_counter() - start)
        if predicted.held:  # the reply leaves after this returns; the budget is back when the call is over
            context.add_done_callback(lambda _: self.sessions.written(predicted))  # type: ignore[arg-type]  # stubs: a callable works
        return replies.reply(
            replies.with_vocab(replies.head(request.session_id, model), model.vocab_chars), predicted
        )

    @duplex
    async def PredictStream(self, context: Ctx) -> None:  # type: ignore[override]  # stubs: generator form only
        stream = SessionStream(self.sessions)
        head = b""  # the replies' leading fields (nextchar.server.replies.head), encoded once
        task = asyncio.current_task()
        assert task is not None
        try:
            while (raw := await context.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                self.open_calls.touch(task)
                request: pb.PredictStreamRequest = accepted(raw)
                start = time.perf_counter()
                first = stream.session is None
                answer = await stream.message(
                    StreamMessage(
                        request.text,
                        request.rewind,
                        request.top_k,
                        request.full_distribution,
                        expected_offset(request),
                        request.session_id,
                        request.model.name,
                        request.model.version,
                    )
                )
                session = stream.session
                assert session is not None
                if first:
                    head = replies.head(session.id, session.model)
                lead = replies.with_vocab(head, session.model.vocab_chars) if first else head
                if isinstance(answer, Rewound):
                    await context.write(rewound(lead, answer))
                    continue
                self.on_message(time.perf_counter() - start)
                try:
                    # returns once the transport took it: the client is reading
                    await context.write(replies.reply(lead, answer, answer.rewind_limit))
                finally:
                    self.sessions.written(answer)
        finally:
            stream.close()

    @streaming
    async def Generate(self, request: pb.GenerateRequest, context: Ctx) -> AsyncIterator[pb.GenerateResponse]:
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
            source = Draft(await self._model(request.model))
        reported_id = "" if request.fork or not request.session_id else request.session_id
        rng = np.random.default_rng(request.seed if request.HasField("seed") else None)
        ref = messages.model_ref(source.model)
        pieces = self.sessions.generate(source, request.prime_text, request.length, rng, how, GENERATE_PIECE)
        async for piece in pieces:
            yield pb.GenerateResponse(text=piece.text, offset=piece.offset, session_id=reported_id, model=ref)

    @unary
    async def Complete(self, request: pb.CompleteRequest, context: Ctx) -> pb.CompleteResponse:
        self.sessions.limits.completion(request.n, request.max_chars)
        source: Session | Draft
        if request.session_id:
            source = await self.sessions.get(request.session_id, fresh=True)
        else:
            source = Draft(await self._model(request.model))
        offset, found = await self.sessions.complete(source, request.prime_text, request.n, request.max_chars)
        reply = pb.CompleteResponse(model=messages.model_ref(source.model), offset=offset)
        for c in found:
            reply.completions.add(text=c.text, prob=c.prob, complete=c.complete)
        return reply

    # ------------------------------------------------------------ training

    @streaming
    async def Train(self, request: pb.TrainRequest, context: Ctx) -> AsyncIterator[pb.TrainResponse]:
        mc = request.model_config
        model_config: dict[str, Any] = {
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
        tc = request.train_config
        train_config = {f.name: value for f, value in tc.ListFields()}  # only the fields sent
        for name, value in train_config.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidArgument(f"train_config.{name}: must be finite, got {value}")
        if request.text and request.text_id:
            raise InvalidArgument("text, text_id: give the text inline or an uploaded text's id, not both")
        await asyncio.to_thread(self.registry.check_room, self.config.max_model_bytes)
        inline = not request.text_id
        path = (
            await asyncio.to_thread(self.texts.store, request.text)
            if inline
            else await asyncio.to_thread(self.texts.path, request.text_id)
        )
        try:
            job = await self.jobs.start(
                request.model_name or DEFAULT_NAME, path, model_config, train_config, request.promote
            )
        except BaseException:
            if inline:  # a refused job's text is nobody's
                path.unlink(missing_ok=True)
            raise
        if not inline:
            await asyncio.to_thread(self.texts.forget, request.text_id)
        async for current, record, place in self.jobs.follow(job.id):
            yield pb.TrainResponse(event=messages.job_event(current, record, place))

    @unary
    async def UploadText(
        self, request_iterator: AsyncIterator[pb.UploadTextRequest | Refused], context: Ctx
    ) -> pb.UploadTextResponse:
        async with self.open_calls.hold():
            pieces = (accepted(raw).piece async for raw in request_iterator)
            text_id, chars, size = await self.texts.receive(pieces)
        return pb.UploadTextResponse(text_id=text_id, chars=chars, bytes=size)

    @unary
    async def ListJobs(self, request: pb.ListJobsRequest, context: Ctx) -> pb.ListJobsResponse:
        jobs = await self.jobs.all()
        places = await self.jobs.places(jobs)
        return pb.ListJobsResponse(jobs=[messages.job_info(j, places.get(j.id, 0)) for j in jobs])

    @streaming
    async def WatchJob(self, request: pb.WatchJobRequest, context: Ctx) -> AsyncIterator[pb.WatchJobResponse]:
        async for job, record, place in self.jobs.follow(request.job_id):
            yield pb.WatchJobResponse(event=messages.job_event(job, record, place))

    @unary
    async def CancelJob(self, request: pb.CancelJobRequest, context: Ctx) -> pb.CancelJobResponse:
        return pb.CancelJobResponse(job=messages.job_info(await self.jobs.cancel(request.job_id)))

    @unary
    async def ResumeJob(self, request: pb.ResumeJobRequest, context: Ctx) -> pb.ResumeJobResponse:
        job = await self.jobs.resume(request.job_id)
        return pb.ResumeJobResponse(job=messages.job_info(job, await self.jobs.place_of(job)))

    # ------------------------------------------------------------ models

    @unary
    async def ListModels(self, request: pb.ListModelsRequest, context: Ctx) -> pb.ListModelsResponse:
        await asyncio.to_thread(functools.partial(self.registry.refresh, force=True))
        default = self.registry.default
        return pb.ListModelsResponse(
            models=[messages.model_info(mv, default) for mv in self.registry.versions()],
            default_model=messages.model_ref(default),
        )

    @unary
    async def DescribeModel(self, request: pb.DescribeModelRequest, context: Ctx) -> pb.DescribeModelResponse:
        mv = await self.catalog.resolve(request.model.name, request.model.version, need_available=False)
        config = mv.config
        return pb.DescribeModelResponse(
            info=messages.model_info(mv, self.registry.default),
            vocab=mv.vocab_chars,
            config_json=json.dumps(config.to_dict()) if config is not None else "",
            summary_json=json.dumps(mv.summary, default=str),
            meta_json=json.dumps({k: v for k, v in mv.meta.items() if k != "history"}, default=str),
        )

    @unary
    async def GetModelHistory(
        self, request: pb.GetModelHistoryRequest, context: Ctx
    ) -> pb.GetModelHistoryResponse:
        mv = await self.catalog.resolve(request.model.name, request.model.version)
        return pb.GetModelHistoryResponse(
            model=messages.model_ref(mv), records=[messages.progress(r) for r in mv.history]
        )

    @unary
    async def SetDefaultModel(
        self, request: pb.SetDefaultModelRequest, context: Ctx
    ) -> pb.SetDefaultModelResponse:
        mv, previous = await asyncio.to_thread(
            self.registry.set_default, request.model.name, request.model.version
        )
        return pb.SetDefaultModelResponse(
            default_model=messages.model_ref(mv), previous=messages.model_ref(previous)
        )

    @unary
    async def DeleteModel(self, request: pb.DeleteModelRequest, context: Ctx) -> pb.DeleteModelResponse:
        if not request.model.name:
            raise InvalidArgument("model.name: give the model to delete")
        mv = await asyncio.to_thread(self.registry.delete, request.model.name, request.model.version)
        await self.sessions.evict_model(mv)
        return pb.DeleteModelResponse(model=messages.model_ref(mv))


def rewound(lead: bytes, answer: Rewound) -> pb.PredictStreamResponse:
    """The reply to a message that only rewound: no predictions, the next characters where it is."""
    reply = pb.PredictStreamResponse.FromString(lead)
    reply.predictions.start_offset, reply.predictions.top_k = answer.offset, answer.k
    messages.fill_next(reply.next, answer.probs, answer.k)
    reply.rewind_limit = answer.rewind_limit
    return reply
