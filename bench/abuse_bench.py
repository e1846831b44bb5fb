"""Abuse benchmark: well-behaved streams beside hostile clients on one server.

Run: ``make bench-abuse`` (or ``python bench/abuse_bench.py [--duration S] [--alone S]
[--recovery S] [--kinds a,b,...] [--max-sessions N] [--prime-chars N]``; ~3 minutes).

One nextchar server process (the H=256 rnn of the serve benchmark, ``--max-sessions``
2,000 so that the session flood reaches the cap). 100 well-behaved streaming sessions
(one-character ping-pong, from their own process, the serve benchmark's load client)
run first alone (``--alone`` seconds: the baseline), then for ``--duration`` seconds
beside hostile clients in other processes, every kind at once unless ``--kinds`` picks
some:

- ``never_read_big``: 300 streams that never read, each writing 4,096-character chunks
  that ask for the full distribution (about 1 MB per reply);
- ``never_read_one_char``: one stream writing one-character chunks as fast as it can,
  never reading;
- ``oversized``: 10 MB Predicts, refused;
- ``malformed``: random bytes to every RPC;
- ``long_id``: 60,000-character session ids;
- ``churn``: session churn (create, predict, close);
- ``idle_streams``: 20,000 streams opened and never sent a message (twice ``max_streams``);
- ``poison``: Generates on live sessions with sampling parameters at their limits (temperature
  100 and 1e-30, top_p 1e-30, top_k 256...), beside ImportSessions of a state no model run
  reaches (±3e38, refused) at a high rate; any INTERNAL is counted apart;
- ``train_storm``: Trains of a 3.5 MB inline text with a 60 ms deadline (``--storm-trains``
  of them over the attack, 4 at a time; a caller told its job id cancels its watch);
- ``session_cap``: a client creating sessions as fast as it can (4 threads) up to
  ``max_sessions`` (started once the well-behaved streams have their sessions), then each
  thread one every 50 ms;
- ``long_primes``: CreateSession with a ``--prime-chars`` prime (then closed), stateless
  Predicts and Generates of that many characters, and a stream of 4,096-character chunks
  that reads its replies, beside the one-character streams;
- ``broken_uploads``: rounds of 200 UploadText streams, each sent a 64 KB piece, whose
  client process is then SIGKILLed (the connection dropped mid-upload).

Meanwhile a newcomer creates a session (then predicts and closes it) every second: at the
session cap a new session is refused until one has been idle ``session_evict_idle`` (60 s),
so its refusals are reported beside the goals, not in them.

Goals (issue 25): the well-behaved sessions see 0 errors (under attack, and new ones after
it) and a p99 at most 2x their p99 alone (same run); the server's RSS stays at most 500 MB
throughout and is at most 1.2x its pre-attack level ``--recovery`` (30) seconds after the
hostile clients stop; the model directory (models, ``_texts``, ``_jobs``) stays within the
server's totals (``max_model_bytes`` + ``max_pending_upload_bytes``), and no text is left
in ``_texts`` after the recovery. The server's RSS is sampled every 0.25 s (its children, the
compute process among them, are reported beside it), the model directory every second; the
server's CPU, alone and under attack, in cores: its event loop, its other threads, its children.
``--again N`` repeats the attack N more times on the same server, each followed by the
recovery, and reports the RSS after each (not a goal: whether what stays grows). Results:
``bench/results/abuse-<time>.json`` and a table. The measured processes run without
this machine's OpenBLAS pin (``bench_env``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import asyncio
import contextlib
import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_bench as sb  # the server command, its start-up and the load client
from bench_env import blas_info, pin_of, unpin_this_process

RESULTS = sb.RESULTS
WELL_BEHAVED = 100
NEVER_READ_STREAMS = 300
IDLE_STREAMS = 20_000  # twice the server's default max_streams
BIG_CHUNK = 4096
RSS_LIMIT_MB = 500
RECOVERY_TOLERANCE = 1.2
MAX_SESSIONS = 2_000  # low enough for the session flood to reach it within the run
MIB = 1024 * 1024
MAX_PENDING_UPLOAD_BYTES = 1024 * MIB  # the server's totals in this run (the model dir's bound)
MAX_MODEL_BYTES = 1024 * MIB
STORM_TEXT_BYTES = 3_500_000  # an inline Train text just under the 4 MiB message limit
UPLOADS_PER_ROUND, UPLOAD_PIECE = 200, 64 * 1024
KINDS = (
    "never_read_big",
    "never_read_one_char",
    "oversized",
    "malformed",
    "long_id",
    "churn",
    "idle_streams",
    "poison",
    "train_storm",
    "session_cap",
    "long_primes",
    "broken_uploads",
)
# Generate's sampling at and near its limits: (temperature, top_k, top_p); None = absent
EXTREMES: list[tuple[float | None, int, float | None]] = [
    (100.0, 0, None),
    (1e-30, 0, None),
    (1e-38, 256, None),
    (1e-45, 0, 1.0),  # a subnormal float32
    (None, 0, 1e-30),
    (100.0, 1, 1e-30),
    (0.0, 256, 0.0),
    (3e38, 0, None),  # beyond the limit: refused
]


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


def tree_bytes(path: Path) -> tuple[int, int]:
    """Bytes and files under path (files vanishing meanwhile are skipped)."""
    total = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
                files += 1
    return total, files


class Sampler(threading.Thread):
    """RSS of the server (and of its children, summed) every 0.25 s, and the model directory's
    size every second, with a phase label."""

    def __init__(self, pid: int, model_dir: Path) -> None:
        super().__init__(daemon=True)
        self.pid, self.model_dir = pid, model_dir
        self.phase = "idle"
        self.samples: list[dict[str, Any]] = []
        self.disk: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        tick = 0
        while not self.stop.wait(0.25):
            tick += 1
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
            if tick % 4 == 0:
                self.disk.append({"t": time.monotonic() - t0, "phase": self.phase, **self.dirs()})

    def dirs(self) -> dict[str, int]:
        total, files = tree_bytes(self.model_dir)
        texts, text_files = tree_bytes(self.model_dir / "_texts")
        jobs, _ = tree_bytes(self.model_dir / "_jobs")
        return {
            "model_dir_bytes": total,
            "files": files,
            "texts_bytes": texts,
            "text_files": text_files,
            "jobs_bytes": jobs,
        }

    def peak(self, phase: str) -> float:
        return max((s["rss_mb"] for s in self.samples if s["phase"] == phase), default=0.0)

    def last(self, phase: str) -> float:
        rows = [s["rss_mb"] for s in self.samples if s["phase"] == phase]
        return rows[-1] if rows else 0.0


def well_behaved(port: int, duration: float) -> subprocess.Popen[str]:
    """The serve benchmark's load client in its own process: 100 one-character ping-pong streams
    (1 s of warm-up, then duration measured); read its result with finished()."""
    cmd = [
        sys.executable,
        sb.__file__,
        "--client",
        "grpc",
        str(port),
        str(WELL_BEHAVED),
        "1",
        str(duration),
        "1.0",
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(err)
    return dict(json.loads(out.strip().splitlines()[-1]))


def well_behaved_run(port: int, duration: float) -> dict[str, Any]:
    return finished(well_behaved(port, duration), duration + 120)


def server_stub(port: int) -> tuple[Any, Any]:
    import grpc
    from nextchar.proto import nextchar_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, pb_grpc.NextCharServiceStub(channel)


def sessions_total(stub: Any) -> int:
    from nextchar.proto import nextchar_pb2 as pb

    return int(stub.ListSessions(pb.ListSessionsRequest(page_size=1), timeout=10).total)


class Spent:
    """The server's CPU use from now until stop(), in cores: its event loop, its other threads
    (gRPC's, the file and job threads; ended ones included) and its live children (the compute
    process, running trainers). Tells where the well-behaved clients' latency goes under attack:
    a saturated loop, or busy threads holding the GIL."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.began, self.at_start = time.monotonic(), self.now()
        self.cores: dict[str, float] = {}

    def now(self) -> dict[str, float]:
        by_thread = sb.cpu_by_thread(self.pid) or {}
        whole = sb.cpu_seconds(self.pid) or 0.0  # the process's every thread, and its live children
        loop, children = by_thread.get("event loop", 0.0), by_thread.get("children", 0.0)
        return {"event loop": loop, "threads": whole - children - loop, "children": children}

    def stop(self) -> None:
        wall, now = time.monotonic() - self.began, self.now()
        self.cores = {k: (now[k] - self.at_start[k]) / wall for k in now}


class Newcomer(threading.Thread):
    """A well-behaved client arriving during the attack: a new session every second (created,
    one prediction, closed); what it got is counted by status."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.counts: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        import grpc
        from nextchar.proto import nextchar_pb2 as pb

        channel, stub = server_stub(self.port)
        while not self.stop.wait(1.0):
            try:
                sid = stub.CreateSession(
                    pb.CreateSessionRequest(prime_text="hello"), timeout=10
                ).session.session_id
                stub.Predict(pb.PredictRequest(session_id=sid, text=" "), timeout=10)
                stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10)
                outcome = "OK"
            except grpc.RpcError as exc:
                outcome = exc.code().name
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
        channel.close()


# ---------------------------------------------------------------- the hostile clients (own process)


def hostile(port: int, duration: float, kinds: str, storm_trains: int, prime_chars: int) -> None:
    """Every kind asked for, from this process's threads (and upload victims' processes), for
    duration seconds; "go" on stdin starts the session flood. Prints what was sent, by kind."""
    import grpc
    from nextchar.proto import nextchar_pb2 as pb
    from nextchar.proto import nextchar_pb2_grpc as pb_grpc

    address = f"127.0.0.1:{port}"
    stop = threading.Event()
    counts: dict[str, int] = {}
    lock = threading.Lock()
    big_text = ("to be or not to be, that is the question " * 200)[:BIG_CHUNK]
    wanted = set(KINDS if kinds == "all" else kinds.split(","))
    unknown = wanted - set(KINDS)
    if unknown:
        raise SystemExit(f"unknown kinds: {sorted(unknown)}")

    def count(name: str, n: int = 1) -> None:
        with lock:
            counts[name] = counts.get(name, 0) + n

    def outcome(name: str, exc: grpc.RpcError | None) -> None:
        count(f"{name}:{'OK' if exc is None else exc.code().name}")

    def never_reading(chunk: str, full: bool, name: str) -> Any:
        def requests() -> Any:
            while not stop.is_set():
                count(name)
                yield pb.PredictStreamRequest(text=chunk, full_distribution=full)

        return requests()

    channels = [grpc.insecure_channel(address) for _ in range(8)]
    stubs = [pb_grpc.NextCharServiceStub(c) for c in channels]
    calls = []
    if "never_read_big" in wanted:
        calls += [
            stubs[i % 4].PredictStream(never_reading(big_text, True, "never_read_big"))
            for i in range(NEVER_READ_STREAMS)
        ]
    if "never_read_one_char" in wanted:
        calls.append(stubs[4].PredictStream(never_reading("a", False, "never_read_one_char")))
    holder = threading.Thread(target=idle_streams, args=(address, stop, counts), daemon=True)
    if "idle_streams" in wanted:
        holder.start()

    def loop(name: str, act: Callable[[], object]) -> None:
        while not stop.is_set():
            with contextlib.suppress(grpc.RpcError, ValueError):  # ValueError: channel closed at the end
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

    # -------------------------------------------- poison: sampling at its limits, unreachable states
    poisoned: list[str] = []
    poison_blob = b""
    if "poison" in wanted:
        poisoned = [
            stubs[6].CreateSession(pb.CreateSessionRequest(prime_text="hello"), timeout=10).session.session_id
            for _ in range(4)
        ]
        snapshot = pb.SessionSnapshot.FromString(
            stubs[6].ExportSession(pb.ExportSessionRequest(session_id=poisoned[0]), timeout=10).blob
        )
        state = np.frombuffer(snapshot.state, dtype=np.dtype(snapshot.dtype).newbyteorder("<")).copy()
        state[len(state) // 2] = 3e38  # finite, far beyond tanh's range
        snapshot.state = state.astype(state.dtype.newbyteorder("<")).tobytes()
        poison_blob = snapshot.SerializeToString()

    def poison_generate(i: int) -> Callable[[], None]:
        def act() -> None:
            temperature, top_k, top_p = EXTREMES[rng.randrange(len(EXTREMES))]
            request = pb.GenerateRequest(
                session_id=poisoned[i % len(poisoned)], length=200, top_k=top_k, seed=i
            )
            if temperature is not None:
                request.temperature = temperature
            if top_p is not None:
                request.top_p = top_p
            try:
                for _ in stubs[6].Generate(request, timeout=30):
                    pass
                outcome("poison_generate", None)
            except grpc.RpcError as exc:
                outcome("poison_generate", exc)
                if exc.code() == grpc.StatusCode.NOT_FOUND:  # evicted at the session cap: a new one
                    with contextlib.suppress(grpc.RpcError):
                        poisoned[i % len(poisoned)] = (
                            stubs[6]
                            .CreateSession(pb.CreateSessionRequest(prime_text="hello"), timeout=10)
                            .session.session_id
                        )

        return act

    def poison_import() -> None:
        try:
            stubs[6].ImportSession(pb.ImportSessionRequest(blob=poison_blob), timeout=5)
            outcome("poison_import", None)
        except grpc.RpcError as exc:
            outcome("poison_import", exc)

    # -------------------------------------------- the cancelled-Train storm
    storm = pb.TrainRequest(
        model_name="storm",
        text=(big_text * (STORM_TEXT_BYTES // len(big_text) + 1))[:STORM_TEXT_BYTES],
        model_config=pb.ModelConfigSpec(cell="rnn", hidden=16),
        train_config=pb.TrainConfigSpec(epochs=1, seq_len=8, batch=1, max_chars=2000, val_fraction=0.0),
    )
    storm_every = 4 * duration / max(1, storm_trains)  # each of 4 threads

    def train_storm() -> None:
        began = time.monotonic()
        try:
            call = stubs[7].Train(storm, timeout=0.06)
            next(iter(call))  # the job's id: this caller was told of it, and stops watching
            call.cancel()  # type: ignore[no-untyped-call]  # untyped in grpc-stubs
            outcome("train_storm", None)
        except grpc.RpcError as exc:
            outcome("train_storm", exc)
        except StopIteration:
            count("train_storm:ENDED")
        stop.wait(max(0.0, storm_every - (time.monotonic() - began)))

    # -------------------------------------------- sessions up to the cap
    cap_go = threading.Event()

    def hear_go() -> None:
        sys.stdin.readline()
        cap_go.set()

    threading.Thread(target=hear_go, daemon=True).start()

    def session_cap() -> None:
        cap_go.wait()
        at_cap = False
        while not stop.is_set():
            try:
                stubs[3].CreateSession(pb.CreateSessionRequest(), timeout=10)
                outcome("session_cap", None)
            except grpc.RpcError as exc:
                outcome("session_cap", exc)
                at_cap = at_cap or exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            if at_cap:
                stop.wait(0.05)

    # -------------------------------------------- long primes and chunks beside one-character streams
    prime = (big_text * (prime_chars // len(big_text) + 1))[:prime_chars]
    chunk = prime[:BIG_CHUNK]

    def long_primes() -> None:
        for name, act in (
            (
                "long_prime_create",
                lambda: stubs[2].CloseSession(
                    pb.CloseSessionRequest(
                        session_id=stubs[2]
                        .CreateSession(pb.CreateSessionRequest(prime_text=prime), timeout=30)
                        .session.session_id
                    ),
                    timeout=10,
                ),
            ),
            ("long_prime_predict", lambda: stubs[2].Predict(pb.PredictRequest(text=chunk), timeout=30)),
            (
                "long_prime_generate",
                lambda: list(stubs[2].Generate(pb.GenerateRequest(prime_text=prime, length=1), timeout=30)),
            ),
        ):
            try:
                act()
                outcome(name, None)
            except grpc.RpcError as exc:
                outcome(name, exc)

    def long_chunks() -> None:
        def requests() -> Iterator[pb.PredictStreamRequest]:
            while not stop.is_set():
                yield pb.PredictStreamRequest(text=chunk, top_k=3)

        try:
            for _ in stubs[2].PredictStream(requests(), timeout=duration + 30):
                count("long_chunk_stream")
        except grpc.RpcError as exc:
            outcome("long_chunk_stream_end", exc)

    # -------------------------------------------- uploads whose client process is killed mid-upload
    def broken_uploads() -> None:
        victim = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--upload-victim",
                str(port),
                str(UPLOADS_PER_ROUND),
                str(UPLOAD_PIECE),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert victim.stdout is not None
        ready = threading.Thread(target=victim.stdout.readline, daemon=True)
        ready.start()
        ready.join(20)  # "sent": every upload has its piece out
        stop.wait(0.5)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        count("broken_uploads", UPLOADS_PER_ROUND)
        stop.wait(1.0)

    workers: list[tuple[str, Callable[[], object]]] = [
        ("oversized", lambda: raw.unary_unary(f"/{service}/Predict", None, None)(oversized, timeout=10)),
        ("malformed", malformed),
        (
            "long_id",
            lambda: stubs[5].GetSession(pb.GetSessionRequest(session_id="i" * 60_000), timeout=5),
        ),
        ("churn", churn),
        *(("poison", poison_generate(i)) for i in range(2)),
        ("poison", poison_import),
        *(("train_storm", train_storm) for _ in range(4)),
        *(("session_cap", session_cap) for _ in range(4)),
        *(("long_primes", long_primes) for _ in range(2)),
        ("broken_uploads", broken_uploads),
    ]
    threads = [threading.Thread(target=loop, args=(n, act), daemon=True) for n, act in workers if n in wanted]
    for thread in threads:
        thread.start()
    if "long_primes" in wanted:
        threading.Thread(target=long_chunks, daemon=True).start()
    time.sleep(duration)
    stop.set()
    for thread in threads:
        thread.join(15)  # each ends its call in flight (all have deadlines)
    for call in calls:
        call.cancel()  # type: ignore[no-untyped-call]  # untyped in grpc-stubs
    for channel in channels:
        channel.close()
    if holder.is_alive():
        holder.join(30)
    with lock:
        print(json.dumps(counts, sort_keys=True))


def idle_streams(address: str, stop: threading.Event, counts: dict[str, int]) -> None:
    """IDLE_STREAMS PredictStreams opened (grpc.aio: no thread each) that never send, held until
    stop; the ones the server closed (past max_streams) are counted apart."""
    import grpc

    async def hold() -> None:
        channels: list[Any] = [grpc.aio.insecure_channel(address) for _ in range(4)]
        stubs: list[Any] = [pb_grpc.NextCharServiceStub(c) for c in channels]  # grpc-stubs predate aio
        calls = [stubs[i % 4].PredictStream() for i in range(IDLE_STREAMS)]
        counts["idle_streams"] = len(calls)
        while not stop.is_set():
            await asyncio.sleep(0.5)
        counts["idle_streams_closed_by_server"] = sum(1 for c in calls if c.done())
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close()

    from nextchar.proto import nextchar_pb2_grpc as pb_grpc

    asyncio.run(hold())


def upload_victim(port: int, n: int, size: int) -> None:
    """n UploadText streams on one connection, each sent one piece of size bytes; prints "sent"
    and hangs until killed (the connection then drops with the uploads half done)."""
    import grpc
    from nextchar.proto import nextchar_pb2 as pb
    from nextchar.proto import nextchar_pb2_grpc as pb_grpc

    hang, sent = threading.Event(), threading.Semaphore(0)
    piece = "x" * size

    def requests() -> Iterator[pb.UploadTextRequest]:
        yield pb.UploadTextRequest(piece=piece)
        sent.release()
        hang.wait()

    stub = pb_grpc.NextCharServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    calls = [stub.UploadText.future(requests()) for _ in range(n)]
    for _ in calls:
        sent.acquire()
    print("sent", flush=True)
    hang.wait()


# ---------------------------------------------------------------- orchestration


def jobs_by_state(stub: Any) -> dict[str, int]:
    from nextchar.proto import nextchar_pb2 as pb

    out: dict[str, int] = {}
    for job in stub.ListJobs(pb.ListJobsRequest(), timeout=30).jobs:
        name = pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
        out[name] = out.get(name, 0) + 1
    return out


def hostile_process(port: int, args: argparse.Namespace, cores: set[int] | None) -> subprocess.Popen[str]:
    """The hostile clients, in a process of their own (on cores, when given); "go" on its stdin
    starts the session flood."""
    return subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--hostile",
            str(port),
            str(args.duration + 8),
            args.kinds,
            str(args.storm_trains),
            str(args.prime_chars),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, cores),
    )


def apart(wanted: bool) -> set[int] | None:
    """With wanted, the cores the hostile clients get (the last one), after moving this process
    (the well-behaved clients, and the server it starts) to the others: the attackers then take
    no CPU from the server, as if they were other machines. Measures the server's isolation of
    its clients; without it, on a 2-core machine, the attackers' own processes take the server's
    CPU and every latency moves with them. Every phase, alone included, runs on the same cores."""
    cores = sorted(os.sched_getaffinity(0))
    if not wanted or len(cores) < 2:
        return None
    os.sched_setaffinity(0, set(cores[:-1]))
    return {cores[-1]}


def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        cmd = [
            *sb.server_command(tmp),
            "--max-sessions",
            str(args.max_sessions),
            "--max-pending-upload-bytes",
            str(MAX_PENDING_UPLOAD_BYTES),
            "--max-model-bytes",
            str(MAX_MODEL_BYTES),
        ]
        hostile_cores = apart(args.apart)
        proc, port = sb.start(cmd)  # (its compute process and trainers inherit its cores)
        sampler = Sampler(proc.pid, model_dir)
        sampler.start()
        channel, stub = server_stub(port)
        newcomer = Newcomer(port)
        try:
            sampler.phase = "warm-up"
            well_behaved_run(port, 5.0)  # sessions, batches and the compute process warmed
            sampler.phase = "alone"
            cpu_alone = Spent(proc.pid)
            alone = well_behaved_run(port, args.alone)
            cpu_alone.stop()
            before_mb = sampler.last("alone")
            disk_before = sampler.dirs()
            sampler.phase = "attack"
            attackers = hostile_process(port, args, hostile_cores)
            time.sleep(4.0)  # the hostile clients connected and flooding
            sessions_before = sessions_total(stub)
            client = well_behaved(port, args.duration)
            deadline = time.monotonic() + 20
            while sessions_total(stub) < sessions_before + WELL_BEHAVED and time.monotonic() < deadline:
                time.sleep(0.2)  # the well-behaved streams have their sessions: now the cap's flood
            assert attackers.stdin is not None
            attackers.stdin.write("go\n")
            attackers.stdin.flush()
            newcomer.start()
            cpu_attack = Spent(proc.pid)
            under_attack = finished(client, args.duration + 120)
            cpu_attack.stop()
            out, _ = attackers.communicate(timeout=180)
            newcomer.stop.set()
            newcomer.join(30)
            sampler.phase = "recovery"
            time.sleep(args.recovery)
            after_mb = sampler.last("recovery")
            disk_after = sampler.dirs()
            afters = [after_mb]
            for _ in range(args.again):  # the same attack again: does what stays after grow?
                sampler.phase = "attack"
                again = hostile_process(port, args, hostile_cores)
                time.sleep(4.0)
                again.communicate("go\n", timeout=args.duration + 180)
                sampler.phase = "recovery"
                time.sleep(args.recovery)
                afters.append(sampler.last("recovery"))
            sessions_after = sessions_total(stub)
            jobs = jobs_by_state(stub)
            still_serving = well_behaved_run(port, 3.0)
        finally:
            sampler.stop.set()
            channel.close()
            proc.kill()
    peak = max(sampler.peak(p) for p in ("alone", "attack", "recovery"))
    disk_peak = max((d["model_dir_bytes"] for d in sampler.disk), default=0)
    p99_ratio = (
        under_attack["p99_ms"] / alone["p99_ms"] if under_attack["p99_ms"] and alone["p99_ms"] else None
    )
    goals = {
        "well_behaved_errors==0": (under_attack["error_count"] + still_serving["error_count"], 0, "=="),
        "p99_under_attack_vs_alone<=2": (p99_ratio, 2.0, "<="),
        f"server_rss_peak_mb<={RSS_LIMIT_MB}": (peak, RSS_LIMIT_MB, "<="),
        f"rss_{args.recovery:g}s_after_vs_before<={RECOVERY_TOLERANCE}": (
            after_mb / before_mb if before_mb else None,
            RECOVERY_TOLERANCE,
            "<=",
        ),
        "model_dir_peak_mb<=totals": (
            disk_peak / MIB,
            (MAX_PENDING_UPLOAD_BYTES + MAX_MODEL_BYTES) / MIB,
            "<=",
        ),
        "texts_left_after_bytes==0": (disk_after["texts_bytes"], 0, "=="),
    }
    met = {
        name: value is not None and (value == limit if how == "==" else value <= limit)
        for name, (value, limit, how) in goals.items()
    }
    return {
        "timestamp": time.strftime("%Y%m%d-%H%M%S"),
        "args": vars(args),
        "blas": blas_info(),
        "pin_removed": pin_of(os.environ),
        "alone": alone,
        "under_attack": under_attack,
        "after": still_serving,
        "hostile_requests": json.loads(out.strip().splitlines()[-1]) if out.strip() else {},
        "newcomer_sessions": newcomer.counts,
        "sessions_after": sessions_after,
        "jobs_after": jobs,
        "server_cores": {"alone": cpu_alone.cores, "under_attack": cpu_attack.cores},
        "rss_before_mb": before_mb,
        "rss_peak_mb": peak,
        "rss_after_mb": after_mb,
        "rss_after_each_attack_mb": afters,
        "children_peak_mb": max((s["children_mb"] for s in sampler.samples), default=0.0),
        "disk_before": disk_before,
        "disk_peak_bytes": disk_peak,
        "disk_after": disk_after,
        "goals": {name: {"value": v, "limit": lim, "met": met[name]} for name, (v, lim, _) in goals.items()},
        "samples": sampler.samples,
        "disk_samples": sampler.disk,
    }


def print_table(r: dict[str, Any]) -> None:
    a, u, f = r["alone"], r["under_attack"], r["after"]
    for label, row in (("alone", a), ("under attack", u), ("after", f)):
        p50, p99 = (f"{row[k]:.2f}" if row[k] is not None else "-" for k in ("p50_ms", "p99_ms"))
        print(
            f"well-behaved, {label + ':':<13} {row['messages_per_sec']:8,.0f} msg/s  p50 {p50} ms  "
            f"p99 {p99} ms  errors {row['error_count']} {row['errors'][:1]}"
        )
    for label, cores in r["server_cores"].items():
        print(
            f"server CPU, {label + ':':<13} " + ", ".join(f"{k} {v:.2f}" for k, v in cores.items()) + " cores"
        )
    print(f"hostile requests: {r['hostile_requests']}")
    print(
        f"newcomers' sessions during the attack: {r['newcomer_sessions']}; sessions after: {r['sessions_after']}"
    )
    print(f"jobs after: {r['jobs_after']}")
    print(
        f"server RSS: before {r['rss_before_mb']:.0f} MB, peak {r['rss_peak_mb']:.0f} MB, "
        f"{r['args']['recovery']:g} s after {r['rss_after_mb']:.0f} MB (children peak {r['children_peak_mb']:.0f} MB)"
    )
    if len(r["rss_after_each_attack_mb"]) > 1:
        each = ", ".join(f"{mb:.0f}" for mb in r["rss_after_each_attack_mb"])
        print(f"server RSS {r['args']['recovery']:g} s after each attack: {each} MB")
    b, d = r["disk_before"], r["disk_after"]
    print(
        f"model dir: before {b['model_dir_bytes'] / MIB:.1f} MB, peak {r['disk_peak_bytes'] / MIB:.1f} MB, "
        f"after {d['model_dir_bytes'] / MIB:.1f} MB ({d['files']} files; _texts {d['texts_bytes']} bytes "
        f"in {d['text_files']} files, _jobs {d['jobs_bytes'] / MIB:.1f} MB)"
    )
    print(f"{'goal':<36} {'value':>10} {'limit':>8}  met")
    for name, g in r["goals"].items():
        value = "-" if g["value"] is None else f"{g['value']:.3g}"
        print(f"{name:<36} {value:>10} {g['limit']:>8.3g}  {'yes' if g['met'] else 'NO'}")


if __name__ == "__main__":
    unpin_this_process()  # no OpenBLAS pin for the measured processes (bench_env); children inherit
    if len(sys.argv) > 1 and sys.argv[1] == "--hostile":
        hostile(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--upload-victim":
        upload_victim(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--duration", type=float, default=60.0, help="seconds under attack")
        parser.add_argument("--alone", type=float, default=20.0, help="seconds of the baseline, no attackers")
        parser.add_argument(
            "--recovery", type=float, default=30.0, help="seconds after the attack before RSS is read"
        )
        parser.add_argument("--kinds", default="all", help=f"comma-separated, of: {', '.join(KINDS)}")
        parser.add_argument("--max-sessions", type=int, default=MAX_SESSIONS, help="the server's session cap")
        parser.add_argument("--prime-chars", type=int, default=4096, help="long_primes' prime length")
        parser.add_argument(
            "--storm-trains", type=int, default=300, help="train_storm's Trains over the attack"
        )
        parser.add_argument(
            "--again",
            type=int,
            default=0,
            help="attacks more, each followed by --recovery seconds: the RSS after each (not a goal)",
        )
        parser.add_argument(
            "--apart",
            action="store_true",
            help="hostile clients on the last core, the server and well-behaved clients on the others",
        )
        args = parser.parse_args()
        result = main(args)
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"abuse-{result['timestamp']}.json"
        path.write_text(json.dumps(result, indent=1))
        print_table(result)
        print(f"\nwrote {path}")
