"""Who may call the service: a bearer token checked in one interceptor, and TLS on the port.

With ``ServerConfig.token`` set, every call must carry the gRPC metadata
``authorization: Bearer <token>``; anything else ends with UNAUTHENTICATED before
the servicer (or the request's deserializer) runs. The check is one interceptor, so
no handler can forget it, and it compares in constant time (``hmac.compare_digest``)
so response timing says nothing about how much of a guess was right. Health checks
and reflection stay open: load balancers probe without credentials, and neither
reveals anything of a session.

A token over plaintext can be read off the wire, so outside loopback give the port
TLS as well (``tls_cert``/``tls_key``; with ``tls_client_ca`` the server also
demands a client certificate signed by that CA, i.e. mutual TLS).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from nextchar.server.config import ServerConfig
from nextchar.server.logs import CALLS_LOGGER

log = logging.getLogger(CALLS_LOGGER + ".auth")  # behind the flood gate (nextchar.server.logs)

# Services every caller may use: probes and API discovery. Reflection lists method
# names that docs/api.md publishes anyway.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
HEADER = "authorization"
SCHEME = "Bearer "

if TYPE_CHECKING:  # generic only in grpc-stubs, not at run time
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]
    InterceptorBase = grpc.aio.ServerInterceptor[Any, Any]
else:
    InterceptorBase = grpc.aio.ServerInterceptor


class TokenAuthInterceptor(InterceptorBase):
    """Lets a call through only with ``authorization: Bearer <token>``; probes and reflection pass.

    ``on_failure`` is called once per refused call (the metrics counter), with the
    reason "missing" or "wrong".
    """

    def __init__(self, token: str, on_failure: Callable[[str], None] | None = None) -> None:
        self._expected = (SCHEME + token).encode()
        self._on_failure = on_failure

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        presented = _header(handler_call_details.invocation_metadata, HEADER)
        if presented is not None and hmac.compare_digest(presented.encode(), self._expected):
            return await continuation(handler_call_details)
        reason = "missing" if presented is None else "wrong"
        log.warning("refused %s: %s token", method, reason)
        if self._on_failure is not None:
            self._on_failure(reason)
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            return handler
        message = (
            "missing token: send the metadata 'authorization: Bearer <token>' (CLI: --token or NEXTCHAR_TOKEN)"
            if presented is None
            else "wrong token: the 'authorization' metadata does not carry this server's bearer token"
        )
        return _refusal(handler, message)


def _header(metadata: Any, key: str) -> str | None:
    """The value of one metadata key (metadata is a sequence of (key, value) pairs, or None)."""
    for k, v in metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("ascii", "replace")
    return None


def _refusal(handler: Handler, message: str) -> Handler:
    """A handler of the same kind as handler whose only act is to answer UNAUTHENTICATED.

    The request is never deserialized: no deserializers are installed, so an
    unauthenticated caller costs no parsing. The status is set, not raised
    (``context.abort``): a raised abort leaves the call's state in reference cycles
    that wait for the next collection (nextchar.server.grpc_errors.guarded).
    """

    async def abort(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        context.set_code(grpc.StatusCode.UNAUTHENTICATED)
        context.set_details(message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


def interceptors(config: ServerConfig, on_failure: Callable[[str], None] | None = None) -> list[Any]:
    """The server's interceptors: the token check when a token is configured, else none."""
    return [TokenAuthInterceptor(config.token, on_failure)] if config.token else []


def add_port(server: grpc.aio.Server, config: ServerConfig) -> int:
    """Bind config.address, with TLS when a certificate is configured; returns the bound port."""
    if not config.tls:
        if config.token and config.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning(
                "token authentication without TLS on %s: the token crosses the network in clear", config.host
            )
        return server.add_insecure_port(config.address)
    assert config.tls_cert is not None and config.tls_key is not None
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    credentials = grpc.ssl_server_credentials(
        [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
    return server.add_secure_port(config.address, credentials)
