"""Serving benchmark: nextchar's gRPC server vs a no-op echo server with the same messages.

Run: ``make bench-serve`` (or ``python bench/serve_bench.py [--duration S] [--rounds N]
[--cases 1x1,100x64] [--with-thread]``).

Both servers run as their own processes (nextchar via ``python -m nextchar.cli serve``,
one BLAS thread); the load comes from a separate client process (grpc.aio), one
ping-pong stream per simulated client: 1, 100 and 1,000 concurrent streams, with
1-character messages and 64-character chunks, top-3 predictions. Reported per
case: characters/s, messages/s, p50/p99 per-message latency, the server's CPU per
message (its compute process included), and the figure that counts, nextchar's
**overhead**: its CPU per message minus the echo server's minus the in-process
arithmetic that computes the same predictions (one ``inference.advance`` of the
case's batch, top-k and surprisal included, fastest of repeated calls). The goals
(issue 12) are checked and printed beside their figures. ``--with-thread`` also runs
the 64-character cases against a server that computes big batches in a thread; ``--web``
runs every case over the HTTP API's WebSocket as well (the same server process, its
server CPU per message against gRPC's: goal within 1.5x) and compares Predict calls/s,
gRPC unary against POST /v1/predict, 100 callers. ``--adapt`` also runs every case against a
server whose sessions all adapt (issue 22: its chars/s against the static server's, goals
>= 0.6 for 100 streams x 1 character and >= 0.5 for 100 x 64; ping-pong p50 <= 1.5x);
``make bench-adapt`` runs that on the default model's cell (``--cell gru``).
``--baseline DIR`` also runs every case against another checkout's server (``DIR/.venv``'s
Python, e.g. a worktree of the previous build), alternated with this one in every round: the
before/after comparison of one sitting, reported as this build's CPU per message over the
baseline's. ``--server-args "..."`` adds options to this build's server (e.g. a setting whose cost
is in question, with ``--baseline .`` for the same build without it).
Results go to ``bench/results/serve-<time>.json``; a short table is printed.

The machine is shared and noisy (±15%, and slow spells that last seconds): each case
runs ``--rounds`` times, alternating the servers, and a ratio (and the overhead) is
the median of the rounds' back-to-back figures. Compare figures within one run.

Every process runs without this machine's OpenBLAS pin (``bench_env``: a user's machine
has none); the result records the BLAS kernel and thread count that ran.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads OpenBLAS

import argparse
import asyncio
import json
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from bench_env import blas_info, unpin_this_process

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
MODEL: dict[str, Any] = {
    "cell": "rnn",
    "hidden": 256,
}  # --cell / --hidden change it (e.g. the README recipe's gru 512)
TOP_K = 3
CASES = [(1, 1), (100, 1), (1000, 1), (1, 64), (100, 64), (1000, 64)]  # (streams, chars per message)


def corpus() -> str:
    if CORPUS.is_file():
        return CORPUS.read_text()[:200_000]
    rng = np.random.default_rng(0)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'\n-&$3"))
    return "".join(rng.choice(alphabet, 200_000))


def make_model() -> Any:
    """The benchmark's model (an H=256 rnn unless --cell/--hidden say otherwise) over the corpus's
    alphabet; random weights cost the same as trained ones."""
    from nextchar.core.config import ModelConfig
    from nextchar.core.model import CharRNN
    from nextchar.core.vocab import Vocab

    return CharRNN.create(
        ModelConfig(cell=MODEL["cell"], hidden=MODEL["hidden"]), Vocab.from_text(corpus()), seed=0
    )


# ---------------------------------------------------------------- echo server (own process)


async def echo_server() -> None:
    """Answers each PredictStream request with a prebuilt reply of the same shape nextchar sends."""
    import grpc
    from nextchar.proto import nextchar_pb2 as pb
    from nextchar.proto import nextchar_pb2_grpc as pb_grpc

    replies: dict[int, Any] = {}

    def reply(n: int, first: bool) -> Any:
        if n not in replies:
            preds = pb.Predictions(
                start_offset=0,
                count=n,
                top_k=TOP_K,
                top_index=list(range(1, TOP_K + 1)) * n,
                top_prob=[0.5, 0.25, 0.125] * n,
                surprisal_bits=[1.5] * n,
            )
            replies[n] = pb.PredictStreamResponse(
                session_id="0123456789abcdef0123456789abcdef",
                model=pb.ModelRef(name="default", version=1),
                predictions=preds,
            )
        return replies[n]

    class Echo(pb_grpc.NextCharServiceServicer):
        async def PredictStream(self, request_iterator: Any, context: Any) -> Any:
            first = True
            async for request in request_iterator:
                yield reply(len(request.text), first)
                first = False

    server = grpc.aio.server()
    pb_grpc.add_NextCharServiceServicer_to_server(Echo(), server)  # type: ignore[abstract]  # only PredictStream
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


# ---------------------------------------------------------------- load client (own process)


class Window:
    """The measured window of a load run (after warmup, for duration): the messages inside it."""

    def __init__(self, duration: float, warmup: float) -> None:
        self.duration = duration
        self.t0 = time.perf_counter()
        self.begin, self.end = self.t0 + warmup, self.t0 + warmup + duration
        self.cpu0 = time.process_time()
        self.latencies: list[float] = []
        self.chars = 0
        self.errors: list[str] = []

    def record(self, sent: float, got: float, chars: int) -> bool:
        """Count a message answered at got; True once the window is over (the caller stops)."""
        if sent >= self.begin and got <= self.end:
            self.latencies.append(got - sent)
            self.chars += chars
        return got > self.end

    def summary(self, streams: int, chunk: int) -> dict[str, Any]:
        lat = np.array(self.latencies) * 1000
        return {
            "streams": streams,
            "chunk": chunk,
            "chars_per_sec": self.chars / self.duration,
            "messages_per_sec": len(self.latencies) / self.duration,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            # fraction of one core the load process used
            "client_cpu": (time.process_time() - self.cpu0) / (time.perf_counter() - self.t0),
            "error_count": len(self.errors),  # streams or calls that ended in an error
            "errors": self.errors[:3],  # the first few, as examples
        }


async def load(port: int, streams: int, chunk: int, duration: float, warmup: float) -> dict[str, Any]:
    import grpc
    from nextchar.proto import nextchar_pb2 as pb
    from nextchar.proto import nextchar_pb2_grpc as pb_grpc

    text = corpus()
    channels: list[Any] = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(max(1, streams // 100))
    ]
    stubs: list[Any] = [pb_grpc.NextCharServiceStub(c) for c in channels]  # grpc-stubs predate aio streams
    window = Window(duration, warmup)

    async def one(i: int) -> None:
        call = stubs[i % len(stubs)].PredictStream()
        pos = (i * 7919) % (len(text) - chunk)
        try:
            while True:
                msg = pb.PredictStreamRequest(text=text[pos : pos + chunk], top_k=TOP_K)
                pos = (pos + chunk) % (len(text) - chunk)
                sent = time.perf_counter()
                await call.write(msg)
                await call.read()
                if window.record(sent, time.perf_counter(), chunk):
                    break
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]  # drain to the end of the stream
                pass
        except grpc.aio.AioRpcError as exc:
            window.errors.append(f"{exc.code().name}: {exc.details()}")

    await asyncio.gather(*(one(i) for i in range(streams)))
    result = window.summary(streams, chunk)
    for channel in channels:
        await channel.close()
    return result


async def load_ws(port: int, streams: int, chunk: int, duration: float, warmup: float) -> dict[str, Any]:
    """The same ping-pong streams as ``load``, over the HTTP API's WebSocket (/v1/stream)."""
    import aiohttp

    text = corpus()
    window = Window(duration, warmup)

    async def one(http: Any, i: int) -> None:
        pos = (i * 7919) % (len(text) - chunk)
        async with http.ws_connect(f"http://127.0.0.1:{port}/v1/stream", max_msg_size=0) as ws:
            while True:
                frame = json.dumps({"text": text[pos : pos + chunk], "top_k": TOP_K})
                pos = (pos + chunk) % (len(text) - chunk)
                sent = time.perf_counter()
                await ws.send_str(frame)
                reply = await ws.receive()
                if reply.type != aiohttp.WSMsgType.TEXT or '"error"' in reply.data[:12]:
                    window.errors.append(str(reply.data)[:200])
                    return
                if window.record(sent, time.perf_counter(), chunk):
                    break

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await asyncio.gather(*(one(http, i) for i in range(streams)))
    return window.summary(streams, chunk)


async def load_unary(
    port: int, clients: int, chunk: int, duration: float, warmup: float, http: bool
) -> dict[str, Any]:
    """clients callers, each sending Predict calls one after another on its own session:
    gRPC unary (http False) or POST /v1/predict (http True)."""
    text = corpus()
    window = Window(duration, warmup)

    async def run(send: Callable[[str, str, bool], Awaitable[None]], i: int) -> None:
        pos = (i * 7919) % (len(text) - chunk)
        sid = f"bench-{i}-{os.getpid()}"
        first = True
        while True:
            piece = text[pos : pos + chunk]
            pos = (pos + chunk) % (len(text) - chunk)
            sent = time.perf_counter()
            try:
                await send(sid, piece, first)
            except Exception as exc:
                window.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                return
            first = False
            if window.record(sent, time.perf_counter(), chunk):
                break

    if http:
        import aiohttp

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            base = f"http://127.0.0.1:{port}"

            async def post(sid: str, piece: str, first: bool) -> None:
                if first:
                    async with session.post(base + "/v1/sessions", json={"session_id": sid}) as r:
                        r.raise_for_status()
                body = {"session_id": sid, "text": piece, "top_k": TOP_K}
                async with session.post(base + "/v1/predict", json=body) as r:
                    r.raise_for_status()
                    await r.read()

            await asyncio.gather(*(run(post, i) for i in range(clients)))
        return window.summary(clients, chunk)
    import grpc
    from nextchar.proto import nextchar_pb2 as pb
    from nextchar.proto import nextchar_pb2_grpc as pb_grpc

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub: Any = pb_grpc.NextCharServiceStub(channel)

    async def call(sid: str, piece: str, first: bool) -> None:
        if first:
            await stub.CreateSession(pb.CreateSessionRequest(session_id=sid))
        await stub.Predict(pb.PredictRequest(session_id=sid, text=piece, top_k=TOP_K))

    await asyncio.gather(*(run(call, i) for i in range(clients)))
    result = window.summary(clients, chunk)
    await channel.close(None)
    return result


# ---------------------------------------------------------------- in-process arithmetic


def arithmetic(cases: list[tuple[int, int]], seconds: float = 0.6) -> dict[str, float]:
    """Per case, the in-process µs per message of the fastest call that computes the same
    predictions: ONE ``inference.advance`` of all the case's streams (top-k and surprisal
    included, chunks of the case's size, one BLAS thread), divided by the streams."""
    from nextchar.core.inference import advance, initial_probs

    model = make_model()
    text = model.vocab.encode(corpus())
    out: dict[str, float] = {}
    for streams, chunk in cases:
        states = model.initial_state(streams)
        probs0 = np.repeat(initial_probs(model)[None, :], streams, axis=0)
        idx = np.stack([text[i * 97 : i * 97 + chunk] for i in range(streams)], axis=1)  # (chunk, streams)
        lens = [chunk] * streams
        best = float("inf")
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or best == float("inf"):
            start = time.perf_counter()
            advance(model, idx, lens, states, probs0, TOP_K, False)
            best = min(best, time.perf_counter() - start)
        out[f"{streams}x{chunk}"] = best / streams * 1e6
    return out


# ---------------------------------------------------------------- orchestration


HTTP_PORTS: dict[int, int] = {}  # a server's pid -> its HTTP API's port, when it serves one


def start(cmd: list[str]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        http = re.search(r"http api and playground on http://[\d.]+:(\d+)/", line)
        if http:
            HTTP_PORTS[proc.pid] = int(http.group(1))
        match = re.search(r"serving on [\d.]+:(\d+)", line)
        if match:
            # keep reading its log: a server whose stderr pipe fills up blocks on its next log line
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, int(match.group(1))
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"{cmd} did not start")


def _ticks(stat: Path) -> int:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime in clock ticks


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) of a process and its live children (the compute worker),
    from /proc; None where there is no /proc."""
    try:
        pids = [pid, *(int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
        return sum(_ticks(Path(f"/proc/{p}/stat")) for p in pids) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cpu_by_thread(pid: int) -> dict[str, float] | None:
    """cpu_seconds by where they were spent: the server's event loop (its main thread), its
    other live threads by name (gRPC's, the compute thread), its children (the compute process);
    None where there is no /proc."""
    out: dict[str, float] = {}
    hz = os.sysconf("SC_CLK_TCK")
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                name = "event loop" if task.name == str(pid) else (task / "comm").read_text().strip()
                out[name] = out.get(name, 0.0) + _ticks(task / "stat") / hz
            except OSError:  # a thread that ended meanwhile
                continue
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            out["children"] = out.get("children", 0.0) + _ticks(Path(f"/proc/{child}/stat")) / hz
    except (OSError, ValueError, IndexError):
        return None
    return out


def run_client(
    port: int, streams: int, chunk: int, duration: float, warmup: float, server_pid: int, kind: str = "grpc"
) -> dict[str, Any]:
    """One load run (kind: grpc or ws streams, grpc-unary or http-unary calls); adds the server's
    CPU use (cores, and µs per message, both sides)."""
    cpu0, threads0 = cpu_seconds(server_pid), cpu_by_thread(server_pid)
    wall0 = time.perf_counter()  # (the client's start-up included)
    cmd = [
        sys.executable,
        __file__,
        "--client",
        kind,
        str(port),
        str(streams),
        str(chunk),
        str(duration),
        str(warmup),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + warmup + 120, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    result = dict(json.loads(done.stdout.strip().splitlines()[-1]))
    cpu1, threads1, wall = cpu_seconds(server_pid), cpu_by_thread(server_pid), time.perf_counter() - wall0
    rate = result["messages_per_sec"]  # steady from the first message: warm-up included
    server_seconds = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    result["server_cpu"] = server_seconds / wall if server_seconds is not None else None  # cores
    if rate:
        # the server works only while messages flow (warm-up + measured window); the client's
        # own figure already covers exactly that span
        messages = rate * (duration + warmup)
        result["server_us_per_message"] = (
            server_seconds / messages * 1e6 if server_seconds is not None else None
        )
        if threads0 is not None and threads1 is not None:  # where it went (the event loop's share
            # is what the server's Python code moves; a thread that ended meanwhile is left out)
            result["server_us_per_message_by_thread"] = {
                name: (seconds - threads0.get(name, 0.0)) / messages * 1e6
                for name, seconds in sorted(threads1.items())
                if seconds > threads0.get(name, 0.0)
            }
            result["loop_us_per_message"] = result["server_us_per_message_by_thread"].get("event loop")
        result["client_us_per_message"] = result["client_cpu"] / rate * 1e6
    return result


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def server_command(model_dir: str, python: str = sys.executable) -> list[str]:
    """A nextchar server process on a free port, serving make_model() as the default model
    (``python``: the interpreter whose nextchar runs, this checkout's unless a baseline's)."""
    from nextchar.server.registry import Registry

    if not (Path(model_dir) / "default").exists():
        Registry(Path(model_dir)).register("default", make_model(), history=[], summary={}, promote=True)
    return [
        python,
        "-m",
        "nextchar.cli",
        "serve",
        "--port",
        "0",
        "--model-dir",
        model_dir,
        "--no-default-model",
    ]


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One server's runs of a case: each number the median over the rounds."""
    out = dict(runs[len(runs) // 2])
    for key, value in runs[0].items():
        if isinstance(value, float | int) and all(r.get(key) is not None for r in runs):
            out[key] = float(np.median([r[key] for r in runs]))
    out["errors"] = [e for r in runs for e in r["errors"]][:3]
    out["error_count"] = sum(r["error_count"] for r in runs)
    return out


def median_ratio(ours: list[dict[str, Any]], echo: list[dict[str, Any]], field: str) -> float | None:
    """The median over rounds of nextchar / echo, each round's pair measured back to back."""
    ratios = [
        r
        for r in (ratio(a.get(field), b.get(field)) for a, b in zip(ours, echo, strict=True))
        if r is not None
    ]
    return float(np.median(ratios)) if ratios else None


def main(
    duration: float,
    warmup: float,
    rounds: int,
    cases: list[tuple[int, int]],
    with_thread: bool,
    web: bool,
    adapt: bool = False,
    baseline: Path | None = None,
    server_args: list[str] | None = None,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        serve = server_command(tmp) + (server_args or [])
        if web:  # the same server answers the WebSocket and HTTP cases on its HTTP port
            serve += ["--http-port", "0"]
        servers = {"nextchar": start(serve), "echo": start([sys.executable, __file__, "--echo"])}
        if with_thread:  # big batches in a thread instead of the compute process, for comparison
            servers["nextchar_thread"] = start([*serve, "--compute-in-thread"])
        if adapt:  # every session adapts (the same model)
            servers["nextchar_adapt"] = start([*serve, "--adapt", "--max-adaptive-sessions", "5000"])
        if baseline is not None:  # another build, alternated with this one in every round
            servers["baseline"] = start(server_command(tmp, str(baseline / ".venv" / "bin" / "python")))
        rows: list[dict[str, Any]] = []
        try:
            for streams, chunk in cases:
                names = ["echo", "nextchar"] + (["nextchar_thread"] if chunk > 1 and with_thread else [])
                names += ["nextchar_adapt"] if adapt else []
                names += ["baseline"] if baseline is not None else []
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
                if web:
                    runs["nextchar_ws"] = []
                for _ in range(rounds):  # alternate, so a slow spell of the machine hits both servers
                    for name in names:
                        proc, port = servers[name]
                        runs[name].append(run_client(port, streams, chunk, duration, warmup, proc.pid))
                    if web:
                        proc, _ = servers["nextchar"]
                        ws_port = HTTP_PORTS[proc.pid]
                        runs["nextchar_ws"].append(
                            run_client(ws_port, streams, chunk, duration, warmup, proc.pid, "ws")
                        )
                row: dict[str, Any] = {"streams": streams, "chunk": chunk, "rounds": rounds, "runs": runs}
                row.update({name: median_run(runs[name]) for name in runs})
                if web:
                    row["ws_cpu_vs_grpc"] = median_ratio(
                        runs["nextchar_ws"], runs["nextchar"], "server_us_per_message"
                    )
                    row["ws_chars_vs_grpc"] = median_ratio(
                        runs["nextchar_ws"], runs["nextchar"], "chars_per_sec"
                    )
                if baseline is not None:
                    row["cpu_vs_baseline"] = median_ratio(
                        runs["nextchar"], runs["baseline"], "server_us_per_message"
                    )
                    row["loop_vs_baseline"] = median_ratio(
                        runs["nextchar"], runs["baseline"], "loop_us_per_message"
                    )
                if adapt:
                    for key, field in (
                        ("adapt_chars_vs_static", "chars_per_sec"),
                        ("adapt_p50_vs_static", "p50_ms"),
                    ):
                        row[key] = median_ratio(runs["nextchar_adapt"], runs["nextchar"], field)
                for key, field in (
                    ("chars_ratio", "chars_per_sec"),
                    ("p50_ratio", "p50_ms"),
                    ("p99_ratio", "p99_ms"),
                ):
                    row[key] = median_ratio(runs["nextchar"], runs["echo"], field)
                rows.append(row)
                print(
                    f"  {streams:>5} streams x {chunk:>2} chars: nextchar {row['nextchar']['chars_per_sec']:>10,.0f} c/s"
                    f"  echo {row['echo']['chars_per_sec']:>10,.0f} c/s  ratio {row['chars_ratio'] or 0:.2f}",
                    flush=True,
                )
            unary = unary_cases(servers["nextchar"], rounds, duration, warmup) if web else None
        finally:
            for proc, _ in servers.values():
                proc.terminate()
            for proc, _ in servers.values():
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
    arith = arithmetic(cases)
    for row in rows:
        row["arithmetic_us_per_message"] = arith[f"{row['streams']}x{row['chunk']}"]
        row["overhead_us_per_message"] = overhead(row)
        if baseline is not None:
            row["baseline_overhead_us_per_message"] = overhead(row, "baseline")
    return {
        "benchmark": "serve",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "numpy": np.__version__,
            "load_average_1m": os.getloadavg()[0],  # the machine is shared: context for the figures
            # this process's (the in-process arithmetic's); the servers inherit its environment
            **blas_info(),
        },
        "model": {**MODEL, "top_k": TOP_K},
        "server_args": server_args or [],
        "baseline": str(baseline) if baseline is not None else None,
        "duration_s": duration,
        "rounds": rounds,
        "cases": rows,
        "unary": unary,
        "goals": goals(rows, unary),
    }


UNARY_CLIENTS = 100


def unary_cases(
    server: tuple[subprocess.Popen[str], int], rounds: int, duration: float, warmup: float
) -> dict[str, Any]:
    """Predict calls/s: gRPC unary against POST /v1/predict, UNARY_CLIENTS callers, one character
    each call, alternated in rounds."""
    proc, port = server
    runs: dict[str, list[dict[str, Any]]] = {"grpc_unary": [], "http_unary": []}
    for _ in range(rounds):
        runs["grpc_unary"].append(
            run_client(port, UNARY_CLIENTS, 1, duration, warmup, proc.pid, "grpc-unary")
        )
        runs["http_unary"].append(
            run_client(HTTP_PORTS[proc.pid], UNARY_CLIENTS, 1, duration, warmup, proc.pid, "http-unary")
        )
    out: dict[str, Any] = {name: median_run(r) for name, r in runs.items()}
    out["runs"] = runs
    out["calls_ratio"] = median_ratio(runs["http_unary"], runs["grpc_unary"], "messages_per_sec")
    out["cpu_ratio"] = median_ratio(runs["http_unary"], runs["grpc_unary"], "server_us_per_message")
    print(
        f"  {UNARY_CLIENTS} unary callers: gRPC {out['grpc_unary']['messages_per_sec']:,.0f} calls/s, "
        f"HTTP {out['http_unary']['messages_per_sec']:,.0f} calls/s (ratio {out['calls_ratio'] or 0:.2f})",
        flush=True,
    )
    return out


def overhead(row: dict[str, Any], server: str = "nextchar") -> float | None:
    """A nextchar server's CPU per message minus the echo server's and minus the in-process
    arithmetic of the same predictions: the median over rounds, each round's pair back to back."""
    values = [
        ours["server_us_per_message"] - echo["server_us_per_message"] - row["arithmetic_us_per_message"]
        for ours, echo in zip(row["runs"][server], row["runs"]["echo"], strict=True)
        if ours.get("server_us_per_message") is not None and echo.get("server_us_per_message") is not None
    ]
    return float(np.median(values)) if values else None


def goals(rows: list[dict[str, Any]], unary: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Issue 12's goals (and issue 23's, with --web), each with the measured figure and whether it
    is met (cases not run: absent)."""
    found = {(r["streams"], r["chunk"]): r for r in rows}
    out: dict[str, dict[str, Any]] = {}

    def goal(name: str, value: float | None, limit: float, at_most: bool) -> None:
        met = value is not None and (value <= limit if at_most else value >= limit)
        out[name] = {"value": value, "limit": limit, "met": met}

    for (streams, chunk), row in found.items():
        if (streams, chunk) != (1, 64):  # the five cases; a lone 64-character stream is context
            goal(f"overhead_{streams}x{chunk}_us<=30", row["overhead_us_per_message"], 30.0, True)
    if (1, 1) in found:
        goal("pingpong_p50_vs_echo<=1.3", found[1, 1]["p50_ratio"], 1.3, True)
        goal("pingpong_p99_vs_echo<=1.5", found[1, 1]["p99_ratio"], 1.5, True)
    for streams in (100, 1000):
        if (streams, 1) in found:
            goal(
                f"1char_{streams}_streams_chars_vs_echo>=0.90", found[streams, 1]["chars_ratio"], 0.90, False
            )
    for (streams, chunk), row in found.items():
        if "ws_cpu_vs_grpc" in row:
            goal(f"websocket_{streams}x{chunk}_cpu_vs_grpc<=1.5", row["ws_cpu_vs_grpc"], 1.5, True)
    for (streams, chunk), floor in (((100, 1), 0.6), ((100, 64), 0.5)):
        if "adapt_chars_vs_static" in found.get((streams, chunk), {}):
            value = found[streams, chunk]["adapt_chars_vs_static"]
            goal(f"adaptive_{streams}x{chunk}_chars_vs_static>={floor}", value, floor, False)
    if "adapt_p50_vs_static" in found.get((1, 1), {}):
        goal("adaptive_pingpong_p50_vs_static<=1.5", found[1, 1]["adapt_p50_vs_static"], 1.5, True)
    return out


def print_table(result: dict[str, Any]) -> None:
    def num(value: float | None, width: int, digits: int = 0) -> str:
        return f"{value:>{width},.{digits}f}" if value is not None else f"{'-':>{width}}"

    print(
        f"\n{'case':>9} | {'nextchar c/s':>12} {'p50 ms':>7} {'p99 ms':>7} {'µs/msg':>7} | "
        f"{'echo c/s':>10} {'p50 ms':>7} {'p99 ms':>7} {'µs/msg':>7} | {'arith':>6} {'overhead':>8} | "
        f"{'c/s ratio':>9}"
    )
    for c in result["cases"]:
        n, e = c["nextchar"], c["echo"]
        print(
            f"{c['streams']:>5}x{c['chunk']:<3} | {num(n['chars_per_sec'], 12)} {num(n['p50_ms'], 7, 2)} "
            f"{num(n['p99_ms'], 7, 2)} {num(n.get('server_us_per_message'), 7)} | "
            f"{num(e['chars_per_sec'], 10)} {num(e['p50_ms'], 7, 2)} {num(e['p99_ms'], 7, 2)} "
            f"{num(e.get('server_us_per_message'), 7)} | {num(c['arithmetic_us_per_message'], 6, 1)} "
            f"{num(c['overhead_us_per_message'], 8, 1)} | {num(c['chars_ratio'], 9, 2)}"
        )
        if "nextchar_thread" in c:
            print(f"{'':>9}   compute in a thread: {num(c['nextchar_thread']['chars_per_sec'], 12)} c/s")
        if "nextchar_adapt" in c:
            a = c["nextchar_adapt"]
            print(
                f"{'':>9}   every session adaptive: {num(a['chars_per_sec'], 12)} c/s, p50 {num(a['p50_ms'], 6, 2)} ms, "
                f"{num(a.get('server_us_per_message'), 6)} µs/msg ({num(c['adapt_chars_vs_static'], 4, 2)}x the static c/s)"
            )
        if "baseline" in c:
            b = c["baseline"]
            print(
                f"{'':>9}   baseline: {num(b['chars_per_sec'], 12)} c/s, p50 {num(b['p50_ms'], 6, 2)} ms, "
                f"{num(b.get('server_us_per_message'), 6)} µs/msg, overhead "
                f"{num(c['baseline_overhead_us_per_message'], 6, 1)} (this build's CPU "
                f"{num(c['cpu_vs_baseline'], 4, 2)}x the baseline's, its event loop's "
                f"{num(c['loop_vs_baseline'], 4, 2)}x)"
            )
        if "nextchar_ws" in c:
            w = c["nextchar_ws"]
            print(
                f"{'':>9}   WebSocket: {num(w['chars_per_sec'], 12)} c/s, p50 {num(w['p50_ms'], 6, 2)} ms, "
                f"{num(w.get('server_us_per_message'), 6)} µs/msg ({num(c['ws_cpu_vs_grpc'], 4, 2)}x gRPC's)"
            )
    print(
        "(µs/msg: server CPU per message, its compute process included; arith: the in-process "
        "advance of the same batch per message; overhead = nextchar - echo - arith, median of rounds)"
    )
    machine = result["machine"]
    print(f"\nBLAS: OpenBLAS kernel {machine['blas_kernel']}, {machine['blas_threads']} thread(s)")
    print("\ngoals:")
    for key, g in result["goals"].items():
        print(f"  {key:<44} {num(g['value'], 8, 2)}  {'met' if g['met'] else 'NOT met'}")


if __name__ == "__main__":
    unpin_this_process()  # no OpenBLAS pin for any measured process (see bench_env); the servers inherit
    if len(sys.argv) > 1 and sys.argv[1] == "--echo":
        asyncio.run(echo_server())
    elif len(sys.argv) > 1 and sys.argv[1] == "--client":
        kind = sys.argv[2]
        port, streams, chunk = (int(a) for a in sys.argv[3:6])
        duration, warmup = float(sys.argv[6]), float(sys.argv[7])
        clients = {
            "grpc": lambda: load(port, streams, chunk, duration, warmup),
            "ws": lambda: load_ws(port, streams, chunk, duration, warmup),
            "grpc-unary": lambda: load_unary(port, streams, chunk, duration, warmup, http=False),
            "http-unary": lambda: load_unary(port, streams, chunk, duration, warmup, http=True),
        }
        print(json.dumps(asyncio.run(clients[kind]())))
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument(
            "--duration", type=float, default=3.0, help="measured seconds per case, server and round"
        )
        parser.add_argument("--warmup", type=float, default=1.0)
        parser.add_argument(
            "--rounds", type=int, default=3, help="alternating runs per case; ratios are their median"
        )
        parser.add_argument("--cases", default=",".join(f"{s}x{c}" for s, c in CASES), help="e.g. 1x1,100x64")
        parser.add_argument(
            "--with-thread", action="store_true", help="also a server computing big batches in a thread"
        )
        parser.add_argument(
            "--web", action="store_true", help="also WebSocket streams and HTTP predict calls (issue 23)"
        )
        parser.add_argument(
            "--adapt", action="store_true", help="also a server whose sessions all adapt (issue 22)"
        )
        parser.add_argument(
            "--baseline", type=Path, help="another checkout (with its .venv) to alternate with this build"
        )
        parser.add_argument("--server-args", default="", help="more options for this build's server")
        parser.add_argument("--cell", default=MODEL["cell"], help="the served model's cell")
        parser.add_argument(
            "--hidden", type=int, default=MODEL["hidden"], help="the served model's hidden size"
        )
        args = parser.parse_args()
        MODEL.update(cell=args.cell, hidden=args.hidden)
        cases = [(int(a), int(b)) for a, b in (c.split("x") for c in args.cases.split(","))]
        print(
            f"nextchar serve benchmark: {len(cases)} cases x {args.rounds} rounds x 2-3 servers"
            f" x {args.duration + args.warmup:.0f} s"
        )
        result = main(
            args.duration,
            args.warmup,
            args.rounds,
            cases,
            args.with_thread,
            args.web,
            args.adapt,
            args.baseline.resolve() if args.baseline else None,
            args.server_args.split(),
        )
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(result, indent=2))
        print_table(result)
        print(f"\nwrote {path}")
