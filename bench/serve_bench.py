"""Serving benchmark: nextchar's gRPC server vs a no-op echo server with the same messages.

Run: ``make bench-serve`` (or ``python bench/serve_bench.py [--duration S] [--rounds N]``).

Both servers run as their own processes (nextchar via ``python -m nextchar.cli serve``,
one BLAS thread); the load comes from a separate client process (grpc.aio), one
ping-pong stream per simulated client: 1, 100 and 1,000 concurrent streams, with
1-character messages and 64-character chunks, top-3 predictions. Reported per
case: characters/s, messages/s, p50/p99 per-message latency, and nextchar/echo
ratios; plus the in-process batched-step throughput of the same H=256 rnn model
(``model.step`` over N sessions, and the scheduler's batch ``compute`` with top-k),
the compute ceiling the service is measured against. The 64-character cases also
run against a second nextchar server that computes big batches in a thread instead
of its compute worker process (``--compute-in-thread``). Results go to
``bench/results/serve-<time>.json``; a short table is printed.

The machine is shared and noisy (±15%, and slow spells that last seconds): each case
runs ``--rounds`` times, alternating the servers, and a ratio is the median of the
rounds' back-to-back ratios. Compare ratios within one run.

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
from pathlib import Path
from typing import Any

import numpy as np
from bench_env import blas_info, unpin_this_process

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
HIDDEN = 256
TOP_K = 3
CASES = [(1, 1), (100, 1), (1000, 1), (1, 64), (100, 64), (1000, 64)]  # (streams, chars per message)


def corpus() -> str:
    if CORPUS.is_file():
        return CORPUS.read_text()[:200_000]
    rng = np.random.default_rng(0)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'\n-&$3"))
    return "".join(rng.choice(alphabet, 200_000))


def make_model() -> Any:
    """An H=256 rnn over the corpus's alphabet; random weights cost the same as trained ones."""
    from nextchar.core.config import ModelConfig
    from nextchar.core.model import CharRNN
    from nextchar.core.vocab import Vocab

    return CharRNN.create(ModelConfig(cell="rnn", hidden=HIDDEN), Vocab.from_text(corpus()), seed=0)


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


async def load(port: int, streams: int, chunk: int, duration: float, warmup: float) -> dict[str, Any]:
    import grpc
    from nextchar.proto import nextchar_pb2 as pb
    from nextchar.proto import nextchar_pb2_grpc as pb_grpc

    text = corpus()
    channels: list[Any] = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(max(1, streams // 100))
    ]
    stubs: list[Any] = [pb_grpc.NextCharServiceStub(c) for c in channels]  # grpc-stubs predate aio streams
    latencies: list[float] = []
    chars = 0
    t0 = time.perf_counter()
    begin, end = t0 + warmup, t0 + warmup + duration
    errors: list[str] = []

    async def one(i: int) -> None:
        nonlocal chars
        call = stubs[i % len(stubs)].PredictStream()
        pos = (i * 7919) % (len(text) - chunk)
        try:
            while True:
                msg = pb.PredictStreamRequest(text=text[pos : pos + chunk], top_k=TOP_K)
                pos = (pos + chunk) % (len(text) - chunk)
                sent = time.perf_counter()
                await call.write(msg)
                await call.read()
                got = time.perf_counter()
                if sent >= begin and got <= end:
                    latencies.append(got - sent)
                    chars += chunk
                if got > end:
                    break
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]  # drain to the end of the stream
                pass
        except grpc.aio.AioRpcError as exc:
            errors.append(f"{exc.code().name}: {exc.details()}")

    cpu0 = time.process_time()
    await asyncio.gather(*(one(i) for i in range(streams)))
    client_cpu = (time.process_time() - cpu0) / (time.perf_counter() - t0)
    for channel in channels:
        await channel.close()
    lat = np.array(latencies) * 1000
    return {
        "streams": streams,
        "chunk": chunk,
        "chars_per_sec": chars / duration,
        "messages_per_sec": len(latencies) / duration,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "client_cpu": client_cpu,  # fraction of one core the load process used
        "errors": errors[:3],
    }


# ---------------------------------------------------------------- in-process compute ceiling


def compute_ceiling(seconds: float = 1.5) -> dict[str, Any]:
    from nextchar.server.batching.work import BatchStats, PredictWork, compute
    from nextchar.server.registry import ModelVersion
    from nextchar.server.sessions.session import Session

    model = make_model()
    out: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    for n in (1, 100, 1000):
        states = model.initial_state(n)
        idx = rng.integers(1, model.vocab.size, size=n)
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            states, _ = model.step(states, idx)
            steps += 1
        out[f"step_{n}_chars_per_sec"] = n * steps / (time.perf_counter() - start)
    mv = ModelVersion.from_model("bench", 1, Path("bench.npz"), model, [], {}, {})
    loop = asyncio.new_event_loop()
    text = corpus()
    for n in (100, 1000):
        works = [
            PredictWork(
                Session.fresh(str(i), mv),
                model.vocab.encode(text[i * 64 : i * 64 + 64]),
                TOP_K,
                False,
                0,
                loop.create_future(),
            )
            for i in range(n)
        ]
        rounds, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3 or rounds < 2:
            compute(works, BatchStats())
            rounds += 1
        out[f"batcher_{n}x64_chars_per_sec"] = n * 64 * rounds / (time.perf_counter() - start)
    loop.close()
    return out


# ---------------------------------------------------------------- orchestration


def start(cmd: list[str]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        match = re.search(r"serving on [\d.]+:(\d+)", line)
        if match:
            # keep reading its log: a server whose stderr pipe fills up blocks on its next log line
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, int(match.group(1))
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"{cmd} did not start")


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) of a process and its live children (the compute worker),
    from /proc; None where there is no /proc."""
    try:
        pids = [pid, *(int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
        total = 0
        for p in pids:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
        return total / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_client(
    port: int, streams: int, chunk: int, duration: float, warmup: float, server_pid: int
) -> dict[str, Any]:
    """One load run; adds the server's CPU use (cores, and µs per message, both sides)."""
    cpu0, wall0 = cpu_seconds(server_pid), time.perf_counter()  # (the client's start-up included)
    cmd = [
        sys.executable,
        __file__,
        "--client",
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
    cpu1, wall = cpu_seconds(server_pid), time.perf_counter() - wall0
    rate = result["messages_per_sec"]  # steady from the first message: warm-up included
    server_seconds = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    result["server_cpu"] = server_seconds / wall if server_seconds is not None else None  # cores
    if rate:
        # the server works only while messages flow (warm-up + measured window); the client's
        # own figure already covers exactly that span
        result["server_us_per_message"] = (
            server_seconds / (rate * (duration + warmup)) * 1e6 if server_seconds is not None else None
        )
        result["client_us_per_message"] = result["client_cpu"] / rate * 1e6
    return result


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def server_command(model_dir: str) -> list[str]:
    """A nextchar server process on a free port, serving make_model() as the default model."""
    from nextchar.server.registry import Registry

    Registry(Path(model_dir)).register("default", make_model(), history=[], summary={}, promote=True)
    return [
        sys.executable,
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
    return out


def median_ratio(ours: list[dict[str, Any]], echo: list[dict[str, Any]], field: str) -> float | None:
    """The median over rounds of nextchar / echo, each round's pair measured back to back."""
    ratios = [
        r for r in (ratio(a[field], b[field]) for a, b in zip(ours, echo, strict=True)) if r is not None
    ]
    return float(np.median(ratios)) if ratios else None


def main(duration: float, warmup: float, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        serve = server_command(tmp)
        servers = {
            "nextchar": start(serve),
            "nextchar_thread": start(
                [*serve, "--compute-in-thread"]
            ),  # big batches in a thread, for comparison
            "echo": start([sys.executable, __file__, "--echo"]),
        }
        cases: list[dict[str, Any]] = []
        try:
            for streams, chunk in CASES:
                names = ["echo", "nextchar"] + (["nextchar_thread"] if chunk > 1 else [])  # 1-char: no thread
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
                for _ in range(rounds):  # alternate, so a slow spell of the machine hits both servers
                    for name in names:
                        proc, port = servers[name]
                        runs[name].append(run_client(port, streams, chunk, duration, warmup, proc.pid))
                row: dict[str, Any] = {"streams": streams, "chunk": chunk, "rounds": rounds}
                row.update({name: median_run(runs[name]) for name in names})
                for key, field in (
                    ("chars_ratio", "chars_per_sec"),
                    ("p50_ratio", "p50_ms"),
                    ("p99_ratio", "p99_ms"),
                ):
                    row[key] = median_ratio(runs["nextchar"], runs["echo"], field)
                cases.append(row)
                print(
                    f"  {streams:>5} streams x {chunk:>2} chars: nextchar {row['nextchar']['chars_per_sec']:>10,.0f} c/s"
                    f"  echo {row['echo']['chars_per_sec']:>10,.0f} c/s  ratio {row['chars_ratio']:.2f}",
                    flush=True,
                )
        finally:
            for proc, _ in servers.values():
                proc.terminate()
            for proc, _ in servers.values():
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
    ceiling = compute_ceiling()
    chunked100 = next(c for c in cases if c["streams"] == 100 and c["chunk"] == 64)
    goals = {
        "1char_100_streams_vs_echo>=0.70": next(c for c in cases if c["streams"] == 100 and c["chunk"] == 1)[
            "chars_ratio"
        ],
        "1char_1000_streams_vs_echo>=0.70": next(
            c for c in cases if c["streams"] == 1000 and c["chunk"] == 1
        )["chars_ratio"],
        "pingpong_p50_vs_echo<=1.5": cases[0]["p50_ratio"],
        "pingpong_p99_vs_echo<=2.0": cases[0]["p99_ratio"],
        "64char_100_streams_vs_batched_step>=0.75": chunked100["nextchar"]["chars_per_sec"]
        / ceiling["step_100_chars_per_sec"],
    }
    chunked = chunked100["nextchar"]
    context = {
        # the same arithmetic as the service's (top-k and surprisal included), in-process
        "64char_100_streams_vs_batcher_100x64": chunked["chars_per_sec"]
        / ceiling["batcher_100x64_chars_per_sec"],
        # the 2-core budget while messages flow: server (loop + compute worker) and load client
        "64char_100_streams_server_cores": (chunked.get("server_us_per_message") or 0.0)
        * chunked["messages_per_sec"]
        / 1e6,
        "64char_100_streams_client_cores": chunked["client_cpu"],
    }
    return {
        "benchmark": "serve",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "numpy": np.__version__,
            "load_average_1m": os.getloadavg()[0],  # the machine is shared: context for the figures
            # this process's (the in-process compute's); the servers inherit its environment
            **blas_info(),
        },
        "model": {"cell": "rnn", "hidden": HIDDEN, "top_k": TOP_K},
        "duration_s": duration,
        "rounds": rounds,
        "cases": cases,
        "in_process": ceiling,
        "goals": goals,
        "context": context,
    }


def print_table(result: dict[str, Any]) -> None:
    def us(run: dict[str, Any], key: str) -> str:
        value = run.get(key)
        return f"{value:>6.0f}" if value is not None else f"{'-':>6}"

    print(
        f"\n{'streams':>7} {'chars':>5} | {'nextchar c/s':>12} {'p50 ms':>7} {'p99 ms':>7} {'srv us':>6} | "
        f"{'echo c/s':>10} {'p50 ms':>7} {'p99 ms':>7} {'srv us':>6} | {'ratio':>5} | {'thread c/s':>12}"
    )
    for c in result["cases"]:
        n, e = c["nextchar"], c["echo"]
        thread = f"{c['nextchar_thread']['chars_per_sec']:>12,.0f}" if "nextchar_thread" in c else f"{'':>12}"
        print(
            f"{c['streams']:>7} {c['chunk']:>5} | {n['chars_per_sec']:>12,.0f} {n['p50_ms']:>7.2f} {n['p99_ms']:>7.2f} "
            f"{us(n, 'server_us_per_message')} | {e['chars_per_sec']:>10,.0f} {e['p50_ms']:>7.2f} {e['p99_ms']:>7.2f} "
            f"{us(e, 'server_us_per_message')} | {c['chars_ratio']:>5.2f} | {thread}"
        )
    print("(srv us: server CPU per message, its compute worker included)")
    machine = result["machine"]
    print(f"\nBLAS: OpenBLAS kernel {machine['blas_kernel']}, {machine['blas_threads']} thread(s)")
    print("in-process compute (H=256 rnn, one BLAS thread):")
    for key, value in result["in_process"].items():
        print(f"  {key:<32} {value:>12,.0f}")
    print("\ngoals:")
    for key, value in result["goals"].items():
        print(f"  {key:<44} {value:.2f}")
    print("\ncontext:")
    for key, value in result["context"].items():
        print(f"  {key:<44} {value:.2f}")


if __name__ == "__main__":
    unpin_this_process()  # no OpenBLAS pin for any measured process (see bench_env); the servers inherit
    if len(sys.argv) > 1 and sys.argv[1] == "--echo":
        asyncio.run(echo_server())
    elif len(sys.argv) > 1 and sys.argv[1] == "--client":
        port, streams, chunk = (int(a) for a in sys.argv[2:5])
        print(json.dumps(asyncio.run(load(port, streams, chunk, float(sys.argv[5]), float(sys.argv[6])))))
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument(
            "--duration", type=float, default=3.0, help="measured seconds per case, server and round"
        )
        parser.add_argument("--warmup", type=float, default=1.0)
        parser.add_argument(
            "--rounds", type=int, default=3, help="alternating runs per case; ratios are their median"
        )
        args = parser.parse_args()
        print(
            f"nextchar serve benchmark: {len(CASES)} cases x {args.rounds} rounds x 2-3 servers"
            f" x {args.duration + args.warmup:.0f} s"
        )
        result = main(args.duration, args.warmup, args.rounds)
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(result, indent=2))
        print_table(result)
        print(f"\nwrote {path}")
