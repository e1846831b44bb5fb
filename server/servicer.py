"""NextCharService: the thin adapter between nextchar.v1 messages and the server's parts.

Each method validates its request, calls the session manager / registry / jobs,
and maps the answer to a message. Every ServiceError becomes ``context.abort(code,
message, details)`` in one place (``refuse``, under the decorators below), which is
the status-code table of docs/api.md. No model math and no session rules here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc._cython.cygrpc import ExecuteBatchError  # what a call whose client is gone raises
from nextchar.core.completion import MAX_COMPLETION_CHARS, MAX_CONTINUATIONS
from nextchar.core.config import Sampling
from nextchar.proto import nextchar_pb2 as pb
from nextchar.proto import nextchar_pb2_grpc as pb_grpc
from nextchar.server import messages, replies
from nextchar.server.batching.work import ChunkResult
from nextchar.server.budget import ReplyBudget, reply_bytes
from nextchar.server.config import ServerConfig
from nextchar.server.errors import (
    METADATA_PREFIX,
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    ServiceError,
    shown,
)
from nextchar.server.logs import CALLS_LOGGER
from nextchar.server.open_calls import OpenCalls
from nextchar.server.registry import DEFAULT_NAME, ModelVersion, Registry
from nextchar.server.sessions.manager import Attachment, SessionManager
from nextchar.server.sessions.session import Session
from nextchar.server.sessions.snapshot import SnapshotMismatch, decode_state, encode_array, same_model
from nextchar.server.training.jobs import FORSAKEN, JobManager, parse_configs
from nextchar.server.training.texts import TextStore
from nextchar.server.wire import Refused

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Ctx = grpc.aio.ServicerContext[Any, Any]
SNAPSHOT_FORMAT = 1
MAX_OFFSET = 2**63 - 1  # an imported offset leaves room for ~9e18 more characters
DEFAULT_TOP_K = 3
GENERATE_PIECE = 64  # characters per Generate response
DEFAULT_CONTINUATIONS, DEFAULT_COMPLETION_CHARS = 3, 12  # what Complete's 0s mean
log = logging.getLogger("nextchar.server")
calls_log = logging.getLogger(CALLS_LOGGER)  # behind the flood gate (nextchar.server.logs)


def accepted(request: Req | Refused) -> Req:
    """The request, or the refusal its bytes earned at the decoding boundary (nextchar.server.wire)."""
    if isinstance(request, Refused):
        raise request.error
    return request


def unary(
    fn: Callable[[NextCharServicer, Req, Ctx], Awaitable[Resp]],
) -> Callable[[NextCharServicer, Req | Refused, Ctx], Awaitable[Resp]]:
    @functools.wraps(fn)
    async def wrapper(self: NextCharServicer, request: Req | Refused, context: Ctx) -> Resp:
        try:
            return await fn(self, accepted(request), context)
        except ServiceError as exc:
            await refuse(self, fn.__name__, exc, context)
        except Exception as exc:
            await fail(fn.__name__, exc, context)
        raise AssertionError("unreachable: abort raises")

    return wrapper


def streaming(
    fn: Callable[[NextCharServicer, Req, Ctx], AsyncIterator[Resp]],
) -> Callable[[NextCharServicer, Req | Refused, Ctx], AsyncIterator[Resp]]:
    @functools.wraps(fn)
    async def wrapper(self: NextCharServicer, request: Req | Refused, context: Ctx) -> AsyncIterator[Resp]:
        try:
            async with self.open_calls.hold():
                async for item in fn(self, accepted(request), context):
                    yield item
        except ServiceError as exc:
            await refuse(self, fn.__name__, exc, context)
        except Exception as exc:
            await fail(fn.__name__, exc, context)

    return wrapper


def duplex(
    fn: Callable[[NextCharServicer, Ctx], Awaitable[None]],
) -> Callable[[NextCharServicer, Any, Ctx], Awaitable[None]]:
    """A bidirectional stream written with context.read() / context.write(): unlike an
    async generator under ``streaming``, no wrapper generator relays each message
    (~5% more one-character messages per second). The method reads its requests
    through ``accepted``, so a malformed one mid-stream is refused like a first one."""

    @functools.wraps(fn)
    async def wrapper(self: NextCharServicer, request_iterator: Any, context: Ctx) -> None:
        try:
            async with self.open_calls.hold():
                await fn(self, context)
        except ServiceError as exc:
            await refuse(self, fn.__name__, exc, context)
        except Exception as exc:
            await fail(fn.__name__, exc, context)

    return wrapper


async def refuse(servicer: NextCharServicer, method: str, exc: ServiceError, context: Ctx) -> None:
    """Answer a refused call with its status code and message (raises AbortError); counted every
    time, logged as the flood gate lets it."""
    servicer.on_refused(method, exc.code.name)
    calls_log.info("%s refused: %s: %s", method, exc.code.name, exc)
    await context.abort(exc.code, str(exc), trailing_metadata=exc.trailing_metadata())


async def fail(method: str, exc: Exception, context: Ctx) -> None:
    """Answer a call that broke on a bug with INTERNAL and an error id the log line carries
    (raises AbortError). An AbortError from inside the call is passed on as it is, and a
    call whose client is gone ends quietly."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if isinstance(exc, ExecuteBatchError) or context.done():
        # a read or write on a call whose client went away: nobody to answer, and no bug
        # (gRPC itself passes this error over quietly)
        calls_log.debug("%s ended: the client went away (%s)", method, type(exc).__name__)
        return
    error_id = secrets.token_hex(6)
    calls_log.error("%s failed: internal error %s", method, error_id, exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error {error_id}: the server's log has the details under this id",
        trailing_metadata=((METADATA_PREFIX + "error-id", error_id),),
    )


@dataclass(slots=True)
class Stream:
    """A PredictStream's own state between its messages."""

    session: Session
    attachment: Attachment
    head: bytes  # its replies' leading fields (nextchar.server.replies.head), encoded once


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
        self.sessions = sessions
        self.jobs = jobs
        self.texts = texts
        self.budget = ReplyBudget(config.max_reply_bytes)
        self.open_calls = OpenCalls(config.max_streams)  # streams and uploads: the drain waits for them
        self.on_message: Callable[[float], None] = lambda seconds: None  # latency hook (metrics)
        self.on_refused: Callable[[str, str], None] = lambda method, code: None  # (metrics)

    # ------------------------------------------------------------ helpers

    def _info(self, session: Session) -> pb.SessionInfo:
        return messages.session_info(session, self.config.idle_timeout, self.config.session_lifetime)

    def _model(self, ref: pb.ModelRef) -> ModelVersion:
        return self.registry.resolve(ref.name, ref.version)

    def _check_text(self, text: str, field: str = "text") -> None:
        if not text:
            raise InvalidArgument(f"{field}: empty; send at least one character")
        if len(text) > self.config.max_chunk_chars:
            raise InvalidArgument(
                f"{field}: {len(text)} characters exceed max_chunk_chars ({self.config.max_chunk_chars}); "
                "split it into chunks"
            )

    def _top_k(self, top_k: int, vocab_size: int) -> int:
        """The k a prediction or a generation may use: at most the vocabulary and max_top_k."""
        k = top_k or DEFAULT_TOP_K
        allowed = min(vocab_size, self.config.max_top_k)
        if k > allowed:
            raise InvalidArgument(f"top_k: {k} is more than the {allowed} allowed")
        return k

    def _check_prime(self, prime_text: str) -> None:
        if len(prime_text) > self.config.max_prime_chars:
            raise InvalidArgument(
                f"prime_text: {len(prime_text)} characters exceed max_prime_chars ({self.config.max_prime_chars})"
            )

    async def _predict(
        self, session: Session, text: str, top_k: int, full: bool, expect_offset: int | None
    ) -> tuple[ChunkResult, int]:
        """Advance session through text: (the chunk's result, the reply budget it holds; the
        caller releases it once the reply is written)."""
        start = time.perf_counter()
        self._check_text(text)
        vocab_size = session.model.require().vocab.size
        k = self._top_k(top_k, vocab_size)
        held = self.budget.reserve(reply_bytes(len(text), k, vocab_size, full))
        try:
            result = await self.sessions.predict(session, text, k, full, expect_offset)
        except BaseException:
            self.budget.release(held)
            raise
        self.on_message(time.perf_counter() - start)
        return result, held

    # ------------------------------------------------------------ sessions

    @unary
    async def CreateSession(self, request: pb.CreateSessionRequest, context: Ctx) -> pb.CreateSessionResponse:
        self._check_prime(request.prime_text)
        session = await self.sessions.create(
            request.session_id, self._model(request.model), request.prime_text
        )
        return pb.CreateSessionResponse(
            session=self._info(session), vocab=session.model.require().vocab.chars
        )

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
        source = await self.sessions.get(request.source_session_id, fresh=True)
        twin = source.copy(self.sessions.admit(request.session_id))
        return pb.ForkSessionResponse(session=self._info(await self.sessions.add(twin)))

    @unary
    async def CloseSession(self, request: pb.CloseSessionRequest, context: Ctx) -> pb.CloseSessionResponse:
        return pb.CloseSessionResponse(session=self._info(await self.sessions.close(request.session_id)))

    @unary
    async def ExportSession(self, request: pb.ExportSessionRequest, context: Ctx) -> pb.ExportSessionResponse:
        session = await self.sessions.get(request.session_id, fresh=True)
        snapshot = pb.SessionSnapshot(
            format_version=SNAPSHOT_FORMAT,
            model=messages.model_ref(session.model),
            model_checksum=session.model.checksum,
            offset=session.offset,
            dtype=str(session.state.dtype),
            state=encode_array(session.state),
            probs=encode_array(session.probs),
            session_id=session.id,
        )
        return pb.ExportSessionResponse(blob=snapshot.SerializeToString(), session=self._info(session))

    @unary
    async def ImportSession(self, request: pb.ImportSessionRequest, context: Ctx) -> pb.ImportSessionResponse:
        snapshot = pb.SessionSnapshot()
        try:
            snapshot.ParseFromString(request.blob)
        except Exception:  # any parse failure is the client's blob
            raise InvalidArgument("blob: not a SessionSnapshot from ExportSession") from None
        if snapshot.format_version != SNAPSHOT_FORMAT:
            raise InvalidArgument(
                f"blob: format version {snapshot.format_version} is not supported (this server reads 1)"
            )
        if not snapshot.model.name or not snapshot.model.version:
            raise InvalidArgument("blob: names no model version")
        mv = self.registry.resolve(snapshot.model.name, snapshot.model.version)
        if not same_model(mv, snapshot.model_checksum):
            raise FailedPrecondition(
                f"blob: model {mv.name} v{mv.version} on this server differs from the one the state came from"
            )
        net = mv.require()
        try:
            state, _ = decode_state(net, snapshot.dtype, snapshot.state, snapshot.probs)
        except SnapshotMismatch as exc:
            raise InvalidArgument(f"blob: {exc}") from None
        # the prediction is the state's, computed here: a blob's own copy could say anything
        probs = net.predict_from(state[None, :])[0]
        if snapshot.offset > MAX_OFFSET:  # else the next chunk overflows uint64 offsets in every reply
            raise InvalidArgument(f"blob: offset {snapshot.offset} is above {MAX_OFFSET}")
        session = self.sessions.imported(request.session_id, mv, state, probs)
        session.offset = snapshot.offset
        return pb.ImportSessionResponse(session=self._info(await self.sessions.add(session)))

    @unary
    async def RewindSession(self, request: pb.RewindSessionRequest, context: Ctx) -> pb.RewindSessionResponse:
        if not request.chars:
            raise InvalidArgument("chars: must be at least 1")
        session = await self.sessions.get(request.session_id, fresh=True)
        k = self._top_k(request.top_k, session.model.require().vocab.size)
        expect = request.expect_offset if request.HasField("expect_offset") else None
        await self.sessions.rewind(session, request.chars, expect)
        reply = pb.RewindSessionResponse(
            session=self._info(session), vocab=session.model.require().vocab.chars
        )
        messages.fill_next(reply.next, session.probs, k)
        return reply

    # ------------------------------------------------------------ predictions

    @unary
    async def Predict(self, request: pb.PredictRequest, context: Ctx) -> bytes:  # type: ignore[override]  # a serialized PredictResponse
        if request.session_id:
            session = await self.sessions.get(request.session_id)
        else:
            session = Session.fresh("", self._model(request.model))
        expect = request.expect_offset if request.HasField("expect_offset") else None
        result, held = await self._predict(
            session, request.text, request.top_k, request.full_distribution, expect
        )
        if held:  # the reply leaves after this returns; the budget is back when the call is over
            context.add_done_callback(lambda _: self.budget.release(held))  # type: ignore[arg-type]  # stubs: a callable works
        head = replies.with_vocab(
            replies.head(session.id, session.model), session.model.require().vocab.chars
        )
        return replies.reply(head, result)

    @duplex
    async def PredictStream(self, context: Ctx) -> None:  # type: ignore[override]  # stubs: generator form only
        stream: Stream | None = None
        task = asyncio.current_task()
        assert task is not None
        try:
            while (raw := await context.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                self.open_calls.touch(task)
                stream = await self._stream_message(context, accepted(raw), stream)
        finally:
            if stream is not None:
                self.sessions.detach(stream.session.id, stream.attachment)

    async def _stream_message(
        self, context: Ctx, request: pb.PredictStreamRequest, stream: Stream | None
    ) -> Stream:
        """One request of a PredictStream: the first attaches the stream to its session (taking it
        over from a stream attached before, which ends ABORTED at its next message)."""
        if stream is None:
            if request.session_id:
                session = await self.sessions.get(request.session_id)
            else:
                self._check_text(request.text)  # a bad first chunk must not leave a session behind
                session = await self.sessions.create("", self._model(request.model))
            stream = Stream(
                session, self.sessions.attach(session.id), replies.head(session.id, session.model)
            )
            head = replies.with_vocab(stream.head, session.model.require().vocab.chars)  # the first reply
        else:
            if request.session_id and request.session_id != stream.session.id:
                raise InvalidArgument(
                    f"session_id: this stream is attached to {shown(stream.session.id)}, "
                    f"not {shown(request.session_id)}"
                )
            if stream.attachment.revoked:
                raise Aborted(
                    f"session {shown(stream.session.id)}: another stream attached to it; this one ends"
                )
            stream.session = await self.sessions.again(stream.session)
            head = stream.head
        session = stream.session
        expect = request.expect_offset if request.HasField("expect_offset") else None
        if request.rewind:  # a Backspace: take characters back, then consume the text, if any
            await self.sessions.rewind(session, request.rewind, expect)
            expect = None
            if not request.text:
                await context.write(self._rewound(head, session, request.top_k))
                return stream
        result, held = await self._predict(
            session, request.text, request.top_k, request.full_distribution, expect
        )
        try:
            # returns once the transport took it: the client is reading
            await context.write(replies.reply(head, result, session.trail.reach(session.offset)))
        finally:
            self.budget.release(held)
        return stream

    def _rewound(self, head: bytes, session: Session, top_k: int) -> pb.PredictStreamResponse:
        """The reply to a message that only rewound: no predictions, the next characters where it is."""
        reply = pb.PredictStreamResponse.FromString(head)
        k = self._top_k(top_k, session.model.require().vocab.size)
        reply.predictions.start_offset, reply.predictions.top_k = session.offset, k
        messages.fill_next(reply.next, session.probs, k)
        reply.rewind_limit = session.trail.reach(session.offset)
        return reply

    @streaming
    async def Generate(self, request: pb.GenerateRequest, context: Ctx) -> AsyncIterator[pb.GenerateResponse]:
        if not 1 <= request.length <= self.config.max_generate_chars:
            raise InvalidArgument(
                f"length: must be in 1..{self.config.max_generate_chars}, got {request.length}"
            )
        try:
            sampling = Sampling(
                request.temperature if request.HasField("temperature") else 1.0,
                request.top_k,
                request.top_p if request.HasField("top_p") else 1.0,
            )
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        self._check_prime(request.prime_text)
        if request.session_id:
            # fresh: a generation cannot be re-run after a lost race (its random draws are spent),
            # so start from the shared copy; a race lost anyway answers ABORTED (StaleSession)
            source = await self.sessions.get(request.session_id, fresh=True)
            session = source.copy("") if request.fork else source
        else:
            session = Session.fresh("", self._model(request.model))
        if request.top_k:  # 0 = no cut-off
            self._top_k(request.top_k, session.model.require().vocab.size)
        reported_id = "" if request.fork or not request.session_id else session.id
        rng = np.random.default_rng(request.seed if request.HasField("seed") else None)
        if request.prime_text:
            await self.sessions.prime(session, request.prime_text)
        left = request.length
        while left > 0:
            n = min(left, GENERATE_PIECE)
            result = await self.sessions.generate(session, n, rng, sampling)
            left -= n
            yield pb.GenerateResponse(
                text=result.text,
                offset=session.offset,
                session_id=reported_id,
                model=messages.model_ref(session.model),
            )

    @unary
    async def Complete(self, request: pb.CompleteRequest, context: Ctx) -> pb.CompleteResponse:
        n, max_chars = request.n or DEFAULT_CONTINUATIONS, request.max_chars or DEFAULT_COMPLETION_CHARS
        if not 1 <= n <= MAX_CONTINUATIONS:
            raise InvalidArgument(f"n: must be in 1..{MAX_CONTINUATIONS}, got {n}")
        if not 1 <= max_chars <= MAX_COMPLETION_CHARS:
            raise InvalidArgument(f"max_chars: must be in 1..{MAX_COMPLETION_CHARS}, got {max_chars}")
        if request.session_id:
            if request.prime_text:
                raise InvalidArgument("prime_text: a session completes from where it is; send no prime_text")
            session = await self.sessions.get(request.session_id, fresh=True)
        else:
            self._check_prime(request.prime_text)
            session = Session.fresh("", self._model(request.model))
            if request.prime_text:
                await self.sessions.prime(session, request.prime_text)
        reply = pb.CompleteResponse(model=messages.model_ref(session.model), offset=session.offset)
        for c in self.sessions.complete(session, n, max_chars):
            reply.completions.add(text=c.text, prob=c.prob, complete=c.complete)
        return reply

    # ------------------------------------------------------------ training

    @streaming
    async def Train(self, request: pb.TrainRequest, context: Ctx) -> AsyncIterator[pb.TrainResponse]:
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
        await self.texts.release(path)  # the job took the file: it counts no longer
        if not inline:
            await asyncio.to_thread(self.texts.forget, request.text_id)
        told = False
        try:
            async for current, record, place in self.jobs.follow(job.id):
                remaining = context.time_remaining()
                if not told and remaining is not None and remaining <= 0:
                    return  # the caller was told DEADLINE_EXCEEDED, never the job
                told = True  # handed to gRPC: a caller that goes away from here on knew the job
                yield pb.TrainResponse(event=messages.job_event(current, record, place))
        finally:
            if not told:  # a job nobody was told of is nobody's
                with contextlib.suppress(ServiceError):
                    await self.jobs.cancel(job.id, FORSAKEN)

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
        places = await self.jobs.places()
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
        mv = self.registry.resolve(request.model.name, request.model.version, need_available=False)
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
        mv = self.registry.resolve(request.model.name, request.model.version)
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
