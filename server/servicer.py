"""NextCharService over gRPC: the thin adapter between the wire and the service.

Every RPC but three is the protocol-neutral Service's method (nextchar.server.service)
under the gRPC error boundary (nextchar.server.grpc_errors): the request message in,
the response message (or messages) out. Predict and PredictStream write their
replies as bytes straight from the batch's arrays (nextchar.server.replies), and
UploadText reads a client stream; their rules are the session core's
(nextchar.server.sessions), which every protocol shares. No model math and no
session rules here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc._cython.cygrpc import ExecuteBatchError  # what a call whose client is gone raises
from nextchar.proto import nextchar_pb2 as pb
from nextchar.server import messages, replies
from nextchar.server.grpc_errors import Ctx, accepted, duplex, streaming, unary
from nextchar.server.open_calls import OpenCalls
from nextchar.server.service import Service, adapt_choice, expected_offset
from nextchar.server.sessions.stream import Rewound, SessionStream, StreamMessage
from nextchar.server.wire import Refused

# The RPCs that are the Service's methods as they are: (request) -> response, and the
# server-streaming ones, (request) -> responses.
UNARY = (
    "CreateSession",
    "GetSession",
    "ListSessions",
    "ResetSession",
    "ForkSession",
    "CloseSession",
    "ExportSession",
    "ImportSession",
    "RewindSession",
    "Complete",
    "ListJobs",
    "CancelJob",
    "ResumeJob",
    "ListModels",
    "DescribeModel",
    "GetModelHistory",
    "SetDefaultModel",
    "DeleteModel",
)
STREAMING = ("Generate", "WatchJob")


async def upload_pieces(
    requests: AsyncIterator[pb.UploadTextRequest | Refused], context: Ctx
) -> AsyncIterator[str]:
    """An upload's pieces as they come, ending only for a client that ended them. gRPC ends the
    messages of a stream whose connection broke as it ends a finished one, and cancels the call
    only after, at a time of the loop's choosing (under load, after the text was committed). The
    reply's headers, sent once the pieces end, tell the two apart at once: gRPC fails them on a
    call whose client is gone, and the upload is then cancelled, leaving nothing.

    A generator function, not a generator expression: the expression takes gRPC's request
    iterator (aiter) where it is written, and an upload cancelled before it read a piece left
    gRPC's receiver "never awaited" (a RuntimeWarning per call)."""
    async for raw in requests:
        yield accepted(raw).piece
    try:
        await context.send_initial_metadata(())
    except ExecuteBatchError as gone:  # the call is over
        raise asyncio.CancelledError("the client went away before the upload ended") from gone


def when_over(callback: Callable[[], None]) -> None:
    """Call callback once this call is over: its reply sent, or never to be. The handler runs in
    the call's task, which gRPC ends after the reply's last batch. Not the context's
    add_done_callback: gRPC keeps those in a reference cycle with the call's core state, which
    holds the call's reply until the cyclic collector runs (200 Predicts of 4,096 characters
    kept 69 MB on an idle server, which never collected them)."""
    task = asyncio.current_task()
    assert task is not None
    task.add_done_callback(lambda _: callback())


class NextCharServicer:
    """Registered method by method from the service descriptor (nextchar.server.wire.add_service),
    so it need not subclass the generated base."""

    def __init__(self, service: Service, open_calls: OpenCalls) -> None:
        self.service = service
        self.sessions = service.sessions
        self.open_calls = open_calls  # streams and uploads (every protocol's): the drain waits for them
        self.on_message: Callable[[float], None] = lambda seconds: None  # latency hook (metrics)
        self.on_refused: Callable[[str, str], None] = lambda method, code: None  # (metrics)

    @unary
    async def Predict(
        self, request: pb.PredictRequest, context: Ctx
    ) -> bytes:  # a serialized PredictResponse
        start = time.perf_counter()
        text, k, full = request.text, request.top_k, request.full_distribution
        if request.session_id:
            session = await self.sessions.get(request.session_id)
            model = session.model
            predicted = await self.sessions.predict(session, text, k, full, expected_offset(request))
        else:
            model = await self.service.model(request.model)
            predicted = await self.sessions.predict_once(model, text, k, full, adapt_choice(request))
        self.on_message(time.perf_counter() - start)
        if predicted.held:  # the reply leaves after this returns; the budget is back when the call is over
            when_over(lambda: self.sessions.written(predicted))
        return replies.reply(
            replies.with_vocab(replies.head(request.session_id, model), model.vocab_chars), predicted
        )

    @duplex
    async def PredictStream(self, context: Ctx) -> None:
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
                msg = StreamMessage(
                    request.text,
                    request.rewind,
                    request.top_k,
                    request.full_distribution,
                    expected_offset(request),
                    request.session_id,
                )
                if first:  # (each read of request.model makes a message object: only once)
                    msg = msg._replace(
                        model_name=request.model.name,
                        model_version=request.model.version,
                        adapt=adapt_choice(request),
                    )
                answer = await stream.message(msg)
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
    async def Train(self, request: pb.TrainRequest, context: Ctx) -> AsyncIterator[pb.TrainResponse]:
        def expired() -> bool:
            remaining = context.time_remaining()
            return remaining is not None and remaining <= 0

        async for response in self.service.Train(request, expired):
            yield response

    @unary
    async def UploadText(
        self, request_iterator: AsyncIterator[pb.UploadTextRequest | Refused], context: Ctx
    ) -> pb.UploadTextResponse:
        async with self.open_calls.hold():
            text_id, chars, size = await self.service.texts.receive(upload_pieces(request_iterator, context))
        texts = self.service.texts
        # a client that ended its pieces and then went away is told apart only once the call is over
        when_over(lambda: texts.unanswered(text_id) if context.cancelled() else None)
        return pb.UploadTextResponse(text_id=text_id, chars=chars, bytes=size)


def rewound(lead: bytes, answer: Rewound) -> pb.PredictStreamResponse:
    """The reply to a message that only rewound: no predictions, the next characters where it is."""
    reply = pb.PredictStreamResponse.FromString(lead)
    reply.predictions.start_offset, reply.predictions.top_k = answer.offset, answer.k
    messages.fill_next(reply.next, answer.probs, answer.k)
    reply.rewind_limit = answer.rewind_limit
    return reply


def _unary(name: str) -> Callable[[NextCharServicer, Any, Ctx], Awaitable[Any]]:
    async def call(self: NextCharServicer, request: Any, context: Ctx) -> Any:
        return await getattr(self.service, name)(request)

    call.__name__ = call.__qualname__ = name
    return unary(call)


def _streaming(name: str) -> Callable[[NextCharServicer, Any, Ctx], AsyncIterator[Any]]:
    async def call(self: NextCharServicer, request: Any, context: Ctx) -> AsyncIterator[Any]:
        async for response in getattr(self.service, name)(request):
            yield response

    call.__name__ = call.__qualname__ = name
    return streaming(call)


for _name in UNARY:
    setattr(NextCharServicer, _name, _unary(_name))
for _name in STREAMING:
    setattr(NextCharServicer, _name, _streaming(_name))
