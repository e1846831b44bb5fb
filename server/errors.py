"""Service errors in the domain's own terms: each carries a neutral ``Code``, never a transport's.

Modules below the protocol edges raise these where the rule lives; each edge maps
a Code to its own status in one place (gRPC: ``nextchar.server.grpc_status``),
so the status-code table in docs/api.md is implemented once per protocol.
Messages name the field or the object and say why, for people; details say it
for programs (gRPC sends them as trailing metadata ``nextchar-<key>``).
"""

from __future__ import annotations

import enum

SHOWN = 40  # characters of client input a message or log line repeats


def shown(value: str, limit: int = SHOWN) -> str:
    """Client input as a message or a log line may repeat it: quoted, and cut to a short
    prefix, so a megabyte id costs a megabyte nowhere but in its own request."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


class Code(enum.Enum):
    """Why a request was refused, as every protocol's client learns it (the names are gRPC's,
    which the API documented first; docs/api.md maps each to its HTTP status too)."""

    INVALID_ARGUMENT = "invalid_argument"  # the request itself is wrong: never retry it as it is
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"  # the request is fine, the object's state refuses it
    RESOURCE_EXHAUSTED = "resource_exhausted"  # a limit: retry later, or ask for less
    UNAVAILABLE = "unavailable"  # retry, here or on another replica
    ABORTED = "aborted"  # lost a race with another change: retry from a fresh read
    INTERNAL = "internal"  # a bug: the server's log has the details


class ServiceError(Exception):
    """details: short machine-readable facts beside the message (subject, field, limit, ...)."""

    code = Code.INTERNAL

    def __init__(self, message: str, **details: str) -> None:
        super().__init__(message)
        self.details = details


class InvalidArgument(ServiceError):
    code = Code.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = Code.NOT_FOUND


class AlreadyExists(ServiceError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    code = Code.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    code = Code.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = Code.UNAVAILABLE


class Aborted(ServiceError):
    code = Code.ABORTED
