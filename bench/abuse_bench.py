"""Abuse benchmark: well-behaved streams beside hostile clients on one server.

Run: ``make bench-abuse`` (or ``python bench/abuse_bench.py [--duration S]``).

One nextchar server process (the H=256 rnn of the serve benchmark). 100
well-behaved streaming sessions (one-character ping-pong, from their own process,
the serve benchmark's load client) run first alone, then for ``--duration``
seconds beside hostile clients in other processes:

- 300 streams that never read, each writing 4,096-character chunks that ask for
  the full distribution (about 1 MB per reply);
- one stream writing one-character chunks as fast as it can, never reading;
- oversized requests (10 MB Predicts), refused;
- malformed bytes to every RPC;
- long session ids (60,000 characters);
- session churn (create, predict, close);
- 20,000 streams opened and never sent a message (the server holds at most
  ``max_streams`` of them and refuses the rest).

Goals: the well-behaved sessions see 0 errors and a p99 at most 2x their p99
alone (same run); the server's RSS stays at most 500 MB throughout and is back
within 20% of its pre-run level 30 s after the hostile clients stop. The server's
RSS is sampled every 0.25 s (its children, the compute process among them, are
reported beside it). Results: ``bench/results/abuse-<time>.json`` and a table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contextlib

import serve_bench as sb  # the server command, its start-up and the load client
from bench_env import unpin_this_process

RESULTS = sb.RESULTS
WELL_BEHAVED = 100
NEVER_READ_STREAMS = 300
IDLE_STREAMS = 20_000  # twice the server's default max_streams
BIG_CHUNK = 4096
RSS_LIMIT_MB = 500
RECOVERY_SECONDS = 30.0
RECOVERY_TOLERANCE = 0.20


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            kids = [int(c) for c in task.read_text().split()]
            out += kids
            todo += kids
    return out


class Sampler(threading.Thread):
    """RSS of the server (and of its children, summed) every 0.25 s, with a phase label."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.phase = "idle"
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.wait(0.25):
            try:
                children = sum(rss_mb(p) for p in descendants(self.pid))
                self.samples.append(
                    {
                        "t": time.monotonic() - t0,
                        "phase": self.phase,
                        "rss_mb": rss_mb(self.pid),
                        "children_mb": children,
                    }
                )
            except (OSError, ValueError):
                continue

    def peak(self, phase: str) -> float:
        return max((s["rss_mb"] for s in self.samples if s["phase"] == phase), default=0.0)

    def last(self, phase: str) -> float:
        rows = [s["rss_mb"] for s in self.samples if s["phase"] == phase]
        return rows[-1] if rows else 0.0


def well_behaved(port: int, duration: float) -> dict[str, Any]:
    """The serve benchmark's load client in its own process: 100 one-character ping-pong streams."""
    cmd = [sys.executable, sb.__file__, "--client", str(port), str(WELL_BEHAVED), "1", str(duration), "1.0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------- the hostile clients (own process)


def hostile(port: int, duration: float, kinds: str = "all") -> None:
    import grpc
    from nextchar.proto import nextchar_pb2 as pb
    from nextchar.proto import nextchar_pb2_grpc as pb_grpc

    address = f"127.0.0.1:{port}"
    stop = threading.Event()
    counts: dict[str, int] = {}
    big_text = ("to be or not to be, that is the question " * 200)[:BIG_CHUNK]

    def count(name: str) -> None:
        counts[name] = counts.get(name, 0) + 1

    def never_reading(chunk: str, full: bool, name: str) -> Any:
        def requests() -> Any:
            while not stop.is_set():
                count(name)
                yield pb.PredictStreamRequest(text=chunk, full_distribution=full)

        return requests()

    channels = [grpc.insecure_channel(address) for _ in range(6)]
    stubs = [pb_grpc.NextCharServiceStub(c) for c in channels]
    wanted = set(kinds.split(",")) if kinds != "all" else None
    calls = []
    if wanted is None or "never_read_big" in wanted:
        calls += [
            stubs[i % 4].PredictStream(never_reading(big_text, True, "never_read_big"))
            for i in range(NEVER_READ_STREAMS)
        ]
    if wanted is None or "never_read_one_char" in wanted:
        calls.append(stubs[4].PredictStream(never_reading("a", False, "never_read_one_char")))
    holder = threading.Thread(target=idle_streams, args=(address, stop, counts), daemon=True)
    if wanted is None or "idle_streams" in wanted:
        holder.start()

    def loop(name: str, act: Any) -> None:
        while not stop.is_set():
            with contextlib.suppress(grpc.RpcError):
                act()
            count(name)

    raw = channels[5]
    methods = [m.name for m in pb.DESCRIPTOR.services_by_name["NextCharService"].methods]
    rng = random.Random(0)
    service = pb.DESCRIPTOR.services_by_name["NextCharService"].full_name
    oversized = pb.PredictRequest(text="x" * 10_000_000).SerializeToString()

    def malformed() -> None:
        method = rng.choice(
            [m for m in methods if m not in ("PredictStream", "Train", "Generate", "WatchJob")]
        )
        raw.unary_unary(f"/{service}/{method}", None, None)(rng.randbytes(rng.randint(1, 200)), timeout=5)

    def churn() -> None:
        sid = (
            stubs[5].CreateSession(pb.CreateSessionRequest(prime_text="hello"), timeout=5).session.session_id
        )
        stubs[5].Predict(pb.PredictRequest(session_id=sid, text="world"), timeout=5)
        stubs[5].CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=5)

    workers = [
        threading.Thread(
            target=loop,
            args=(
                "oversized",
                lambda: raw.unary_unary(f"/{service}/Predict", None, None)(oversized, timeout=10),
            ),
        ),
        threading.Thread(target=loop, args=("malformed", malformed)),
        threading.Thread(
            target=loop,
            args=(
                "long_id",
                lambda: stubs[5].GetSession(pb.GetSessionRequest(session_id="i" * 60_000), timeout=5),
            ),
        ),
        threading.Thread(target=loop, args=("churn", churn)),
    ]
    for w in workers:
        w.daemon = True
        if wanted is None or w._args[0] in wanted:  # type: ignore[attr-defined]
            w.start()
    time.sleep(duration)
    stop.set()
    for call in calls:
        call.cancel()  # type: ignore[no-untyped-call]  # untyped in grpc-stubs
    for channel in channels:
        channel.close()
    if holder.is_alive():
        holder.join(30)
    print(json.dumps(counts))


def idle_streams(address: str, stop: threading.Event, counts: dict[str, int]) -> None:
    """IDLE_STREAMS PredictStreams opened (grpc.aio: no thread each) that never send, held until
    stop; the ones the server refuses (past max_streams) end at once and are counted apart."""
    import grpc

    async def hold() -> None:
        channels: list[Any] = [grpc.aio.insecure_channel(address) for _ in range(4)]
        stubs: list[Any] = [pb_grpc.NextCharServiceStub(c) for c in channels]  # grpc-stubs predate aio
        calls = [stubs[i % 4].PredictStream() for i in range(IDLE_STREAMS)]
        counts["idle_streams"] = len(calls)
        while not stop.is_set():
            await asyncio.sleep(0.5)
        counts["idle_streams_refused"] = sum(1 for c in calls if c.done())
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close()

    from nextchar.proto import nextchar_pb2_grpc as pb_grpc

    asyncio.run(hold())


# ---------------------------------------------------------------- orchestration


def main(duration: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = sb.start(sb.server_command(tmp))
        sampler = Sampler(proc.pid)
        sampler.start()
        try:
            sampler.phase = "warm-up"
            well_behaved(port, 5.0)  # sessions, batches and the compute process warmed
            sampler.phase = "alone"
            alone = well_behaved(port, duration / 3)
            before_mb = sampler.last("alone")
            sampler.phase = "attack"
            attackers = subprocess.Popen(
                [sys.executable, __file__, "--hostile", str(port), str(duration + 8)],
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(4.0)  # the hostile clients connected and flooding
            under_attack = well_behaved(port, duration)
            out, _ = attackers.communicate(timeout=120)
            sampler.phase = "recovery"
            time.sleep(RECOVERY_SECONDS)
            after_mb = sampler.last("recovery")
            still_serving = well_behaved(port, 3.0)
        finally:
            sampler.stop.set()
            proc.kill()
    peak = max(sampler.peak(p) for p in ("alone", "attack", "recovery"))
    p99_ratio = under_attack["p99_ms"] / alone["p99_ms"] if alone["p99_ms"] else None
    goals = {
        "well_behaved_errors==0": len(under_attack["errors"]) + len(still_serving["errors"]),
        "p99_under_attack_vs_alone<=2.0": p99_ratio,
        f"server_rss_peak_mb<={RSS_LIMIT_MB}": peak,
        "rss_after_30s_vs_before<=1.2": after_mb / before_mb if before_mb else None,
    }
    return {
        "timestamp": time.strftime("%Y%m%d-%H%M%S"),
        "duration": duration,
        "alone": alone,
        "under_attack": under_attack,
        "after": still_serving,
        "hostile_requests": json.loads(out.strip().splitlines()[-1]) if out.strip() else {},
        "rss_before_mb": before_mb,
        "rss_peak_mb": peak,
        "rss_after_mb": after_mb,
        "children_peak_mb": max((s["children_mb"] for s in sampler.samples), default=0.0),
        "goals": goals,
        "samples": sampler.samples,
    }


def print_table(r: dict[str, Any]) -> None:
    a, u = r["alone"], r["under_attack"]
    print(
        f"well-behaved, alone:        {a['messages_per_sec']:8,.0f} msg/s  p50 {a['p50_ms']:.2f} ms  p99 {a['p99_ms']:.2f} ms  errors {len(a['errors'])}"
    )
    print(
        f"well-behaved, under attack: {u['messages_per_sec']:8,.0f} msg/s  p50 {u['p50_ms']:.2f} ms  p99 {u['p99_ms']:.2f} ms  errors {len(u['errors'])}"
    )
    print(f"hostile requests sent: {r['hostile_requests']}")
    print(
        f"server RSS: before {r['rss_before_mb']:.0f} MB, peak {r['rss_peak_mb']:.0f} MB, "
        f"{RECOVERY_SECONDS:.0f} s after {r['rss_after_mb']:.0f} MB (children peak {r['children_peak_mb']:.0f} MB)"
    )
    print("goals:")
    for name, value in r["goals"].items():
        print(f"  {name:<36} {value if value is None else round(value, 3)}")


if __name__ == "__main__":
    unpin_this_process()  # no OpenBLAS pin for the measured processes (bench_env); children inherit
    if len(sys.argv) > 1 and sys.argv[1] == "--hostile":
        hostile(int(sys.argv[2]), float(sys.argv[3]), *sys.argv[4:5])
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--duration", type=float, default=60.0, help="seconds under attack")
        args = parser.parse_args()
        result = main(args.duration)
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"abuse-{result['timestamp']}.json"
        path.write_text(json.dumps(result, indent=1))
        print_table(result)
        print(f"\nwrote {path}")
