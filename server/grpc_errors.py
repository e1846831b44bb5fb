"""Where the domain's errors meet gRPC: one status per neutral code, and one boundary per call.

Every servicer method runs under one of three decorators (unary, server-streaming,
bidirectional), which all guard the call the same way (``guarded``): a
ServiceError sets the call's status, message and trailing metadata (without raising)
(``nextchar-<key>: <value>`` per detail), anything else INTERNAL with an error id
the log line carries. The streaming kinds also count as open calls (the bound on
what clients hold open, nextchar.server.open_calls).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc
from grpc._cython.cygrpc import ExecuteBatchError  # what a call whose client is gone raises
from nextchar.server.errors import Code, ServiceError
from nextchar.server.logs import CALLS_LOGGER
from nextchar.server.open_calls import OpenCalls, calls_client
from nextchar.server.wire import Refused

METADATA_PREFIX = "nextchar-"  # trailing metadata keys of an error's details
STATUS = {code: getattr(grpc.StatusCode, code.name) for code in Code}

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Ctx = grpc.aio.ServicerContext[Any, Any]
calls_log = logging.getLogger(CALLS_LOGGER)  # behind the flood gate (nextchar.server.logs)


class Edge(Protocol):
    """What the decorators need of the servicer they wrap."""

    open_calls: OpenCalls
    on_refused: Callable[[str, str], None]  # (method, status name): the metrics' counter


def accepted(request: Req | Refused) -> Req:
    """The request, or the refusal its bytes earned at the decoding boundary (nextchar.server.wire)."""
    if isinstance(request, Refused):
        raise request.error
    return request


def trailing_metadata(exc: ServiceError) -> tuple[tuple[str, str], ...]:
    return tuple((METADATA_PREFIX + key, value) for key, value in exc.details.items())


@contextlib.asynccontextmanager
async def guarded(edge: Edge, method: str, context: Ctx) -> AsyncIterator[None]:
    """The one error boundary of a call: a refusal answers with its status, a bug with INTERNAL.
    Also names the call's connection for OpenCalls (its fair share of max_streams)."""
    calls_client.set(context.peer())
    try:
        yield
    except ServiceError as exc:
        status = STATUS[exc.code]
        edge.on_refused(method, status.name)
        calls_log.info("%s refused: %s: %s", method, status.name, exc)
        # answered without raising (not context.abort): an AbortError raised here would tie
        # this exception, its traceback's frames and the request into reference cycles that
        # live until the next garbage collection
        context.set_code(status)
        context.set_details(str(exc))
        context.set_trailing_metadata(trailing_metadata(exc))
        # and the refusal lets go of its frames: a request refused at decoding (wire.Refused)
        # holds its error, whose traceback holds the frames that hold the request, and with
        # them the call's context and gRPC's call state, each such call in a cycle an idle
        # server never collects (make bench-abuse's malformed kind: 900 calls' worth 30 s on)
        exc.__traceback__ = None
    except Exception as exc:
        await fail(method, exc, context)


async def fail(method: str, exc: Exception, context: Ctx) -> None:
    """Answer a call that broke on a bug with INTERNAL and an error id the log line carries
    (raises AbortError); a call whose client is gone ends quietly."""
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


E = TypeVar("E", bound=Edge)


def unary(fn: Callable[[E, Req, Ctx], Awaitable[Resp]]) -> Callable[[E, Req | Refused, Ctx], Awaitable[Resp]]:
    @functools.wraps(fn)
    async def wrapper(self: E, request: Req | Refused, context: Ctx) -> Resp:
        async with guarded(self, fn.__name__, context):
            return await fn(self, accepted(request), context)
        return None  # refused: the status is set, no message goes

    return wrapper


def streaming(
    fn: Callable[[E, Req, Ctx], AsyncIterator[Resp]],
) -> Callable[[E, Req | Refused, Ctx], AsyncIterator[Resp]]:
    @functools.wraps(fn)
    async def wrapper(self: E, request: Req | Refused, context: Ctx) -> AsyncIterator[Resp]:
        async with guarded(self, fn.__name__, context), self.open_calls.hold():
            async for item in fn(self, accepted(request), context):
                yield item

    return wrapper


def duplex(fn: Callable[[E, Ctx], Awaitable[None]]) -> Callable[[E, Any, Ctx], Awaitable[None]]:
    """A bidirectional stream written with context.read() / context.write(): unlike an
    async generator under ``streaming``, no wrapper generator relays each message
    (~5% more one-character messages per second). The method reads its requests
    through ``accepted``, so a malformed one mid-stream is refused like a first one."""

    @functools.wraps(fn)
    async def wrapper(self: E, request_iterator: Any, context: Ctx) -> None:
        async with guarded(self, fn.__name__, context), self.open_calls.hold():
            await fn(self, context)

    return wrapper
