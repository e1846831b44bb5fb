"""Drain on SIGTERM, with the server as a real subprocess (``python -m nextchar.cli serve``)."""

from __future__ import annotations

import queue
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from nextchar.proto import nextchar_pb2 as pb
from nextchar.proto import nextchar_pb2_grpc as pb_grpc
from server_harness import ServerProcess, make_registry, take


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    make_registry(tmp_path, versions=1)
    return tmp_path


@pytest.fixture
def server(model_dir: Path, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    proc = ServerProcess(model_dir, "--grace", str(getattr(request, "param", 10.0)))
    yield proc
    proc.close()


def open_stream(
    stub: pb_grpc.NextCharServiceStub,
) -> tuple[queue.Queue[pb.PredictStreamRequest | None], grpc.CallIterator[pb.PredictStreamResponse]]:
    feed: queue.Queue[pb.PredictStreamRequest | None] = queue.Queue()
    return feed, stub.PredictStream(iter(feed.get, None), timeout=30)


def wait_not_serving(server: ServerProcess) -> None:
    deadline = time.monotonic() + 5
    while server.status() != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "health never turned NOT_SERVING"
        time.sleep(0.02)


def test_sigterm_drains_live_streams_finish_then_exit(server: ServerProcess) -> None:
    feed, call = open_stream(server.stub)
    feed.put(pb.PredictStreamRequest(text="hello"))
    sid = take(call).session_id
    server.proc.send_signal(signal.SIGTERM)
    wait_not_serving(server)
    with pytest.raises(grpc.RpcError) as err:
        server.stub.CreateSession(pb.CreateSessionRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    feed.put(pb.PredictStreamRequest(text=" world"))  # the live stream keeps working while draining
    reply = take(call)
    assert reply.session_id == sid and reply.predictions.start_offset == 5
    feed.put(None)
    assert list(call) == []
    assert server.proc.wait(10) == 0  # last stream done: exits well before the 10 s grace


@pytest.mark.parametrize("server", [1.0], indirect=True)
def test_sigterm_closes_streams_still_open_after_the_grace(server: ServerProcess) -> None:
    feed, call = open_stream(server.stub)
    feed.put(pb.PredictStreamRequest(text="hello"))
    take(call)
    start = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    with pytest.raises(grpc.RpcError):
        take(call)  # never answered: the stream idles until the server closes it
    assert server.proc.wait(10) == 0
    assert 0.8 <= time.monotonic() - start < 8
    feed.put(None)
