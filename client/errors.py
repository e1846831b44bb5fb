"""The client's exceptions: every failed call raises exactly one of these.

``grpc.RpcError`` never reaches a caller: ``translate_errors()`` is the one place
where a gRPC status becomes a NextCharError, chosen by status code and, for
NOT_FOUND, by the ``nextchar-subject`` the server attaches (session, model, job). Catch ``NextCharError`` for
"anything went wrong", or a leaf for the case you can handle::

    NextCharError                  the base; .code is the gRPC status name
    ├── NotFound                   NOT_FOUND
    │   ├── SessionNotFound        no such session (never existed, or forgotten)
    │   │   └── SessionExpired     it existed; .reason: idle | lifetime | closed | evicted | other
    │   ├── ModelNotFound          no such model version (or no default model)
    │   └── JobNotFound            no such training job
    ├── InvalidArgument            INVALID_ARGUMENT: a field is out of range; the message names it
    ├── AlreadyExists              ALREADY_EXISTS: the session id is taken
    ├── FailedPrecondition         FAILED_PRECONDITION: e.g. an unavailable model version
    │   ├── OffsetMismatch         the session is not at the offset the client expected (.offset)
    │   └── RewindTooFar           a rewind reaches back further than the session keeps (.limit)
    ├── Overloaded                 RESOURCE_EXHAUSTED: session cap or a size limit; retry later
    ├── Unavailable                UNAVAILABLE: server unreachable or draining
    ├── DeadlineExceeded           DEADLINE_EXCEEDED: the call's timeout passed
    ├── Cancelled                  CANCELLED
    ├── Unauthenticated            UNAUTHENTICATED / PERMISSION_DENIED
    ├── TrainingFailed             a training job ended FAILED or CANCELLED; .job says why
    └── ServerError                any other status (INTERNAL, UNKNOWN, ...)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from nextchar.client.results import Job


class NextCharError(Exception):
    """Base of every client error; ``code`` names the gRPC status ("" for client-side errors)."""

    code: str = ""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class NotFound(NextCharError):
    code = "NOT_FOUND"


class SessionNotFound(NotFound):
    """The session id is unknown to the server."""


class SessionExpired(SessionNotFound):
    """The session existed and is gone; ``reason`` is idle, lifetime, closed, evicted or other."""

    def __init__(self, message: str, *, reason: str, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.reason = reason


class ModelNotFound(NotFound):
    """No such model name or version, or no default model yet."""


class JobNotFound(NotFound):
    """No such training job."""


class InvalidArgument(NextCharError):
    code = "INVALID_ARGUMENT"


class AlreadyExists(NextCharError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(NextCharError):
    code = "FAILED_PRECONDITION"


class OffsetMismatch(FailedPrecondition):
    """The session's offset is not the one the client last acknowledged: text was fed elsewhere.
    ``offset`` is where the session is (-1 when not known)."""

    def __init__(self, message: str, *, offset: int = -1, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.offset = offset


class RewindTooFar(FailedPrecondition):
    """A rewind asked for more characters than the session can take back; ``limit`` is how many it can."""

    def __init__(self, message: str, *, limit: int = 0, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.limit = limit


class Overloaded(NextCharError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(NextCharError):
    code = "UNAVAILABLE"


class DeadlineExceeded(NextCharError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(NextCharError):
    code = "CANCELLED"


class Unauthenticated(NextCharError):
    code = "UNAUTHENTICATED"


class TrainingFailed(NextCharError):
    """A training job ended without registering a model; ``job.error`` says why."""

    def __init__(self, message: str, *, job: Job) -> None:
        super().__init__(message)
        self.job = job


class ServerError(NextCharError):
    """A status the client has no better name for (INTERNAL, UNKNOWN, ...)."""


_BY_CODE: dict[grpc.StatusCode, type[NextCharError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
}

DETAIL_PREFIX = "nextchar-"  # the server's machine-readable error details, in trailing metadata
# gRPC core's words for a host name that did not resolve (its native resolver, then c-ares)
UNRESOLVED = re.compile(r"^(?:errors resolving|DNS resolution failed for) (\S+?):? ")
LOST = ("Stream removed", "Socket closed", "Connection reset", "recvmsg:Connection reset")  # gRPC core's


def from_rpc_error(error: grpc.RpcError) -> NextCharError:
    """The NextCharError for a failed call: chosen by status code and the server's details
    (``nextchar-subject``, ``-reason``, ``-field``), never by parsing a server's message (only
    gRPC's own, for a connection that failed or broke)."""
    call = error if isinstance(error, grpc.Call) else None
    status = call.code() if call is not None else grpc.StatusCode.UNKNOWN
    message = (call.details() if call is not None else None) or str(error)
    details = _details(call)
    code = status.name
    if status == grpc.StatusCode.NOT_FOUND:
        return _not_found(message, code, details)
    if status == grpc.StatusCode.FAILED_PRECONDITION and details.get("field") == "expect_offset":
        return OffsetMismatch(message, code=code, offset=int(details.get("offset", -1)))
    if status == grpc.StatusCode.FAILED_PRECONDITION and details.get("field") == "rewind":
        return RewindTooFar(message, code=code, limit=int(details.get("rewind_limit", 0)))
    unresolved = UNRESOLVED.match(message) if status == grpc.StatusCode.UNAVAILABLE else None
    if unresolved:  # gRPC's text is resolver internals; what the person can do is check the name
        return Unavailable(
            f"cannot find the server: no address for the host name in {unresolved.group(1)}; "
            "check the server address (HOST:PORT, e.g. 127.0.0.1:50051)",
            code=code,
        )
    if status == grpc.StatusCode.UNAVAILABLE and message.startswith("failed to connect"):
        message = f"cannot reach the server ({message})"
    elif status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN) and message.startswith(LOST):
        # gRPC's own words for a connection that broke under a call: the server went away
        return Unavailable(f"lost the connection to the server ({message})", code=code)
    return _BY_CODE.get(status, ServerError)(message, code=code)


def _details(call: grpc.Call | None) -> dict[str, str]:
    metadata = (call.trailing_metadata() if call is not None else None) or ()
    return {
        str(key)[len(DETAIL_PREFIX) :]: str(value)
        for key, value in metadata
        if str(key).startswith(DETAIL_PREFIX)
    }


def _not_found(message: str, code: str, details: dict[str, str]) -> NotFound:
    subject = details.get("subject")
    if subject == "session":
        reason = details.get("reason", "")
        return (
            SessionExpired(message, reason=reason, code=code)
            if reason
            else SessionNotFound(message, code=code)
        )
    if subject == "job":
        return JobNotFound(message, code=code)
    if subject == "model":
        return ModelNotFound(message, code=code)
    return NotFound(message, code=code)


@contextmanager
def translate_errors() -> Iterator[None]:
    """The one boundary: a grpc.RpcError raised inside becomes the matching NextCharError."""
    try:
        yield
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None
