"""What the shared session store costs: the same traffic against the in-memory and the Redis store.

    python bench/store_bench.py [--seconds 4] [--streams 16]

Starts a throwaway redis-server (no persistence) and, per store mode, one server
process (``python -m nextchar.cli serve --compute-in-thread``, the shipped default model) on
loopback; measures a 1-character ping-pong stream (p50/p99 per message) and
64-character chunks from --streams concurrent streams (characters/s), and the server's CPU
per message for each (its threads included; the figure to compare builds by). Modes:
memory, redis (state written after every message), redis with
--store-write-every 256. Under a minute; JSON lands in bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from bench_env import unpin_this_process
from nextchar.proto import nextchar_pb2 as pb
from nextchar.proto import nextchar_pb2_grpc as pb_grpc
from serve_bench import cpu_seconds

RESULTS = Path(__file__).parent / "results"
TEXT = "hello world " * 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model_dir: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "nextchar.cli", "serve", "--port", "0", "--model-dir", str(model_dir)]
    proc = subprocess.Popen([*cmd, "--compute-in-thread", *args], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines: queue.Queue[str] = queue.Queue()
    stderr = proc.stderr

    def pump() -> None:
        for line in stderr:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = lines.get(timeout=60)
        if match := re.search(r"serving on [\d.]+:(\d+)", line):
            return proc, f"127.0.0.1:{match.group(1)}"
    raise RuntimeError("server did not start")


def ping_pong(stub: pb_grpc.NextCharServiceStub, n: int) -> list[float]:
    """One stream, one character per message, the next sent when the reply is in: seconds per message."""
    ready: queue.Queue[None] = queue.Queue()
    times: list[float] = []

    def requests() -> Iterator[pb.PredictStreamRequest]:
        for i in range(n):
            times.append(time.perf_counter())
            yield pb.PredictStreamRequest(text=TEXT[i % len(TEXT)], top_k=3)
            ready.get()

    lat = []
    for i, _ in enumerate(stub.PredictStream(requests(), timeout=120)):
        lat.append(time.perf_counter() - times[i])
        ready.put(None)
    return lat[50:]  # warm-up


def chunks(stub: pb_grpc.NextCharServiceStub, streams: int, seconds: float) -> float:
    """streams concurrent streams of 64-character chunks, each waiting for its reply: characters/s."""
    stop = time.perf_counter() + seconds
    counts = [0] * streams

    def one(i: int) -> None:
        ready: queue.Queue[None] = queue.Queue()

        def requests() -> Iterator[pb.PredictStreamRequest]:
            j = 0
            while time.perf_counter() < stop:
                yield pb.PredictStreamRequest(text=TEXT[j % 64 : j % 64 + 64], top_k=3)
                j += 1
                ready.get()

        for r in stub.PredictStream(requests(), timeout=seconds + 30):
            counts[i] += r.predictions.count
            ready.put(None)

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def measure(model_dir: Path, args: list[str], seconds: float, streams: int) -> dict[str, Any]:
    proc, address = start_server(model_dir, *args)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.NextCharServiceStub(channel)
            cpu0 = cpu_seconds(proc.pid)
            lat = np.array(ping_pong(stub, 1500)) * 1000
            cpu1, t1 = cpu_seconds(proc.pid), time.perf_counter()
            throughput = chunks(stub, streams, seconds)
            cpu2, t2 = cpu_seconds(proc.pid), time.perf_counter()
    finally:
        proc.terminate()
        proc.wait(30)
    # the server's CPU per message varies far less between runs than latency or throughput on a
    # shared machine: the figure to compare builds by
    ping_pong_cpu = (cpu1 - cpu0) / 1500 if cpu0 is not None and cpu1 is not None else None
    chunk_cpu = (
        (cpu2 - cpu1) / (throughput * (t2 - t1) / 64) if cpu1 is not None and cpu2 is not None else None
    )
    return {
        "ping_pong_p50_ms": float(np.percentile(lat, 50)),
        "ping_pong_p99_ms": float(np.percentile(lat, 99)),
        "chunk64_chars_per_sec": throughput,
        "ping_pong_server_us_per_message": ping_pong_cpu * 1e6 if ping_pong_cpu is not None else None,
        "chunk64_server_us_per_message": chunk_cpu * 1e6 if chunk_cpu is not None else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per throughput run")
    parser.add_argument("--streams", type=int, default=16)
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("store_bench: redis-server is not installed (apt-get install redis-server)")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        redis = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                tmp,
            ],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(0.3)
        url = f"redis://127.0.0.1:{port}/0"
        modes = {
            "memory": [],
            "redis": ["--store", url],
            "redis_write_every_256": ["--store", url, "--store-write-every", "256"],
        }
        try:
            out = {
                name: measure(Path(tmp) / "models", m, args.seconds, args.streams)
                for name, m in modes.items()
            }
        finally:
            redis.kill()
            redis.wait()
    for name, r in out.items():
        print(
            f"{name:24s} ping-pong p50 {r['ping_pong_p50_ms']:.3f} ms  p99 {r['ping_pong_p99_ms']:.3f} ms  "
            f"64-char chunks x{args.streams}: {r['chunk64_chars_per_sec']:,.0f} chars/s  server CPU per "
            f"message: ping-pong {r['ping_pong_server_us_per_message'] or 0:.0f} us, "
            f"chunks {r['chunk64_server_us_per_message'] or 0:.0f} us"
        )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"store-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"streams": args.streams, "seconds": args.seconds, "results": out}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    unpin_this_process()  # no OpenBLAS pin for the measured processes (bench_env); children inherit
    main()
