"""The HTTP/JSON and WebSocket API, from outside: a real server process, an HTTP client, a WebSocket
client, raw sockets. Every route's success and refusal, parity with gRPC, hostile clients."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from nextchar.proto import nextchar_pb2 as pb
from nextchar.server.httpapi import openapi
from nextchar.server.httpapi.routes import EVENT_ROUTES, ROUTES
from server_harness import ServerProcess, make_registry

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model_dir = tmp_path_factory.mktemp("http-models")
    make_registry(model_dir, versions=1)
    srv = ServerProcess(model_dir, "--http-port", "0", "--max-sessions", "1000")
    yield srv
    srv.close()


def call(
    url: str, method: str, path: str, body: Any = None, data: bytes | None = None, **kw: Any
) -> tuple[int, Any]:
    """(status, JSON body) of one request."""

    async def go() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http:
            payload = data if data is not None else (json.dumps(body).encode() if body is not None else None)
            async with http.request(method, url + path, data=payload, **kw) as reply:
                text = await reply.text()
                return reply.status, json.loads(text) if text else None

    return asyncio.run(go())


def events(url: str, path: str, body: Any = None, method: str = "POST") -> tuple[int, list[tuple[str, Any]]]:
    """(status, [(event kind, data)]) of a server-sent event stream."""

    async def go() -> tuple[int, list[tuple[str, Any]]]:
        async with aiohttp.ClientSession() as http, http.request(method, url + path, json=body) as reply:
            text = await reply.text()
            if reply.content_type != "text/event-stream":
                return reply.status, [("refused", json.loads(text))]
            out = []
            for block in text.strip().split("\n\n"):
                kind, data = "message", ""
                for line in block.splitlines():
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        data = line[6:]
                out.append((kind, json.loads(data)))
            return reply.status, out

    return asyncio.run(go())


async def ws_exchange(url: str, frames: list[Any], query: str = "") -> tuple[list[Any], int | None]:
    """Send frames one at a time over /v1/stream (str: as is; bytes: a binary frame; else JSON),
    reading the reply to each; returns (replies, close code if the server closed)."""
    replies: list[Any] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url + "/v1/stream" + query) as ws:
        for frame in frames:
            if isinstance(frame, bytes):
                await ws.send_bytes(frame)
            else:
                await ws.send_str(frame if isinstance(frame, str) else json.dumps(frame))
            msg = await ws.receive(timeout=10)
            if msg.type == aiohttp.WSMsgType.TEXT:
                replies.append(json.loads(msg.data))
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return replies, ws.close_code
            if replies and "error" in replies[-1]:
                await ws.receive(timeout=10)
                return replies, ws.close_code
    return replies, None


# ---------------------------------------------------------------- routes


def test_sessions_lifecycle_over_http(server: ServerProcess) -> None:
    url = server.http_url
    status, created = call(url, "POST", "/v1/sessions", {"prime_text": "To be", "session_id": "http-a"})
    assert status == 201 and created["session"]["offset"] == 5 and created["vocab"]
    assert call(url, "POST", "/v1/sessions", {"session_id": "http-a"})[0] == 409
    status, got = call(url, "GET", "/v1/sessions/http-a")
    assert status == 200 and got["session"]["session_id"] == "http-a" and got["session"]["rewind_limit"] == 5
    status, listed = call(url, "GET", "/v1/sessions?page_size=1000")
    assert status == 200 and "http-a" in {s["session_id"] for s in listed["sessions"]}
    status, forked = call(url, "POST", "/v1/sessions/http-a/fork", {"session_id": "http-b"})
    assert status == 201 and forked["session"]["offset"] == 5
    status, rewound = call(url, "POST", "/v1/sessions/http-a/rewind", {"chars": 2, "top_k": 4})
    assert status == 200 and rewound["session"]["offset"] == 3 and len(rewound["next"]["top_prob"]) == 4
    assert call(url, "POST", "/v1/sessions/http-a/rewind", {"chars": 99})[0] == 412
    status, exported = call(url, "GET", "/v1/sessions/http-b/export")
    assert status == 200 and base64.b64decode(exported["blob"])
    status, imported = call(
        url, "POST", "/v1/sessions/import", {"blob": exported["blob"], "session_id": "http-c"}
    )
    assert status == 201 and imported["session"]["offset"] == 5
    assert call(url, "POST", "/v1/sessions/import", {"blob": base64.b64encode(b"junk").decode()})[0] == 400
    status, reset = call(url, "POST", "/v1/sessions/http-b/reset")
    assert status == 200 and reset["session"]["offset"] == 0
    for sid in ("http-a", "http-b", "http-c"):
        assert call(url, "DELETE", f"/v1/sessions/{sid}")[0] == 200
    status, gone = call(url, "GET", "/v1/sessions/http-a")
    assert status == 404 and gone["error"]["details"]["reason"] == "closed"
    assert call(url, "GET", "/v1/sessions/bad%20id")[0] == 400


def test_predict_complete_models_and_events(server: ServerProcess) -> None:
    url = server.http_url
    status, reply = call(url, "POST", "/v1/predict", {"text": "hello", "top_k": 2})
    p = reply["predictions"]
    assert status == 200 and p["count"] == 5 and len(p["top_chars"]) == 10 and len(p["surprisal_bits"]) == 5
    assert call(url, "POST", "/v1/predict", {"text": ""})[0] == 400
    assert call(url, "POST", "/v1/predict", {"text": "h", "top_k": 10_000})[0] == 400
    assert call(url, "POST", "/v1/predict", {"text": "h", "model": {"name": "nosuch"}})[0] == 404
    status, done = call(url, "POST", "/v1/complete", {"prime_text": "hello wor", "n": 2})
    assert status == 200 and len(done["completions"]) == 2
    assert call(url, "POST", "/v1/complete", {"n": 99})[0] == 400
    status, models = call(url, "GET", "/v1/models")
    assert status == 200 and models["default_model"]["name"] == "default"
    status, described = call(url, "GET", "/v1/models/default?version=1")
    assert status == 200 and described["info"]["model"]["version"] == 1
    assert call(url, "GET", "/v1/models/nosuch")[0] == 404
    status, history = call(url, "GET", "/v1/models/default/history")
    assert status == 200 and history["records"]
    status, stream = events(url, "/v1/generate", {"length": 70, "seed": 3, "prime_text": "hello"})
    assert status == 200 and sum(len(d["text"]) for _, d in stream) == 70 and stream[-1][1]["offset"] == 75
    status, refused = events(url, "/v1/generate", {"length": 0})
    assert status == 400 and refused[0][1]["error"]["code"] == "INVALID_ARGUMENT"
    status, jobs = call(url, "GET", "/v1/jobs")
    assert status == 200 and "jobs" in jobs
    assert call(url, "POST", "/v1/jobs/job-none/cancel")[0] == 404
    assert call(url, "POST", "/v1/jobs/job-none/resume")[0] == 404
    assert events(url, "/v1/jobs/job-none/watch", method="GET")[0] == 404
    assert call(url, "GET", "/v1/health") == (200, {"status": "SERVING"})


def test_the_openapi_document_is_committed_and_names_every_route(server: ServerProcess) -> None:
    committed = (Path(openapi.__file__).parent / "openapi.json").read_text()
    assert committed == openapi.render(), (
        "run: python -m nextchar.server.httpapi.openapi > server/httpapi/openapi.json"
    )
    status, served = call(server.http_url, "GET", "/openapi.json")
    assert status == 200 and served == json.loads(committed)
    documented = {(m.upper(), p) for p, ops in served["paths"].items() for m in ops}
    routes = {(r.method, r.path) for r in (*ROUTES, *EVENT_ROUTES)}
    routes |= {("POST", "/v1/predict"), ("GET", "/v1/stream"), ("GET", "/v1/health")}
    assert routes == documented


# ---------------------------------------------------------------- the WebSocket stream, and parity


def test_adaptive_sessions_over_http_and_the_websocket(server: ServerProcess) -> None:
    """adapt on POST /v1/sessions, /v1/predict and a WebSocket stream's first frame; the session
    reports it; a WebSocket-opened adaptive session continues over gRPC with its adapter."""
    text = "hello world " * 4
    status, created = call(server.http_url, "POST", "/v1/sessions", {"adapt": True})
    assert status == 201 and created["session"]["adaptive"] is True
    status, once = call(server.http_url, "POST", "/v1/predict", {"text": text, "adapt": True})
    adapted_bits = once["predictions"]["surprisal_bits"]
    status, plain = call(server.http_url, "POST", "/v1/predict", {"text": text})
    assert status == 200 and sum(adapted_bits[21:]) < sum(plain["predictions"]["surprisal_bits"][21:])

    async def over_ws() -> list[Any]:
        replies, code = await ws_exchange(server.http_url, [{"text": text, "adapt": True}])
        assert code is None
        return replies

    sid = asyncio.run(over_ws())[0]["session_id"]
    info = server.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10).session
    assert info.adaptive and info.adapt_steps == len(text) // 20
    blob = server.stub.ExportSession(pb.ExportSessionRequest(session_id=sid), timeout=10).blob
    assert pb.SessionSnapshot.FromString(blob).adapter


def test_a_websocket_stream_gives_what_grpc_gives_bit_for_bit(server: ServerProcess) -> None:
    """One text fed over the WebSocket and the same over gRPC: identical predictions, float for
    float; then the WebSocket's session is continued over gRPC and ends where one run would."""
    text = "To be, or not to be"

    async def over_ws() -> list[Any]:
        frames = [{"text": text[:7], "top_k": 3, "full_distribution": True}, {"text": text[7:], "top_k": 3}]
        replies, code = await ws_exchange(server.http_url, frames)
        assert code is None
        return replies

    replies = asyncio.run(over_ws())
    grpc_reply = server.stub.Predict(pb.PredictRequest(text=text, top_k=3), timeout=10).predictions
    ws_top = [i for r in replies for i in r["predictions"]["top_index"]]
    ws_prob = np.array([p for r in replies for p in r["predictions"]["top_prob"]], dtype=np.float32)
    ws_bits = np.array([b for r in replies for b in r["predictions"]["surprisal_bits"]], dtype=np.float32)
    assert ws_top == list(grpc_reply.top_index)
    np.testing.assert_array_equal(ws_prob, np.array(grpc_reply.top_prob, dtype=np.float32))
    np.testing.assert_array_equal(ws_bits, np.array(grpc_reply.surprisal_bits, dtype=np.float32))
    assert (
        "vocab" in replies[0] and "vocab" not in replies[1] and replies[1]["predictions"]["start_offset"] == 7
    )
    sid = replies[0]["session_id"]
    more = server.stub.Predict(
        pb.PredictRequest(session_id=sid, text="!", top_k=3, expect_offset=len(text)), timeout=10
    )
    once = server.stub.Predict(pb.PredictRequest(text=text + "!", top_k=3), timeout=10).predictions
    assert list(more.predictions.top_index) == list(once.top_index)[-3:]


def test_websocket_rewind_and_resume(server: ServerProcess) -> None:
    async def go() -> None:
        replies, _ = await ws_exchange(
            server.http_url, [{"text": "hello"}, {"rewind": 2}, {"text": "p!", "rewind": 1}]
        )
        sid = replies[0]["session_id"]
        assert replies[1]["rewound"]["offset"] == 3 and len(replies[1]["rewound"]["top_chars"]) == 3
        assert replies[2]["predictions"]["start_offset"] == 2
        again, code = await ws_exchange(
            server.http_url, [{"session_id": sid, "text": "x", "expect_offset": 4}]
        )
        assert code is None and again[0]["predictions"]["start_offset"] == 4
        refused, code = await ws_exchange(
            server.http_url, [{"session_id": sid, "text": "x", "expect_offset": 1}]
        )
        assert code == 4412 and refused[0]["error"]["details"]["offset"] == "5"

    asyncio.run(go())


# ---------------------------------------------------------------- hostile clients


@pytest.mark.parametrize(
    ("path", "data", "status"),
    [
        ("/v1/predict", b"{not json", 400),
        ("/v1/predict", b"\xff\xfe", 400),
        ("/v1/predict", b"[1, 2]", 400),
        ("/v1/predict", b'{"text": ["a"]}', 400),
        ("/v1/predict", b'{"text": "a", "no_such_field": 1}', 400),
        ("/v1/predict", b'{"text": "a", "top_k": -1}', 400),
        ("/v1/sessions", b'{"model": "default"}', 400),
        ("/v1/sessions", b'{"prime_text": "' + b"a" * 2_000_000 + b'"}', 413),
        ("/v1/predict", b'{"text": "' + b"a" * 5000 + b'"}', 400),
        ("/v1/nowhere", b"{}", 404),
    ],
)
def test_malformed_requests_get_their_status_never_a_500(
    server: ServerProcess, path: str, data: bytes, status: int
) -> None:
    got, body = call(server.http_url, "POST", path, data=data)
    assert got == status, body
    assert body["error"]["code"] and body["error"]["message"] and "Traceback" not in json.dumps(body)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x00\x01binary", 4400),
        ("{not json", 4400),
        ('["a list"]', 4400),
        ('{"text": 5}', 4400),
        ('{"text": ""}', 4400),
        ('{"session_id": "no-such-session", "text": "a"}', 4404),
    ],
)
def test_bad_websocket_frames_close_with_their_status(
    server: ServerProcess, frame: str | bytes, code: int
) -> None:
    replies, closed = asyncio.run(ws_exchange(server.http_url, [frame]))
    assert closed == code and replies and replies[0]["error"]["code"]


def test_invalid_utf8_in_a_text_frame_closes_the_socket_and_hurts_nobody(server: ServerProcess) -> None:
    """A text frame that is not UTF-8, written as raw bytes: the protocol says close (1007)."""
    host, port = server.http_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert b"101" in sock.recv(4096).split(b"\r\n")[0]
        payload, mask = b"\xff\xfe\xfd", b"\x01\x02\x03\x04"
        sock.sendall(
            bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        )
        answer = sock.recv(4096)
        assert answer[0] & 0x0F == 0x8 and int.from_bytes(answer[2:4], "big") == 1007  # a close frame, 1007
    assert call(server.http_url, "POST", "/v1/predict", {"text": "still fine"})[0] == 200


def test_a_token_guards_every_api_route_and_the_socket(tmp_path: Path) -> None:
    make_registry(tmp_path, versions=1)
    srv = ServerProcess(tmp_path, "--http-port", "0", "--token", TOKEN)
    try:
        url, auth = srv.http_url, {"Authorization": f"Bearer {TOKEN}"}
        assert call(url, "POST", "/v1/predict", {"text": "a"})[0] == 401
        assert (
            call(url, "POST", "/v1/predict", {"text": "a"}, headers={"Authorization": "Bearer nope"})[0]
            == 401
        )
        assert call(url, "POST", "/v1/predict", {"text": "a"}, headers=auth)[0] == 200
        assert call(url, "GET", "/v1/health")[0] == 200  # probes need no token
        with pytest.raises(aiohttp.WSServerHandshakeError):
            asyncio.run(ws_exchange(url, [{"text": "a"}]))
        replies, code = asyncio.run(ws_exchange(url, [{"text": "a"}], f"?access_token={TOKEN}"))
        assert code is None and replies[0]["predictions"]["count"] == 1
    finally:
        srv.close()


def test_idle_sockets_count_as_open_calls_and_the_idlest_makes_room(tmp_path: Path) -> None:
    """WebSockets share gRPC's max_streams: past it the socket idle the longest is closed (4429)."""
    make_registry(tmp_path, versions=1)
    srv = ServerProcess(tmp_path, "--http-port", "0", "--max-streams", "3")

    async def go() -> None:
        async with aiohttp.ClientSession() as http:
            idle = [await http.ws_connect(srv.http_url + "/v1/stream") for _ in range(3)]
            await asyncio.sleep(0.2)
            async with http.ws_connect(srv.http_url + "/v1/stream") as fresh:
                await fresh.send_str(json.dumps({"text": "ok"}))
                assert json.loads((await fresh.receive(timeout=10)).data)["predictions"]["count"] == 2
            first = await idle[0].receive(timeout=10)
            assert (
                first.type == aiohttp.WSMsgType.TEXT
                and json.loads(first.data)["error"]["details"]["limit"] == "max_streams"
            )
            await idle[0].receive(timeout=10)
            assert idle[0].close_code == 4429
            for ws in idle:
                await ws.close()

    try:
        asyncio.run(go())
    finally:
        srv.close()


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes sock within the time (whatever it writes first)."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True  # reset: closed
    return True


def test_idle_and_trickling_http_connections_are_closed_and_cost_others_nothing(tmp_path: Path) -> None:
    """500 connections that never send a request and one that trickles its headers a byte at a
    time: a normal request is served meanwhile, and all of them are closed after
    max_connection_idle (they held a file descriptor each, for good)."""
    make_registry(tmp_path, versions=1)
    srv = ServerProcess(tmp_path, "--http-port", "0", "--max-connection-idle", "2")
    host, port = srv.http_url.removeprefix("http://").split(":")
    idle: list[socket.socket] = []
    try:
        idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(500)]
        trickler = idle[0]
        trickler.sendall(b"GET /v1/health HTTP/1.1\r\n")
        assert call(srv.http_url, "POST", "/v1/predict", {"text": "still served"})[0] == 200
        deadline = time.monotonic() + 2.5
        for byte in b"Host: x\r\nX-Slow: 1":  # one byte a ~0.1 s, past the idle time
            if time.monotonic() > deadline:
                break
            with contextlib.suppress(OSError):
                trickler.sendall(bytes([byte]))
            time.sleep(0.1)
        assert all(closed_by_server(sock, within=8.0) for sock in idle)
        assert call(srv.http_url, "GET", "/v1/health")[0] == 200
    finally:
        for sock in idle:
            sock.close()
        srv.close()


def test_websocket_clients_that_never_read_hold_a_bounded_share(tmp_path: Path) -> None:
    """20 sockets send 4,096-character chunks with full distributions (~1 MB a reply) and never
    read: the server stops reading each once its replies back up (one written reply per
    stream, the rest refused by the reply budget), keeps answering others, and its memory stays
    bounded."""
    make_registry(tmp_path, versions=1)
    srv = ServerProcess(tmp_path, "--http-port", "0", "--max-reply-bytes", str(8 << 20))
    host, port = srv.http_url.removeprefix("http://").split(":")
    frame = json.dumps({"text": "hello world " * 341, "full_distribution": True}).encode()
    socks: list[socket.socket] = []
    try:
        before = srv.rss_kb()
        for _ in range(20):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(
                b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            mask = b"\x01\x02\x03\x04"
            masked = bytes(b ^ mask[i % 4] for i, b in enumerate(frame))
            header = bytes([0x81, 0x80 | 127]) + len(frame).to_bytes(8, "big") + mask
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                for _ in range(30):  # until the server stops reading: its buffers are full
                    sock.send(header + masked)
            socks.append(sock)
        time.sleep(2.0)
        held = srv.rss_kb()
        assert call(srv.http_url, "POST", "/v1/predict", {"text": "still served"})[0] == 200
        print(f"never-reading sockets: RSS {before} -> {held} KiB")
        assert held - before < 64 * 1024, f"RSS grew by {held - before} KiB"  # budget 8 MB; JSON ~3x
    finally:
        for sock in socks:
            sock.close()
        srv.close()
