"""HttpApi: the routes of the HTTP/JSON and WebSocket API, and the aiohttp application serving them.

Most routes are one service method (nextchar.server.service) each: the request
message is the JSON body with the path's and the query's parameters set on it
(``ROUTES``), the response message comes back as JSON. Predict writes its
predictions straight from the batch's arrays; Generate and WatchJob stream as
server-sent events; ``/v1/stream`` is PredictStream over a WebSocket, through the
same transport-neutral stream (nextchar.server.sessions.stream) gRPC's uses.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.resources
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from google.protobuf.message import Message
from nextchar.core.inference import top_k_rows
from nextchar.proto import nextchar_pb2 as pb
from nextchar.server.config import ServerConfig
from nextchar.server.errors import InvalidArgument, ServiceError
from nextchar.server.httpapi.errors import error_middleware, internal, refusal
from nextchar.server.httpapi.jsonform import candidates, dumps, json_object, parse, predictions, to_json
from nextchar.server.open_calls import OpenCalls, calls_client
from nextchar.server.service import Service, adapt_choice
from nextchar.server.sessions.stream import Rewound, SessionStream, StreamMessage
from nextchar.server.wire import SMALL, request_limits

JSON_EXPANSION = 3  # a JSON body may be this much bigger than the same request as protobuf (escapes)
OPEN_PATHS = ("/v1/health", "/openapi.json")  # and the playground's files: no token needed
WS_HEARTBEAT = 30.0  # seconds between pings on a WebSocket; a peer that misses one is closed


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # aiohttp's pattern; {name} parameters are set on the request message
    rpc: str  # the Service method, and the request message's name without "Request"
    params: tuple[tuple[str, str], ...] = ()  # path parameter -> request field (dotted for nested)


ROUTES = (
    Route("POST", "/v1/sessions", "CreateSession"),
    Route("GET", "/v1/sessions", "ListSessions"),
    Route("GET", "/v1/sessions/{session_id}", "GetSession"),
    Route("DELETE", "/v1/sessions/{session_id}", "CloseSession"),
    Route("POST", "/v1/sessions/{session_id}/reset", "ResetSession"),
    Route("POST", "/v1/sessions/{source_session_id}/fork", "ForkSession"),
    Route("POST", "/v1/sessions/{session_id}/rewind", "RewindSession"),
    Route("GET", "/v1/sessions/{session_id}/export", "ExportSession"),
    Route("POST", "/v1/sessions/import", "ImportSession"),
    Route("POST", "/v1/complete", "Complete"),
    Route("GET", "/v1/models", "ListModels"),
    Route("GET", "/v1/models/{name}", "DescribeModel", (("name", "model.name"),)),
    Route("GET", "/v1/models/{name}/history", "GetModelHistory", (("name", "model.name"),)),
    Route("GET", "/v1/jobs", "ListJobs"),
    Route("POST", "/v1/jobs/{job_id}/cancel", "CancelJob"),
    Route("POST", "/v1/jobs/{job_id}/resume", "ResumeJob"),
)
EVENT_ROUTES = (  # server-streaming RPCs, as server-sent events
    Route("POST", "/v1/generate", "Generate"),
    Route("GET", "/v1/jobs/{job_id}/watch", "WatchJob"),
)
QUERY_FIELDS = {"version": "model.version"}  # query parameters whose field is nested


def request_class(rpc: str) -> type[Message]:
    cls: type[Message] = getattr(pb, f"{rpc}Request")
    return cls


def _set(body: dict[str, Any], dotted: str, value: str) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        nested = body.setdefault(name, {})
        if not isinstance(nested, dict):
            raise InvalidArgument(f"{name}: a JSON object expected")
        body = nested
    body[leaf] = value


class HttpApi:
    def __init__(
        self,
        config: ServerConfig,
        service: Service,
        open_calls: OpenCalls,
        serving: Callable[[], bool],
    ) -> None:
        self.config = config
        self.service = service
        self.sessions = service.sessions
        self.open_calls = open_calls  # shared with gRPC: max_streams bounds both
        self.serving = serving
        self.limits = {rpc: JSON_EXPANSION * size for rpc, size in request_limits(config).items()}
        self.on_refused: Callable[[str, str], None] = lambda path, code: None  # (metrics)
        self.on_message: Callable[[float], None] = lambda seconds: None  # latency hook (metrics)
        self._expected = f"Bearer {config.token}".encode() if config.token else b""

    # ------------------------------------------------------------ the application

    def application(self) -> web.Application:
        app = web.Application(
            client_max_size=max(self.limits.values(), default=SMALL),
            middlewares=[
                error_middleware(lambda path, code: self.on_refused(path, code)),
                token_middleware(self._expected, lambda path, code: self.on_refused(path, code)),
            ],
        )
        for route in ROUTES:
            app.router.add_route(route.method, route.path, self._unary(route))
        for route in EVENT_ROUTES:
            app.router.add_route(route.method, route.path, self._events(route))
        app.router.add_post("/v1/predict", self.predict)
        app.router.add_get("/v1/stream", self.stream)
        app.router.add_get("/v1/health", self.health)
        app.router.add_get("/openapi.json", self.openapi)
        # the playground: its few files by name (each a route of its own: no path from a client
        # reaches the file system, and an editable install's links to the sources are followed)
        web_dir = playground_dir()
        if web_dir is not None:
            app.router.add_get("/", file_route(web_dir / "index.html"))
            for path in sorted(web_dir.glob("*.js")) + sorted(web_dir.glob("*.css")):
                app.router.add_get(f"/static/{path.name}", file_route(path))
        return app

    async def _request(self, request: web.Request, route: Route) -> Message:
        """The route's request message: the JSON body, with the path's and query's parameters."""
        data = await request.read()
        limit = self.limits.get(route.rpc, JSON_EXPANSION * SMALL)
        if len(data) > limit:  # 413, RESOURCE_EXHAUSTED (gRPC refuses such a request the same way)
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(data))
        body = json_object(data)
        fields = dict(route.params)
        for name, value in request.match_info.items():
            _set(body, fields.get(name, name), value)
        for name, value in request.query.items():
            _set(body, QUERY_FIELDS.get(name, name), value)
        return parse(body, request_class(route.rpc))

    def _unary(self, route: Route) -> Callable[[web.Request], Awaitable[web.Response]]:
        method = getattr(self.service, route.rpc)

        async def handle(request: web.Request) -> web.Response:
            response = await method(await self._request(request, route))
            status = 201 if route.rpc in ("CreateSession", "ImportSession", "ForkSession") else 200
            return web.json_response(to_json(response), status=status)

        return handle

    def _events(self, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """A server-streaming RPC as server-sent events: ``data: <response JSON>`` each. A refusal
        before the first response answers with its status; one after, as an ``error`` event."""
        method = getattr(self.service, route.rpc)

        async def handle(request: web.Request) -> web.StreamResponse:
            message = await self._request(request, route)
            async with self.open_calls.hold():
                responses: AsyncIterator[Message] = method(message)
                first = await anext(responses, None)
                reply = web.StreamResponse(
                    headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                )
                await reply.prepare(request)
                try:
                    if first is not None:
                        await reply.write(event(to_json(first)))
                    async for response in responses:
                        await reply.write(event(to_json(response)))
                except ServiceError as exc:
                    await reply.write(event(refusal(exc)[1], "error"))
                except (ConnectionResetError, asyncio.CancelledError):
                    raise
                except Exception as exc:
                    await reply.write(event(internal(route.path, exc)[1], "error"))
                await reply.write_eof()
                return reply

        return handle

    # ------------------------------------------------------------ predictions

    async def predict(self, request: web.Request) -> web.Response:
        start = time.perf_counter()
        message = await self._request(request, Route("POST", "/v1/predict", "Predict"))
        assert isinstance(message, pb.PredictRequest)
        text, k, full = message.text, message.top_k, message.full_distribution
        if message.session_id:
            session = await self.sessions.get(message.session_id)
            model = session.model
            expect = message.expect_offset if message.HasField("expect_offset") else None
            predicted = await self.sessions.predict(session, text, k, full, expect)
        else:
            model = await self.service.model(message.model)
            predicted = await self.sessions.predict_once(model, text, k, full, adapt_choice(message))
        try:
            vocab = model.vocab_chars
            body = {
                "session_id": message.session_id,
                "model": {"name": model.name, "version": model.version},
                "vocab": vocab,
                "predictions": predictions(predicted, vocab),
            }
            self.on_message(time.perf_counter() - start)
            return web.Response(body=dumps(body), content_type="application/json")
        finally:
            self.sessions.written(predicted)

    async def stream(self, request: web.Request) -> web.WebSocketResponse:
        """PredictStream over a WebSocket: one JSON text frame in, one out. A refusal sends an
        ``error`` frame and closes with 4000 + its HTTP status; a binary frame or a frame that is
        not a JSON object is refused like a malformed request (4400)."""
        limit = self.limits["PredictStream"]
        ws = web.WebSocketResponse(max_msg_size=limit, heartbeat=WS_HEARTBEAT)
        await ws.prepare(request)
        stream = SessionStream(self.sessions)
        task = asyncio.current_task()
        assert task is not None
        calls_client.set(f"ws:{request.transport.get_extra_info('peername') if request.transport else ''}")
        try:
            async with self.open_calls.hold():
                async for frame in ws:
                    if frame.type == WSMsgType.ERROR:
                        break
                    self.open_calls.touch(task)
                    if frame.type != WSMsgType.TEXT:
                        raise InvalidArgument("frame: send JSON text frames, not binary ones")
                    await self._stream_message(ws, stream, frame.data)
        except ServiceError as exc:
            status, body = refusal(exc)
            self.on_refused(request.path, exc.code.name)
            await self._close(ws, status, body)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:
            status, body = internal(request.path, exc)
            await self._close(ws, status, body)
        finally:
            stream.close()
        return ws

    async def _stream_message(self, ws: web.WebSocketResponse, stream: SessionStream, data: str) -> None:
        start = time.perf_counter()
        msg = stream_message(data)
        first = stream.session is None
        answer = await stream.message(msg)
        session = stream.session
        assert session is not None
        out: dict[str, Any] = {
            "session_id": session.id,
            "model": {"name": session.model.name, "version": session.model.version},
        }
        vocab = session.model.vocab_chars
        if first:
            out["vocab"] = vocab
        if isinstance(answer, Rewound):
            top_i, top_p = top_k_rows(answer.probs[None, :], answer.k)
            out["rewound"] = {"offset": answer.offset, **candidates(vocab, top_i[0], top_p[0])}
            out["rewind_limit"] = answer.rewind_limit
            await ws.send_frame(dumps(out), WSMsgType.TEXT)
            return
        try:
            out["predictions"] = predictions(answer, vocab)
            out["rewind_limit"] = answer.rewind_limit
            self.on_message(time.perf_counter() - start)
            await ws.send_frame(dumps(out), WSMsgType.TEXT)  # waits while the client is not reading
        finally:
            self.sessions.written(answer)

    @staticmethod
    async def _close(ws: web.WebSocketResponse, status: int, body: dict[str, Any]) -> None:
        if not ws.closed:
            try:
                await ws.send_str(json.dumps(body))
                await ws.close(code=4000 + status, message=body["error"]["code"].encode()[:120])
            except ConnectionResetError:
                pass

    # ------------------------------------------------------------ the rest

    async def health(self, request: web.Request) -> web.Response:
        serving = self.serving()
        return web.json_response(
            {"status": "SERVING" if serving else "NOT_SERVING"}, status=200 if serving else 503
        )

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=openapi_document(), content_type="application/json")


def token_middleware(expected: bytes, on_refused: Callable[[str, str], None]) -> Any:
    """With a token set (expected: b"Bearer <token>"), every API route wants ``Authorization:
    Bearer <token>``, compared in constant time (a WebSocket may pass ``?access_token=`` instead:
    browsers cannot set its headers); health, the OpenAPI document and the playground are open."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        path = request.path
        if not expected or path in OPEN_PATHS or not path.startswith("/v1/"):
            return await handler(request)
        presented = request.headers.get("Authorization", "")
        if not presented and path == "/v1/stream" and "access_token" in request.query:
            presented = "Bearer " + request.query["access_token"]
        if presented and hmac.compare_digest(presented.encode(errors="replace"), expected):
            return await handler(request)
        on_refused(path, "UNAUTHENTICATED")
        word = "missing" if not presented else "wrong"
        message = f"{word} token: send the header 'Authorization: Bearer <token>'"
        return web.json_response(
            {"error": {"code": "UNAUTHENTICATED", "message": message, "details": {}}},
            status=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    return middleware


def event(payload: dict[str, Any], kind: str = "") -> bytes:
    """One server-sent event."""
    head = f"event: {kind}\n" if kind else ""
    return f"{head}data: ".encode() + dumps(payload) + b"\n\n"


def stream_message(data: str) -> StreamMessage:
    """A WebSocket frame as the stream's message (a PredictStreamRequest in JSON)."""
    request = parse(json_object(data, "frame"), pb.PredictStreamRequest)
    return StreamMessage(
        request.text,
        request.rewind,
        request.top_k,
        request.full_distribution,
        request.expect_offset if request.HasField("expect_offset") else None,
        request.session_id,
        request.model.name,
        request.model.version,
        adapt_choice(request),
    )


def openapi_document() -> bytes:
    return importlib.resources.files("nextchar.server.httpapi").joinpath("openapi.json").read_bytes()


def file_route(path: Path) -> Callable[[web.Request], Awaitable[web.FileResponse]]:
    async def serve(request: web.Request) -> web.FileResponse:
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    return serve


def playground_dir() -> Path | None:
    """The playground's files (nextchar.server.web), when the package has them."""
    try:
        root = importlib.resources.files("nextchar.server.web")
    except ModuleNotFoundError:
        return None
    path = Path(str(root))
    return path if (path / "index.html").is_file() else None


def ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The HTTP port's TLS: the same certificate, key and client CA as the gRPC port's."""
    if not config.tls:
        return None
    assert config.tls_cert is not None and config.tls_key is not None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(config.tls_client_ca)
    return context


async def start(api: HttpApi, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve api on host:port (0: any free) on the running loop; returns (runner, bound port).

    A connection with no request in flight (a new one that sends nothing, one that trickles
    its headers, an idle keep-alive) is closed after max_connection_idle, as gRPC's are; an
    open WebSocket or event stream has a request in flight and is kept (it has its own pings)."""
    idle = api.config.max_connection_idle or 365 * 86400.0  # 0: kept (aiohttp's 0 means never kept)
    runner = web.AppRunner(api.application(), access_log=None, handle_signals=False, keepalive_timeout=idle)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context(api.config), shutdown_timeout=1.0)
    await site.start()
    return runner, int(runner.addresses[0][1])
