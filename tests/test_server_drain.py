"""Drain on SIGTERM, with the server as a real subprocess (``python -m nextchar.server``)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nextchar.proto import nextchar_pb2 as pb
from nextchar.proto import nextchar_pb2_grpc as pb_grpc
from server_harness import make_registry, take


class Subprocess:
    def __init__(self, model_dir: Path, grace: float) -> None:
        cmd = [sys.executable, "-m", "nextchar.server", "--port", "0", "--model-dir", str(model_dir)]
        cmd += ["--grace", str(grace)]
        self.proc = subprocess.Popen(
            cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.port = self._wait_for_port()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.NextCharServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            self.lines.put(line)

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            match = re.search(r"serving on [\d.]+:(\d+)", line)
            if match:
                return int(match.group(1))
        raise AssertionError("server did not start:\n" + "".join(self.log))

    def status(self) -> int:
        return int(self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status)

    def close(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    make_registry(tmp_path, versions=1)
    return tmp_path


@pytest.fixture
def server(model_dir: Path, request: pytest.FixtureRequest) -> Iterator[Subprocess]:
    proc = Subprocess(model_dir, grace=getattr(request, "param", 10.0))
    yield proc
    proc.close()


def open_stream(
    stub: pb_grpc.NextCharServiceStub,
) -> tuple[queue.Queue[pb.PredictStreamRequest | None], grpc.CallIterator[pb.PredictStreamResponse]]:
    feed: queue.Queue[pb.PredictStreamRequest | None] = queue.Queue()
    return feed, stub.PredictStream(iter(feed.get, None), timeout=30)


def wait_not_serving(server: Subprocess) -> None:
    deadline = time.monotonic() + 5
    while server.status() != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "health never turned NOT_SERVING"
        time.sleep(0.02)


def test_sigterm_drains_live_streams_finish_then_exit(server: Subprocess) -> None:
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
def test_sigterm_closes_streams_still_open_after_the_grace(server: Subprocess) -> None:
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
