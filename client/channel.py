"""The channel to one server or several, and the one place a gRPC call is made.

Every call goes through ``Connection.call`` / ``Connection.stream``: they apply the
default timeout and translate ``grpc.RpcError`` (via nextchar.client.errors). With
several addresses the channel uses gRPC's own ``round_robin`` policy over them.
A token rides on every call as ``authorization: Bearer <token>`` metadata (plaintext
or TLS alike); ``Tls`` makes the channel a TLS one, with a client certificate for
servers that demand one.
"""

from __future__ import annotations

import functools
import ipaddress
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc
from nextchar.client.defaults import DEFAULT_PORT
from nextchar.client.errors import translate_errors
from nextchar.proto import nextchar_pb2_grpc

if TYPE_CHECKING:
    from grpc_health.v1 import health_pb2_grpc

Req = TypeVar("Req")
Resp = TypeVar("Resp")

SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")

# Keepalive finds a dead server under a long stream (the server permits a ping every 10 s);
# short reconnect backoff lets a resumed stream come back quickly after a blip. gRPC also
# takes grpc.min_reconnect_backoff_ms as the time a connection attempt is given to finish its
# handshake: at 100 ms a loaded or distant server was "unreachable" (every call refused).
# 5 s covers a TLS handshake over a slow link; at gRPC's 20 s default a resumed call after a
# dropped connection failed one time in three (test_feed_retries_once_after_a_drop).
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 5_000),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


def channel_target(target: str | Sequence[str]) -> tuple[str, list[tuple[str, int | str]]]:
    """A gRPC target and extra options for one address, a comma-separated list, or a sequence.

    Several addresses must be IP literals (``127.0.0.1:50051,127.0.0.1:50052``); they
    become one ``ipv4:``/``ipv6:`` target balanced with ``round_robin``. An address without
    a port means nextchar's port (50051), not gRPC's default (443: TLS).
    """
    if isinstance(target, str) and target.startswith(SCHEMES):
        return target, []  # already a gRPC target: the caller chose the resolver
    items = [target] if isinstance(target, str) else list(target)
    addresses = [with_port(part.strip()) for item in items for part in item.split(",") if part.strip()]
    if not addresses:
        raise ValueError("server address: empty")
    if len(addresses) == 1:
        return addresses[0], []
    families = {_ip_family(a) for a in addresses}
    if len(families) != 1:
        raise ValueError(f"server addresses: mix of IPv4 and IPv6 in {addresses}")
    return f"{families.pop()}:{','.join(addresses)}", [("grpc.lb_policy_name", "round_robin")]


def with_port(address: str) -> str:
    """HOST:PORT for HOST, HOST:PORT, [V6] or [V6]:PORT; a bare IPv6 literal gets its brackets."""
    if address.startswith("["):
        return address if "]:" in address else f"{address}:{DEFAULT_PORT}"
    if address.count(":") > 1:  # an IPv6 literal has no room for a port without brackets
        return f"[{address}]:{DEFAULT_PORT}"
    return address if ":" in address else f"{address}:{DEFAULT_PORT}"


def _ip_family(address: str) -> str:
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        return f"ipv{ipaddress.ip_address(host).version}"
    except ValueError:
        raise ValueError(
            f"server address {address!r}: several addresses must be IP:PORT literals (no host names)"
        ) from None


@dataclass(frozen=True)
class Tls:
    """TLS for a client channel, as PEM bytes: ``ca`` None trusts the system's roots.

    ``cert`` and ``key`` are the client's own certificate, for servers started with
    ``--tls-client-ca`` (mutual TLS).
    """

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None

    @classmethod
    def from_files(
        cls,
        ca: str | os.PathLike[str] | None = None,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
    ) -> Tls:
        if (cert is None) != (key is None):
            raise ValueError("client certificate: give both the certificate and its key")
        return cls(*(Path(p).read_bytes() if p is not None else None for p in (ca, cert, key)))

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)


class Connection:
    """A channel and its stubs, with a default per-call timeout and the token every call carries."""

    def __init__(
        self, target: str | Sequence[str], timeout: float, token: str = "", tls: Tls | None = None
    ) -> None:
        self.target, extra = channel_target(target)
        self.timeout = timeout
        options = CHANNEL_OPTIONS + extra
        if tls is None:
            self.channel = grpc.insecure_channel(self.target, options=options)
        else:
            self.channel = grpc.secure_channel(self.target, tls.credentials(), options=options)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.stub = nextchar_pb2_grpc.NextCharServiceStub(self.channel)

    @functools.cached_property
    def health(self) -> health_pb2_grpc.HealthStub:
        """The health service's stub, made on first use: its module costs ~17 ms to import."""
        from grpc_health.v1 import health_pb2_grpc

        return health_pb2_grpc.HealthStub(self.channel)

    def call(
        self,
        method: grpc.UnaryUnaryMultiCallable[Req, Resp] | grpc.StreamUnaryMultiCallable[Req, Resp],
        request: Req | Iterable[Req],
        *,
        timeout: float | None = None,
        wait_for_ready: bool = False,
    ) -> Resp:
        """One call with one reply (the request may be a stream), with the default timeout unless given."""
        with translate_errors():
            return method(
                request,  # type: ignore[arg-type]
                timeout=timeout or self.timeout,
                wait_for_ready=wait_for_ready,
                metadata=self.metadata,
            )

    def stream(
        self,
        method: grpc.UnaryStreamMultiCallable[Req, Resp] | grpc.StreamStreamMultiCallable[Req, Resp],
        request: Req | Iterable[Req],
        *,
        timeout: float | None = None,
    ) -> StreamCall[Resp]:
        """A streaming call; ``timeout`` None means the stream may last as long as it needs."""
        with translate_errors():
            return StreamCall(method(request, timeout=timeout, metadata=self.metadata))  # type: ignore[arg-type]

    def close(self) -> None:
        self.channel.close()


class StreamCall(Iterator[Resp]):
    """A running streaming call: iterate its responses (errors translated), or cancel it."""

    def __init__(self, call: Iterator[Resp]) -> None:
        self._call = call

    def __next__(self) -> Resp:
        with translate_errors():
            return next(self._call)

    def cancel(self) -> None:
        if isinstance(self._call, grpc.Future):
            self._call.cancel()
