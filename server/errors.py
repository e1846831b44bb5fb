"""Service errors: each carries the gRPC status code the client receives.

Modules below the servicer raise these; the servicer turns them into
``context.abort(code, message, details)`` at one boundary, so the status-code
table in docs/api.md is implemented in exactly one place per row. Messages name
the field or the object and say why, for people; details say it for programs.
"""

from __future__ import annotations

import grpc

METADATA_PREFIX = "nextchar-"  # trailing metadata keys of an error's details
SHOWN = 40  # characters of client input a message or log line repeats


def shown(value: str, limit: int = SHOWN) -> str:
    """Client input as a message or a log line may repeat it: quoted, and cut to a short
    prefix, so a megabyte id costs a megabyte nowhere but in its own request."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


class ServiceError(Exception):
    """details: short machine-readable facts beside the message, sent as trailing
    metadata ``nextchar-<key>: <value>`` so that clients need not parse the text."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, **details: str) -> None:
        super().__init__(message)
        self.details = details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple((METADATA_PREFIX + key, value) for key, value in self.details.items())


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Aborted(ServiceError):
    code = grpc.StatusCode.ABORTED
