"""What a client connection may hold: a connection with no call open is closed after
max_connection_idle, however faithfully it answers PINGs; one with a call open is kept; the
server takes all the file descriptors its hard limit allows."""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from nextchar.proto import nextchar_pb2 as pb
from nextchar.proto import nextchar_pb2_grpc as pb_grpc
from raw_http2 import RawConnection
from server_harness import ServerProcess, make_registry, take


def test_a_connection_that_only_answers_pings_is_closed_once_idle(tmp_path: Path) -> None:
    """A raw HTTP/2 client that completes the handshake, answers every keepalive PING and opens
    no call: the server pings it (so it is alive), and closes it all the same after
    max_connection_idle, with GOAWAY then EOF (it used to keep it, and its fd, for good)."""
    make_registry(tmp_path, versions=1)
    srv = ServerProcess(tmp_path, "--max-connection-idle", "3", "--keepalive-time", "0.5")
    conn = RawConnection(srv.port)
    try:
        start = time.monotonic()
        ended = conn.serve_pings(until=start + 30)
        waited = time.monotonic() - start
        assert ended == "goaway", (ended, waited)
        assert conn.pings >= 2  # it was alive, and said so
        assert 1.0 < waited < 20, waited  # about 3 s (gRPC adds jitter), not at once
        assert conn.serve_pings(until=time.monotonic() + 10) == "eof"
    finally:
        conn.close()
        srv.close()


def test_a_connection_with_a_stream_open_is_kept_past_the_idle_time(tmp_path: Path) -> None:
    """Idle means no call open: a PredictStream that waits three idle times between two
    messages keeps its connection and its session."""
    make_registry(tmp_path, versions=1)
    srv = ServerProcess(tmp_path, "--max-connection-idle", "1")
    second = threading.Event()

    def requests() -> Iterator[pb.PredictStreamRequest]:
        yield pb.PredictStreamRequest(text="to be")
        second.wait(30)
        yield pb.PredictStreamRequest(text=" or")

    try:
        with grpc.insecure_channel(srv.address) as channel:
            replies = pb_grpc.NextCharServiceStub(channel).PredictStream(requests(), timeout=30)
            first = take(replies)
            time.sleep(3.0)  # the idle time to pass, three times over: nothing to wait for
            second.set()
            later = take(replies)
            assert later.session_id == first.session_id
            assert later.predictions.start_offset == 5
    finally:
        srv.close()


def test_the_server_raises_its_soft_fd_limit_to_the_hard_one(tmp_path: Path) -> None:
    """Started with the soft limit a shell often hands down (here 512), the server takes its hard
    limit: each connection holds a descriptor."""
    make_registry(tmp_path, versions=1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(512, hard), hard))
    try:
        srv = ServerProcess(tmp_path)  # inherits the lowered soft limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        limits = Path(f"/proc/{srv.proc.pid}/limits").read_text()
        line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)], line
    finally:
        srv.close()
