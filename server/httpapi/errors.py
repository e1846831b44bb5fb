"""How a refusal reaches an HTTP client: a status, and a JSON body with the same code and details
gRPC sends as its status and trailing metadata.

One table (Code -> HTTP status) and one middleware: a ServiceError anywhere in a
handler becomes ``{"error": {"code", "message", "details"}}`` with its status; a
bug becomes 500 with an error id the log line carries, never a traceback.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from nextchar.server.errors import Code, ServiceError
from nextchar.server.logs import CALLS_LOGGER

STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.ABORTED: 409,
    Code.FAILED_PRECONDITION: 412,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.UNAVAILABLE: 503,
    Code.INTERNAL: 500,
}
calls_log = logging.getLogger(CALLS_LOGGER)  # behind the flood gate (nextchar.server.logs)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def body(code: str, message: str, details: dict[str, str] | None = None) -> dict[str, object]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def refusal(exc: ServiceError) -> tuple[int, dict[str, object]]:
    """(HTTP status, JSON body) of a refusal."""
    return STATUS[exc.code], body(exc.code.name, str(exc), exc.details)


def internal(where: str, exc: BaseException) -> tuple[int, dict[str, object]]:
    """A bug: logged whole under an error id, answered with the id only."""
    error_id = secrets.token_hex(6)
    calls_log.error("%s failed: internal error %s", where, error_id, exc_info=exc)
    message = f"internal error {error_id}: the server's log has the details under this id"
    return 500, body("INTERNAL", message, {"error-id": error_id})


def http_error(exc: web.HTTPException) -> tuple[int, dict[str, object]]:
    """aiohttp's own refusals (no such route, method not allowed, body too large) in the same form."""
    code = {404: "NOT_FOUND", 405: "INVALID_ARGUMENT", 413: "RESOURCE_EXHAUSTED"}.get(
        exc.status, "INVALID_ARGUMENT"
    )
    return exc.status, body(code, exc.text or exc.reason or "refused")


def error_middleware(on_refused: Callable[[str, str], None]) -> Any:
    """The middleware (returned as Any: aiohttp's Middleware protocol is not public)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ServiceError as exc:
            status, payload = refusal(exc)
            on_refused(request.path, exc.code.name)
            calls_log.info("%s %s refused: %s: %s", request.method, request.path, exc.code.name, exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            status, payload = http_error(exc)
        except Exception as exc:
            status, payload = internal(f"{request.method} {request.path}", exc)
        return web.json_response(payload, status=status)

    return middleware
