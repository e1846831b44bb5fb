"""Faults: a client killed mid-stream, a client that never reads, SIGKILL during a model save,
and a training job that diverges while streams run.

Where a process must die it is a real process: the killed client and the model writer
run tests/fault_clients.py, and the server whose memory is measured is a subprocess
(``ServerProcess``), so its RSS is its own. Every wait is bounded in time.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from nextchar.core.modelfile import load_model
from nextchar.proto import nextchar_pb2 as pb
from nextchar.proto import nextchar_pb2_grpc as pb_grpc
from nextchar.server.registry import Registry
from server_harness import (
    DroppingProxy,
    ServerProcess,
    ServerThread,
    cancel,
    make_registry,
    start_server,
    stream_chars,
    surprisals,
    top1,
)

CLIENTS = str(Path(__file__).with_name("fault_clients.py"))
TTL = 1.0  # idle timeout of the short-lived server, seconds


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models")
    make_registry(path, versions=1)
    return path


def client_process(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, CLIENTS, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def read_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """The next stdout line of proc, or fail after timeout (a hung client must not hang the suite)."""
    box: list[str] = []
    stdout = proc.stdout
    assert stdout is not None
    reader = threading.Thread(target=lambda: box.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box or not box[0]:
        proc.kill()
        raise AssertionError(f"no output from {proc.args!r}: {proc.stderr.read() if proc.stderr else ''}")
    return box[0].strip()


def session_ids(srv: ServerThread) -> set[str]:
    listed = srv.stub.ListSessions(pb.ListSessionsRequest(page_size=1000), timeout=5)
    return {s.session_id for s in listed.sessions}


# ---------------------------------------------------------------- client killed mid-stream


def test_killed_client_session_resumes_until_the_ttl_then_is_evicted(model_dir: Path) -> None:
    text, rest = "hello wor", "ld hello"
    srv = start_server(model_dir, idle_timeout=TTL, sweep_interval=0.2)
    try:
        client = client_process("stream", f"127.0.0.1:{srv.port}", text)
        sid, offset = read_line(client).split()
        client.send_signal(signal.SIGKILL)  # no goodbye: the TCP connection just dies
        client.wait(10)
        assert int(offset) == len(text) and sid in session_ids(srv)

        # resumable: the next chunk continues exactly where the dead client left off
        first = pb.PredictStreamRequest(session_id=sid, text=rest[0], expect_offset=len(text))
        later = [pb.PredictStreamRequest(text=ch) for ch in rest[1:]]
        resumed = list(srv.stub.PredictStream(iter([first, *later]), timeout=30))
        assert resumed[0].predictions.start_offset == len(text)
        whole = stream_chars(srv.stub, text + rest)
        assert top1(whole[0].vocab, resumed) == top1(whole[0].vocab, whole)[len(text) :]
        np.testing.assert_allclose(surprisals(resumed), surprisals(whole)[len(text) :], rtol=1e-4, atol=1e-5)

        # left alone past the idle TTL, the sweeper evicts it unasked, and it is counted
        ended_before = idle_evictions(srv)
        deadline = time.monotonic() + TTL + 5
        while sid in session_ids(srv):
            assert time.monotonic() < deadline, "the idle session was never swept"
            time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "idle" in str(err.value.details())
        if ended_before is not None:
            assert (idle_evictions(srv) or 0) >= ended_before + 1
    finally:
        srv.close()


def idle_evictions(srv: ServerThread) -> float | None:
    """nextchar_sessions_ended_total{reason="idle"} when the server keeps metrics (server/metrics.py)."""
    metrics = getattr(srv.server, "metrics", None)
    if metrics is None:
        return None
    value = metrics.registry.get_sample_value("nextchar_sessions_ended_total", {"reason": "idle"})
    return float(value or 0.0)


# ---------------------------------------------------------------- a client that never reads

NEVER_READ_STREAMS = 4
STALL_WITHIN = 20.0  # seconds for the flood to stall
STALL_QUIET = 1.0  # seconds without a single send that count as stalled
RSS_GROWTH_LIMIT_KB = 48 * 1024


def test_a_client_that_never_reads_cannot_grow_the_server(model_dir: Path) -> None:
    """Once connected, the client's bytes reach the server through a relay that stops reading the
    server's: replies fill the socket and the HTTP/2 windows, the handler's write waits, it stops
    reading requests, and the client's sends stall. The server holds a window, not the flood."""
    server = ServerProcess(model_dir)
    relay = DroppingProxy(server.address)
    sent = [0] * NEVER_READ_STREAMS
    stop = threading.Event()

    def flood(i: int) -> Iterator[pb.PredictStreamRequest]:
        chunk = "hello world " * 5  # 60 characters, with the full distribution: ~3 KB per reply
        while not stop.is_set():
            sent[i] += 1
            yield pb.PredictStreamRequest(text=chunk, full_distribution=True, top_k=5)

    channel = grpc.insecure_channel(relay.address)
    calls = []
    try:
        stub = pb_grpc.NextCharServiceStub(channel)
        stub.Predict(pb.PredictRequest(text="warm up"), timeout=10)  # HTTP/2 set up through the relay
        relay.mute_replies()
        before = server.rss_kb()
        calls = [stub.PredictStream(flood(i), timeout=60) for i in range(NEVER_READ_STREAMS)]
        # the windows (grown by BDP probing) take a few seconds to fill; then every send waits
        deadline, last = time.monotonic() + STALL_WITHIN, -1
        while sum(sent) != last:
            assert time.monotonic() < deadline, f"sends never stalled ({sum(sent)} sent): no backpressure"
            last = sum(sent)
            time.sleep(STALL_QUIET)
        stalled_rss = server.rss_kb()
        time.sleep(STALL_QUIET)
        final_rss = server.rss_kb()
        print(
            f"never-read: {sum(sent)} requests sent, server RSS {before} -> {stalled_rss} -> {final_rss} KiB"
        )
        assert sum(sent) == last, "sends resumed without anyone reading"
        assert final_rss - before < RSS_GROWTH_LIMIT_KB, f"server RSS grew by {final_rss - before} KiB"
        assert final_rss - stalled_rss < 1024, "server RSS still growing while the client is stalled"
        assert server.stub.Predict(pb.PredictRequest(text="hello"), timeout=10).predictions.count == 5
    finally:
        stop.set()
        for call in calls:
            cancel(call)
        channel.close()
        relay.close()
        server.close()


# ---------------------------------------------------------------- SIGKILL during a model save

SAVE_KILLS = 5
BIG_HIDDEN = 1024  # rnn H=1024: ~4 MB of parameters, so a save takes long enough to be hit


def test_sigkill_during_a_save_leaves_the_previous_version_intact(tmp_path: Path) -> None:
    """The writer is killed while its temp file exists, i.e. inside save_model, several times."""
    path = tmp_path / "big" / "1.npz"
    rng = random.Random(5)
    for _ in range(SAVE_KILLS):
        writer = client_process("save", str(path), str(BIG_HIDDEN))
        try:
            assert read_line(writer) == "saving 1"
            assert read_line(writer) == "saving 2"  # save 1 is complete: there is a version to keep
            wait_for_temp_file(path, writer)
            time.sleep(rng.uniform(0.0, 0.005))
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait(10)
        loaded = load_model(path)  # checksum verified: a complete file, old or new, never a torn one
        assert loaded.model.config.hidden == BIG_HIDDEN and loaded.summary["iteration"] >= 1
    registry = Registry(tmp_path)
    registry.load_all()  # temp files left by the kills are not versions
    assert [(mv.name, mv.version, mv.available) for mv in registry.versions()] == [("big", 1, True)]
    leftovers = [p.name for p in path.parent.iterdir() if p != path]
    assert leftovers, "no kill landed inside a save"
    assert all(name.startswith(".1.npz.") and name.endswith(".tmp") for name in leftovers), leftovers


def wait_for_temp_file(path: Path, writer: subprocess.Popen[str], timeout: float = 20.0) -> None:
    """Until a save of path is under way (its temp file exists), polling every millisecond."""
    seen = {p.name for p in path.parent.glob(".*.tmp")} if path.parent.exists() else set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and writer.poll() is None:
        if path.parent.exists() and {p.name for p in path.parent.glob(".*.tmp")} - seen:
            return
        time.sleep(0.001)
    raise AssertionError("the writer never started a save")


# ---------------------------------------------------------------- divergence while streams run

DIVERGING_TEXT = "hello world, this is a test of divergence. " * 30
STREAM_TEXT = "hello world hello world hello world "
STREAMS = 4


def run_streams(
    srv: ServerThread, until: threading.Event | None = None, rounds: int = 1
) -> list[tuple[str, np.ndarray]]:
    """STREAMS concurrent streams, one character per message: each repeats its text `rounds` times,
    and keeps going until `until` is set (at most 200 times)."""
    results: list[tuple[str, np.ndarray]] = []
    lock = threading.Lock()

    def one() -> None:
        for i in range(200):
            if i >= rounds and (until is None or until.is_set()):
                return
            replies = stream_chars(srv.stub, STREAM_TEXT)
            with lock:
                results.append((top1(replies[0].vocab, replies), surprisals(replies)))

    threads = [threading.Thread(target=one) for _ in range(STREAMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_diverging_training_fails_clearly_and_streams_are_unaffected(model_dir: Path) -> None:
    srv = start_server(model_dir)
    try:
        baseline_top1, baseline_bits = run_streams(srv)[0]
        models_before = srv.stub.ListModels(pb.ListModelsRequest(), timeout=5).models
        done = threading.Event()
        events: list[pb.TrainResponse] = []

        def train() -> None:
            config = pb.TrainConfigSpec(
                seq_len=32, batch=4, epochs=30, lr=10.0, optimizer="adam", clip="none", val_fraction=0
            )
            request = pb.TrainRequest(
                model_name="blowup",
                text=DIVERGING_TEXT,
                model_config=pb.ModelConfigSpec(cell="rnn", hidden=64),
                train_config=config,
            )
            try:
                events.extend(srv.stub.Train(request, timeout=120))
            finally:
                done.set()

        trainer = threading.Thread(target=train)
        trainer.start()
        during = run_streams(srv, until=done, rounds=3)
        trainer.join(120)

        job = events[-1].event.job
        assert job.state == pb.JOB_STATE_FAILED, job
        assert "first step" in job.error or "diverg" in job.error.lower(), job.error
        models_after = srv.stub.ListModels(pb.ListModelsRequest(), timeout=5).models
        assert [m.model for m in models_after] == [m.model for m in models_before]  # nothing registered
        assert len(during) >= STREAMS * 3
        for got_top1, got_bits in during:
            assert got_top1 == baseline_top1
            # float32 sums come out in another order when other streams share the batch
            np.testing.assert_allclose(got_bits, baseline_bits, rtol=1e-4, atol=1e-5)
    finally:
        srv.close()
