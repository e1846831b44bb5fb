"""The decoding boundary: the service's handlers, registered so that no request can fail to parse inside gRPC.

A request deserializer that raises makes gRPC answer UNKNOWN and log a traceback,
whatever the bytes were. So the NextCharService handlers are registered here with
a lenient deserializer per method: bytes over the method's size limit, or that do
not parse as its request message (not protobuf, invalid UTF-8 in a string field, a
truncated field), become a ``Refused`` value carrying the ServiceError to answer
with, and the servicer's decorators raise it: RESOURCE_EXHAUSTED or
INVALID_ARGUMENT naming the message, on unary calls and mid-stream alike.

Size limits match what each method legitimately carries (a prediction chunk is at
most ``max_chunk_chars`` characters, four bytes each at worst in UTF-8), so a
60 MB Predict is refused before any parsing; gRPC's own limit
(``max_message_bytes``) stays the ceiling for training text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from nextchar.proto import nextchar_pb2 as pb
from nextchar.server.config import ServerConfig
from nextchar.server.errors import InvalidArgument, ResourceExhausted, ServiceError

SERVICE = pb.DESCRIPTOR.services_by_name["NextCharService"]
ENVELOPE = 4096  # bytes of fields around a request's text (ids, model refs, options)
SMALL = 64 * 1024  # requests that carry no text: ids, names, numbers
UTF8_MAX = 4  # bytes per character at worst


@dataclass(frozen=True, slots=True)
class Refused:
    """What a lenient deserializer returns for bytes it will not parse: the error to answer with."""

    error: ServiceError


def request_limits(config: ServerConfig) -> dict[str, int]:
    """Bytes each method's request may take; methods not named take SMALL."""
    chunk = config.max_chunk_chars * UTF8_MAX + ENVELOPE
    prime = config.max_prime_chars * UTF8_MAX + ENVELOPE
    return {
        "Predict": chunk,
        "PredictStream": chunk,
        "CreateSession": prime,
        "Generate": prime,
        "Complete": prime,
        "ImportSession": 1024 * 1024,  # a snapshot: state and probabilities, at most a few hundred KB
        "Train": config.max_message_bytes,
        "UploadText": config.max_message_bytes,
    }


def lenient(cls: type[Message], limit: int) -> Callable[[bytes], Message | Refused]:
    """A deserializer for cls that never raises."""
    name = cls.DESCRIPTOR.name

    def parse(data: bytes) -> Message | Refused:
        if len(data) > limit:
            return Refused(
                ResourceExhausted(f"{name}: {len(data)} bytes exceed this method's {limit}-byte limit")
            )
        try:
            return cls.FromString(data)
        except Exception as exc:  # DecodeError for bad wire bytes and bad UTF-8 alike; nothing else can come
            return Refused(InvalidArgument(f"{name}: not a valid {name} message ({_first_line(exc)})"))

    return parse


def _first_line(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:120]


HANDLERS: dict[tuple[bool, bool], Callable[..., Any]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def serialize(response: Message | bytes) -> bytes:
    """A response as wire bytes: prediction replies are written as bytes already (nextchar.server.replies)."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def add_service(servicer: object, server: grpc.aio.Server, config: ServerConfig) -> None:
    """Register every NextCharService method of servicer on server, each with its lenient deserializer."""
    limits = request_limits(config)
    handlers = {}
    for method in SERVICE.methods:
        make = HANDLERS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=lenient(GetMessageClass(method.input_type), limits.get(method.name, SMALL)),
            response_serializer=serialize,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    # as the generated code does: registered methods are matched in gRPC's core, not per call in Python
    server.add_registered_method_handlers(SERVICE.full_name, handlers)  # type: ignore[attr-defined]  # grpc-stubs lag
