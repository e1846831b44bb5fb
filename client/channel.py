"""The channel to one server or several, and the one place a gRPC call is made.

Every call goes through ``Connection.call`` / ``Connection.stream``: they apply the
default timeout and translate ``grpc.RpcError`` (via nextchar.client.errors). With
several addresses the channel uses gRPC's own ``round_robin`` policy over them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2_grpc
from nextchar.client.errors import translate_errors
from nextchar.proto import nextchar_pb2_grpc

Req = TypeVar("Req")
Resp = TypeVar("Resp")

DEFAULT_TARGET = "127.0.0.1:50051"
SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")

# Keepalive finds a dead server under a long stream (the server permits a ping every 10 s);
# short reconnect backoff lets a resumed stream come back quickly after a blip.
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


def channel_target(target: str | Sequence[str]) -> tuple[str, list[tuple[str, int | str]]]:
    """A gRPC target and extra options for one address, a comma-separated list, or a sequence.

    Several addresses must be IP literals (``127.0.0.1:50051,127.0.0.1:50052``); they
    become one ``ipv4:``/``ipv6:`` target balanced with ``round_robin``.
    """
    if isinstance(target, str) and target.startswith(SCHEMES):
        return target, []  # already a gRPC target: the caller chose the resolver
    items = [target] if isinstance(target, str) else list(target)
    addresses = [part.strip() for item in items for part in item.split(",") if part.strip()]
    if not addresses:
        raise ValueError("server address: empty")
    if len(addresses) == 1:
        return addresses[0], []
    families = {_ip_family(a) for a in addresses}
    if len(families) != 1:
        raise ValueError(f"server addresses: mix of IPv4 and IPv6 in {addresses}")
    return f"{families.pop()}:{','.join(addresses)}", [("grpc.lb_policy_name", "round_robin")]


def _ip_family(address: str) -> str:
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        return f"ipv{ipaddress.ip_address(host).version}"
    except ValueError:
        raise ValueError(
            f"server address {address!r}: several addresses must be IP:PORT literals (no host names)"
        ) from None


class Connection:
    """A channel and its stubs, with a default per-call timeout."""

    def __init__(self, target: str | Sequence[str], timeout: float) -> None:
        self.target, extra = channel_target(target)
        self.timeout = timeout
        self.channel = grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS + extra)
        self.stub = nextchar_pb2_grpc.NextCharServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def call(
        self,
        method: grpc.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        *,
        timeout: float | None = None,
        wait_for_ready: bool = False,
    ) -> Resp:
        """One unary call with the default timeout unless given."""
        with translate_errors():
            return method(request, timeout=timeout or self.timeout, wait_for_ready=wait_for_ready)

    def stream(
        self,
        method: grpc.UnaryStreamMultiCallable[Req, Resp] | grpc.StreamStreamMultiCallable[Req, Resp],
        request: Req | Iterable[Req],
        *,
        timeout: float | None = None,
    ) -> StreamCall[Resp]:
        """A streaming call; ``timeout`` None means the stream may last as long as it needs."""
        with translate_errors():
            return StreamCall(method(request, timeout=timeout))  # type: ignore[arg-type]

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
