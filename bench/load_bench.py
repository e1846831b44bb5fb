"""Load benchmark: many concurrent streaming sessions held for a long time, zero errors allowed.

Run: ``make bench-load`` (or ``python bench/load_bench.py [--sessions 1000] [--duration 60]``).

The server runs as its own process (``python -m nextchar.cli serve``, the H=256 rnn of
serve_bench.py); the load comes from separate client processes (grpc.aio), each
holding its share of the sessions as ping-pong PredictStreams (one chunk out, its
reply back, again) for the whole run. Every reply is checked: its offset must
continue the session's, any RPC error counts. Meanwhile the server's resident memory
(its process and its compute worker) is sampled once a second; after the warm-up it
must be flat, and its slope is reported. Reported: errors, sessions held (counted by
the server's ListSessions at the end), p50/p99 per-message latency, characters/s,
and the memory slope. JSON goes to ``bench/results/load-<time>.json`` (or ``--out``);
a short table is printed. tests/test_load.py runs a short version of this script.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads OpenBLAS

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_env import unpin_this_process
from serve_bench import RESULTS, corpus, server_command, start

# latency histogram shared by all client processes: log-spaced 10 µs .. 100 s
LATENCY_EDGES = np.logspace(-5, 2, 701)  # seconds
STREAMS_PER_CHANNEL = 100


# ---------------------------------------------------------------- client process


async def hold(
    port: int, sessions: int, first: int, chunk: int, duration: float, warmup: float
) -> dict[str, Any]:
    """Hold `sessions` ping-pong streams for warmup + duration seconds; count what came back."""
    import grpc
    from nextchar.proto import nextchar_pb2 as pb
    from nextchar.proto import nextchar_pb2_grpc as pb_grpc

    text = corpus()
    channels: list[Any] = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(max(1, sessions // STREAMS_PER_CHANNEL))
    ]
    stubs: list[Any] = [pb_grpc.NextCharServiceStub(c) for c in channels]  # grpc-stubs predate aio streams
    counts = np.zeros(len(LATENCY_EDGES) - 1, dtype=np.int64)
    totals = {"messages": 0, "chars": 0}
    errors: list[str] = []
    t0 = time.perf_counter()
    begin, end = t0 + warmup, t0 + warmup + duration

    async def one(i: int) -> None:
        call = stubs[i % len(stubs)].PredictStream()
        pos = ((first + i) * 7919) % (len(text) - chunk)
        offset = 0
        try:
            while True:
                sent = time.perf_counter()
                await call.write(pb.PredictStreamRequest(text=text[pos : pos + chunk]))
                reply = await call.read()
                got = time.perf_counter()
                if reply is grpc.aio.EOF:  # type: ignore[attr-defined]  # untyped in grpc-stubs
                    errors.append("stream ended early")
                    return
                if reply.predictions.start_offset != offset or reply.predictions.count != chunk:
                    errors.append(f"offset {reply.predictions.start_offset} != {offset}")
                    return
                offset += chunk
                pos = (pos + chunk) % (len(text) - chunk)
                if sent >= begin and got <= end:
                    counts[np.searchsorted(LATENCY_EDGES, got - sent) - 1] += 1
                    totals["messages"] += 1
                    totals["chars"] += chunk
                if got > end:
                    break
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                pass
        except grpc.aio.AioRpcError as exc:
            errors.append(f"{exc.code().name} at {time.perf_counter() - t0:.1f} s: {exc.details()}")

    await asyncio.gather(*(one(i) for i in range(sessions)))
    for channel in channels:
        await channel.close()
    return {
        "sessions": sessions,
        **totals,
        "errors": len(errors),
        "first_errors": errors[:5],
        "hist": counts.tolist(),
    }


# ---------------------------------------------------------------- orchestration


def rss_kb(pid: int) -> int:
    """Resident memory of pid and its children (the compute worker), KiB; 0 once gone."""
    total = 0
    children = Path(f"/proc/{pid}/task/{pid}/children")
    pids = [pid, *(int(p) for p in children.read_text().split())] if children.exists() else [pid]
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def percentile(counts: np.ndarray, q: float) -> float | None:
    """The q-th percentile of the merged histogram, in ms (upper edge of its bin)."""
    if counts.sum() == 0:
        return None
    cumulative = np.cumsum(counts)
    i = int(np.searchsorted(cumulative, q / 100 * cumulative[-1]))
    return float(LATENCY_EDGES[i + 1] * 1000)


def sessions_on_server(port: int) -> int:
    import grpc
    from nextchar.proto import nextchar_pb2 as pb
    from nextchar.proto import nextchar_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.NextCharServiceStub(channel)
        return int(stub.ListSessions(pb.ListSessionsRequest(page_size=1), timeout=10).total)


def run(sessions: int, duration: float, warmup: float, chunk: int, clients: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        server, port = start([*server_command(tmp), "--max-sessions", str(2 * sessions)])
        log: list[str] = []  # drained, or a full stderr pipe would stall the server's logging
        assert server.stderr is not None
        stderr = server.stderr
        threading.Thread(target=lambda: log.extend(stderr), daemon=True).start()
        try:
            shares = [sessions // clients + (i < sessions % clients) for i in range(clients)]
            procs = [
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--client",
                        *map(str, (port, n, sum(shares[:i]), chunk, duration, warmup)),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for i, n in enumerate(shares)
            ]
            t0 = time.monotonic()
            samples: list[tuple[float, int]] = []
            while any(p.poll() is None for p in procs) and time.monotonic() - t0 < warmup + duration + 120:
                samples.append((time.monotonic() - t0, rss_kb(server.pid)))
                time.sleep(1.0)
            outputs = [p.communicate(timeout=60) for p in procs]
            held = sessions_on_server(port)
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
    reports = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"load client failed:\n{err}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    hist = np.sum([np.array(r["hist"]) for r in reports], axis=0)
    steady = [(t, kb) for t, kb in samples if t >= warmup + 1.0]
    slope = (
        float(np.polyfit([t for t, _ in steady], [kb for _, kb in steady], 1)[0])
        if len(steady) >= 3
        else None
    )
    return {
        "benchmark": "load",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0],  # the machine is shared: context for the figures
        },
        "config": {
            "sessions": sessions,
            "duration_s": duration,
            "warmup_s": warmup,
            "chunk": chunk,
            "clients": clients,
        },
        "errors": sum(r["errors"] for r in reports),
        "first_errors": [e for r in reports for e in r["first_errors"]][:5],
        "sessions_held": held,
        "messages": int(hist.sum()),
        "chars_per_sec": sum(r["chars"] for r in reports) / duration,
        "messages_per_sec": int(hist.sum()) / duration,
        "p50_ms": percentile(hist, 50),
        "p99_ms": percentile(hist, 99),
        "rss_kb": {
            "start": samples[0][1] if samples else None,
            "after_warmup": steady[0][1] if steady else None,
            "end": steady[-1][1] if steady else None,
            "max": max(kb for _, kb in samples) if samples else None,
            "slope_kb_per_s": slope,  # least squares over the samples after the warm-up
        },
        "rss_samples": samples,
        "server_log_tail": log[-20:],
    }


def print_table(result: dict[str, Any]) -> None:
    rss = result["rss_kb"]
    slope = rss["slope_kb_per_s"]
    rows = [
        ("sessions held", f"{result['sessions_held']:,}"),
        ("errors", f"{result['errors']}"),
        ("messages", f"{result['messages']:,}"),
        ("chars/s", f"{result['chars_per_sec']:,.0f}"),
        ("p50 / p99 per message", f"{result['p50_ms']:.2f} / {result['p99_ms']:.2f} ms"),
        (
            "server RSS after warm-up -> end",
            f"{rss['after_warmup'] / 1024:.1f} -> {rss['end'] / 1024:.1f} MiB",
        ),
        ("RSS slope after warm-up", "n/a" if slope is None else f"{slope:+.1f} KiB/s"),
    ]
    for name, value in rows:
        print(f"  {name:<34} {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring")
    parser.add_argument("--chunk", type=int, default=1, help="characters per message")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/load-<time>.json)")
    parser.add_argument("--client", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        port, n, first, chunk = (int(v) for v in args.client[:4])
        duration, warmup = float(args.client[4]), float(args.client[5])
        print(json.dumps(asyncio.run(hold(port, n, first, chunk, duration, warmup))))
        return
    result = run(args.sessions, args.duration, args.warmup, args.chunk, args.clients)
    out = args.out or RESULTS / f"load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"load: {args.sessions} sessions x {args.duration:g} s, {args.chunk}-char messages -> {out}")
    print_table(result)


if __name__ == "__main__":
    unpin_this_process()  # no OpenBLAS pin for the measured processes (bench_env); children inherit
    main()
