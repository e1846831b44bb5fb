"""What clients cause is logged through a flood gate: a flood of bad calls costs a bounded number
of log lines, and says how many it left out."""

from __future__ import annotations

import logging
import re
import time
import urllib.request
from pathlib import Path

import grpc
from nextchar.proto import nextchar_pb2 as pb
from nextchar.server.logs import FloodGate
from raw_http2 import RawConnection
from server_harness import ServerProcess, make_registry, wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(name: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, msg, args, None)


def test_a_kind_passes_its_burst_then_its_rate_and_says_what_it_left_out() -> None:
    clock = Clock()
    gate = FloodGate("calls", rate=2.0, burst=3, clock=clock)
    refusal = "%s refused: %s"
    passed = [gate.filter(record("calls", refusal, "Get", i)) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert gate.filter(record("calls.auth", "token %s", "wrong"))  # another kind, its own burst
    assert gate.filter(record("elsewhere", refusal, "Get", 0))  # another logger: never gated
    clock.now = 0.5  # one line's worth of rate
    late = record("calls", refusal, "Get", 99)
    assert gate.filter(late) and late.getMessage() == "Get refused: 99 (and 7 more like it not logged)"
    assert not gate.filter(record("calls", refusal, "Get", 100))
    clock.now = 10.0
    seen: list[str] = []
    sink = logging.getLogger("test_log_flood.sink")
    sink.addHandler(handler := ListHandler(seen))
    try:
        gate.flush(sink)
        gate.flush(sink)  # told once
    finally:
        sink.removeHandler(handler)
    assert seen == ["1 log lines like '%s refused: %s' were not logged in the last 10 s"]


class ListHandler(logging.Handler):
    def __init__(self, out: list[str]) -> None:
        super().__init__()
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(record.getMessage())


def test_a_flood_of_bad_requests_writes_a_bounded_log_and_counts_the_rest(tmp_path: Path) -> None:
    """A real server process: 2,000 requests that are not protobuf, as fast as one client sends
    them. Each is refused INVALID_ARGUMENT, as always; the log gets the gate's burst and rate,
    and its next sweep tells how many lines it left out, so the numbers add up; the metric counts
    every one."""
    make_registry(tmp_path, versions=1)
    srv = ServerProcess(tmp_path, "--sweep-interval", "1", "--metrics-port", "0")
    try:
        metrics = next(m for line in srv.log if (m := re.search(r"metrics on (http://\S+)", line)))
        path = "/nextchar.v1.NextCharService/GetSession"
        call = srv.channel.unary_unary(path, None, None)
        start = time.monotonic()
        for _ in range(2000):
            try:
                call(b"\xff\xff\xff", timeout=5)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        flood_seconds = time.monotonic() - start

        def tally() -> tuple[list[str], int, int]:
            """The refusals logged, those their lines said were left out, and those sweeps told."""
            logged = [line for line in srv.log if "GetSession refused" in line]
            told = sum(int(m.group(1)) for line in logged if (m := re.search(r"and (\d+) more", line)))
            untold = sum(
                int(m.group(1)) for line in srv.log if (m := re.search(r"(\d+) log lines like", line))
            )
            return logged, told, untold

        def accounted() -> int:
            logged, told, untold = tally()
            return len(logged) + told + untold

        wait_until(lambda: accounted() == 2000, 20, "every refusal logged or told (sweeps at 1 s)")
        logged, told, untold = tally()
        bound = 50 + 2 * (flood_seconds + 2) + 1
        assert len(logged) <= bound, (len(logged), bound)
        assert len(logged) + told + untold == 2000
        scraped = urllib.request.urlopen(metrics.group(1), timeout=5).read().decode()
        assert 'nextchar_calls_refused_total{code="INVALID_ARGUMENT",method="GetSession"} 2000.0' in scraped
        # the server still answers, and a later refusal is logged once the flood is over
        assert srv.stub.ListModels(pb.ListModelsRequest(), timeout=5).models
    finally:
        srv.close()


def test_header_values_that_are_not_utf8_cost_a_bounded_log(tmp_path: Path) -> None:
    """gRPC's own Python layer logs an ERROR with a traceback for every header value that is not
    UTF-8, before any call reaches the token check: over raw HTTP/2, 2,000 such headers made 2,000
    tracebacks. Through the gate: its burst (each with its traceback) and rate, the rest counted by
    the sweep; the server still answers."""
    make_registry(tmp_path, versions=1)
    srv = ServerProcess(tmp_path, "--sweep-interval", "1")
    conn = RawConnection(srv.port)
    try:
        start = time.monotonic()
        for i in range(200):
            bad = [(b"x-bad-%d" % j, b"\xff\xfe" * 8) for j in range(10)]
            conn.send_call(2 * i + 1, "/nextchar.v1.NextCharService/ListModels", bad)
        srv.wait_for_line(r"log lines like 'Invalid encoding on %s' were not logged", timeout=20)
        flood_seconds = time.monotonic() - start
        logged = [line for line in srv.log if "Invalid encoding on" in line and "were not logged" not in line]
        assert logged, "the first ones stay visible"
        bound = 50 + 2 * flood_seconds + 1
        assert len(logged) <= bound, (len(logged), bound)
        assert len(srv.log) < 10 * bound  # tracebacks included
        assert srv.stub.ListModels(pb.ListModelsRequest(), timeout=5).models
    finally:
        conn.close()
        srv.close()
