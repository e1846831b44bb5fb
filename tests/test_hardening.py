"""What a broken or hostile client found, each mended at its root and kept mended here.

Each test is one way the service once failed from outside: a model name that broke
the registry, a snapshot that broke Generate, ids and texts without bounds, a top_k
Generate did not check, children that outlived a SIGKILLed server, temp files a
killed save left, two streams interleaving on one session, and server paths in
messages. Real servers on real ports (a subprocess where a signal is involved).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import re
import signal
import threading
import time
import types
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from nextchar.core.demo import NOTEBOOK_TEXT
from nextchar.proto import nextchar_pb2 as pb
from nextchar.proto import nextchar_pb2_grpc as pb_grpc
from nextchar.server.registry import Registry
from server_harness import (
    ServerProcess,
    ServerThread,
    cancel,
    children,
    error_details,
    ignores_sigint,
    make_registry,
    start_server,
    take,
    train_notebook_model,
    wait_until,
)


def refused(call: object) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    with pytest.raises(grpc.RpcError) as err:
        result = call() if callable(call) else call
        if isinstance(result, Iterator):
            list(result)
    return err.value.code(), str(err.value.details()), error_details(err.value)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    model_dir = tmp_path_factory.mktemp("models")
    make_registry(model_dir, versions=1)
    server = start_server(model_dir, max_prime_chars=1000, max_vocab=100)
    yield server
    server.close()


# ---------------------------------------------------------------- the registry


def test_a_model_named_like_a_registry_file_cannot_break_the_registry(tmp_path: Path) -> None:
    """Once `default.json` was the default pointer's file name; a model of that name broke
    every SetDefaultModel with UNKNOWN. The registry's files now start with '_', which no
    model name can, and a pointer from before is moved there at start."""
    make_registry(tmp_path, versions=1)
    (tmp_path / "_default.json").rename(tmp_path / "default.json")  # a registry from before
    registry = Registry(tmp_path)
    registry.load_all()  # what every server and `train --local` does first
    model, history, summary = train_notebook_model(epochs=5)
    registry.register("default.json", model, history=history, summary=summary)
    srv = start_server(tmp_path)
    try:
        for name in ("default.json", "default"):
            reply = srv.stub.SetDefaultModel(
                pb.SetDefaultModelRequest(model=pb.ModelRef(name=name, version=1)), timeout=5
            )
            assert reply.default_model.name == name
        listed = srv.stub.ListModels(pb.ListModelsRequest(), timeout=5)
        assert sorted(m.model.name for m in listed.models) == ["default", "default.json"]
        assert json.loads((tmp_path / "_default.json").read_text()) == {"name": "default", "version": 1}
        assert not (tmp_path / "default.json").is_file()
    finally:
        srv.close()


def test_a_default_that_cannot_load_gives_way_to_an_available_version(tmp_path: Path) -> None:
    make_registry(tmp_path, versions=2)  # default v1 is the default; v2 exists
    (tmp_path / "_default.json").write_text(json.dumps({"name": "default", "version": 2}))
    (tmp_path / "default" / "2.npz").write_bytes(b"not a model")
    srv = start_server(tmp_path)
    try:
        reply = srv.stub.Predict(pb.PredictRequest(text="hel"), timeout=5)
        assert reply.model.version == 1
        listed = srv.stub.ListModels(pb.ListModelsRequest(), timeout=5)
        assert listed.default_model.version == 1
        broken = next(m for m in listed.models if m.model.version == 2)
        assert not broken.available and "default/2.npz" in broken.reason
        assert str(tmp_path) not in broken.reason  # no server paths in what clients read
        code, message, _ = refused(
            lambda: srv.stub.Predict(
                pb.PredictRequest(text="h", model=pb.ModelRef(name="default", version=2)), timeout=5
            )
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and str(tmp_path) not in message
    finally:
        srv.close()


def test_temporary_files_a_killed_save_left_are_removed_at_start(tmp_path: Path) -> None:
    make_registry(tmp_path, versions=1)
    stale = tmp_path / "default" / ".2.npz.abc123.tmp"
    fresh = tmp_path / "default" / ".3.npz.def456.tmp"  # a save under way in another process right now
    for path in (stale, fresh):
        path.write_bytes(b"half a model")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    registry = Registry(tmp_path)
    registry.load_all()
    assert not stale.exists() and fresh.exists()
    assert [(mv.name, mv.version) for mv in registry.versions()] == [("default", 1)]


# ---------------------------------------------------------------- sessions


def test_an_imported_snapshot_with_zero_probabilities_still_generates(srv: ServerThread) -> None:
    """The prediction of an imported session is computed from its state, not taken from the blob."""
    sid = srv.stub.CreateSession(pb.CreateSessionRequest(prime_text="hello"), timeout=5).session.session_id
    blob = srv.stub.ExportSession(pb.ExportSessionRequest(session_id=sid), timeout=5).blob
    snapshot = pb.SessionSnapshot.FromString(blob)
    snapshot.probs = bytes(len(snapshot.probs))  # all zero
    imported = srv.stub.ImportSession(pb.ImportSessionRequest(blob=snapshot.SerializeToString()), timeout=5)
    new_id = imported.session.session_id
    text = "".join(
        r.text
        for r in srv.stub.Generate(
            pb.GenerateRequest(session_id=new_id, length=20, seed=1, fork=True), timeout=10
        )
    )
    assert len(text) == 20
    same = srv.stub.Predict(pb.PredictRequest(session_id=sid, text=" "), timeout=5).predictions
    twin = srv.stub.Predict(pb.PredictRequest(session_id=new_id, text=" "), timeout=5).predictions
    assert list(twin.surprisal_bits) == pytest.approx(list(same.surprisal_bits), rel=1e-6)


@pytest.mark.parametrize("value", [3e38, -3e38, 1.5])
def test_an_imported_state_no_model_run_reaches_is_refused(srv: ServerThread, value: float) -> None:
    """A finite state beyond tanh's range (one step later its probabilities were NaN, and a
    Generate on it failed the whole batch it was in, well-behaved callers too) is refused at the
    door, INVALID_ARGUMENT; the session it came from goes on as before."""
    sid = srv.stub.CreateSession(pb.CreateSessionRequest(prime_text="hello"), timeout=5).session.session_id
    snapshot = pb.SessionSnapshot.FromString(
        srv.stub.ExportSession(pb.ExportSessionRequest(session_id=sid), timeout=5).blob
    )
    state = np.frombuffer(snapshot.state, dtype=np.dtype(snapshot.dtype).newbyteorder("<")).copy()
    state[len(state) // 2] = value
    snapshot.state = state.astype(state.dtype.newbyteorder("<")).tobytes()
    code, message, _ = refused(
        lambda: srv.stub.ImportSession(pb.ImportSessionRequest(blob=snapshot.SerializeToString()), timeout=5)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "outside what model runs reach" in message
    assert srv.stub.Predict(pb.PredictRequest(session_id=sid, text=" "), timeout=5).predictions.count == 1


@pytest.mark.parametrize("bad_id", ["a b/c", "x" * 129, "é", "a\nb"])
def test_malformed_session_ids_are_invalid_argument_on_every_lookup(srv: ServerThread, bad_id: str) -> None:
    for call in (
        lambda: srv.stub.GetSession(pb.GetSessionRequest(session_id=bad_id), timeout=5),
        lambda: srv.stub.Predict(pb.PredictRequest(session_id=bad_id, text="h"), timeout=5),
        lambda: srv.stub.CloseSession(pb.CloseSessionRequest(session_id=bad_id), timeout=5),
        lambda: srv.stub.ForkSession(pb.ForkSessionRequest(source_session_id=bad_id), timeout=5),
    ):
        code, message, _ = refused(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "session_id" in message


def test_long_client_input_is_cut_short_in_messages_and_logs(
    srv: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    long_id = "a" * 20_000  # valid characters, far too long; under the method's size limit
    with caplog.at_level(logging.INFO, logger="nextchar"):
        code, message, _ = refused(
            lambda: srv.stub.GetSession(pb.GetSessionRequest(session_id=long_id), timeout=5)
        )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(message) < 300, message
    lines = [r.getMessage() for r in caplog.records]
    assert lines and max(len(line) for line in lines) < 400, max(lines, key=len)[:100]
    name = "b" * 5000
    code, message, _ = refused(
        lambda: srv.stub.DescribeModel(pb.DescribeModelRequest(model=pb.ModelRef(name=name)), timeout=5)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(message) < 300


def test_prime_text_is_capped_on_create_and_generate(srv: ServerThread) -> None:
    start = time.perf_counter()
    for call in (
        lambda: srv.stub.CreateSession(pb.CreateSessionRequest(prime_text="h" * 1001), timeout=5),
        lambda: srv.stub.Generate(pb.GenerateRequest(prime_text="h" * 1001, length=1), timeout=5),
    ):
        code, message, _ = refused(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_prime_chars" in message
    assert time.perf_counter() - start < 2  # refused at the door, not after priming
    ok = srv.stub.CreateSession(pb.CreateSessionRequest(prime_text="h" * 1000), timeout=10)
    assert ok.session.offset == 1000


def test_generate_checks_top_k_like_predict(srv: ServerThread) -> None:
    vocab = srv.stub.Predict(pb.PredictRequest(text="h"), timeout=5).vocab
    code, message, _ = refused(
        lambda: srv.stub.Generate(pb.GenerateRequest(length=3, top_k=len(vocab) + 2), timeout=5)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in message
    text = "".join(
        r.text for r in srv.stub.Generate(pb.GenerateRequest(length=3, top_k=len(vocab) + 1), timeout=5)
    )
    assert len(text) == 3  # the whole vocabulary, its unknown slot included, is allowed


def test_a_training_text_with_too_many_distinct_characters_is_refused(srv: ServerThread) -> None:
    text = "".join(chr(0x4E00 + i) for i in range(150)) * 20  # 150 distinct, max_vocab is 100
    code, message, _ = refused(
        lambda: list(srv.stub.Train(pb.TrainRequest(model_name="wide", text=text), timeout=10))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_vocab" in message


def test_a_second_stream_on_a_session_takes_it_over(srv: ServerThread) -> None:
    """The last stream attached advances the session; the one before ends ABORTED at its next
    message, so two streams never interleave their text on one replica."""
    sid = srv.stub.CreateSession(pb.CreateSessionRequest(), timeout=5).session.session_id
    first_requests: list[pb.PredictStreamRequest] = [pb.PredictStreamRequest(session_id=sid, text="he")]
    gate = iter_gate(first_requests)
    first = srv.stub.PredictStream(gate, timeout=20)
    assert take(first).predictions.start_offset == 0
    second = srv.stub.PredictStream(iter([pb.PredictStreamRequest(session_id=sid, text="llo")]), timeout=20)
    assert [r.predictions.start_offset for r in second] == [2]
    gate.send(pb.PredictStreamRequest(text="XX"))  # the first stream speaks again
    code, message, _ = refused(lambda: list(first))
    assert code == grpc.StatusCode.ABORTED and "another stream" in message
    info = srv.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=5).session
    assert info.offset == 5  # "he" + "llo"; the first stream's "XX" never landed


class iter_gate(Iterator[pb.PredictStreamRequest]):
    """Requests for a stream: the queued ones, then whatever send() adds; blocks meanwhile."""

    def __init__(self, initial: list[pb.PredictStreamRequest]) -> None:
        import queue

        self._queue: queue.Queue[pb.PredictStreamRequest | None] = queue.Queue()
        for item in initial:
            self._queue.put(item)

    def send(self, item: pb.PredictStreamRequest) -> None:
        self._queue.put(item)

    def __next__(self) -> pb.PredictStreamRequest:
        item = self._queue.get(timeout=30)
        if item is None:
            raise StopIteration
        return item


# ---------------------------------------------------------------- processes


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has died; only its parent's wait is missing


def test_children_die_within_a_second_of_a_sigkilled_server(tmp_path: Path) -> None:
    make_registry(tmp_path, versions=1)
    server = ServerProcess(tmp_path)
    try:
        # epochs of ~10 s with no progress record in between: nothing the trainer writes
        # would notice the server is gone
        quiet = pb.TrainConfigSpec(epochs=1000, batch=1, log_every=1_000_000)
        long_job = pb.TrainRequest(model_name="long", text=NOTEBOOK_TEXT * 20_000, train_config=quiet)
        job = server.stub.Train(long_job, timeout=30)
        assert take(job).event.job.state == pb.JOB_STATE_RUNNING
        deadline = time.monotonic() + 20
        while len(kids := children(server.proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # the compute process and the trainer (and multiprocessing's tracker)
        assert len(kids) >= 2, kids
        # each child asks to die with its server as its first act (nextchar.server.lifeline, which
        # ignores SIGINT just before): one still importing when the server dies notices later
        wait_until(lambda: all(ignores_sigint(k) for k in kids), 30, "every child armed")
        cancel(job)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        deadline = time.monotonic() + 1.5
        while any(alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [k for k in kids if alive(k)], "children outlived their server"
    finally:
        server.close()


def test_a_bug_answers_internal_with_an_error_id_the_log_carries(
    srv: ServerThread, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never UNKNOWN: an exception nobody foresaw becomes INTERNAL, and the id in the reply
    finds the traceback in the log."""

    async def broken(start: int, size: int) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(srv.server.sessions, "page", broken)
    with caplog.at_level(logging.ERROR, logger="nextchar"):
        code, message, details = refused(lambda: srv.stub.ListSessions(pb.ListSessionsRequest(), timeout=5))
    assert code == grpc.StatusCode.INTERNAL and details["error-id"] in message
    logged = [r for r in caplog.records if details["error-id"] in r.getMessage()]
    assert logged and logged[0].exc_info is not None


# ---------------------------------------------------------------- clients that never read

BIG_CHUNK = "to be or not to be, that is the question " * 100  # 4,100 characters: over 4,096
NEVER_READING = 60


def never_reading(
    text: str, full: bool, sent: list[int], i: int, stop: threading.Event
) -> Iterator[pb.PredictStreamRequest]:
    while not stop.is_set():
        sent[i] += 1
        yield pb.PredictStreamRequest(text=text, full_distribution=full)


def settle(sent: list[int], quiet: float = 1.0, within: float = 30.0) -> None:
    """Until the flood stalls: no request sent for `quiet` seconds."""
    deadline, last = time.monotonic() + within, -1
    while sum(sent) != last:
        assert time.monotonic() < deadline, f"sends never stalled ({sum(sent)} sent)"
        last = sum(sent)
        time.sleep(quiet)


def test_streams_that_never_read_big_replies_get_a_bounded_share(tmp_path: Path) -> None:
    """60 streams of 4,096-character chunks with full distributions (~1 MB per reply), never read:
    the server holds at most max_reply_bytes of their replies, refuses the rest with
    RESOURCE_EXHAUSTED, keeps answering others, and gives the memory back once they go."""
    make_registry(tmp_path, versions=1)
    server = ServerProcess(tmp_path, "--max-reply-bytes", str(8 << 20))
    sent, stop = [0] * NEVER_READING, threading.Event()
    channel = grpc.insecure_channel(server.address)
    try:
        stub = pb_grpc.NextCharServiceStub(channel)
        before = server.rss_kb()
        calls = [
            stub.PredictStream(never_reading(BIG_CHUNK[:4096], True, sent, i, stop))
            for i in range(NEVER_READING)
        ]
        settle(sent)
        held = server.rss_kb()
        assert server.stub.Predict(pb.PredictRequest(text="hello"), timeout=10).predictions.count == 5
        stop.set()
        codes = []
        for call in calls:
            try:
                for _ in call:
                    pass
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
        deadline = time.monotonic() + 30.0  # the server returns freed memory every 5 s
        while (after := server.rss_kb()) - before >= 40 * 1024 and time.monotonic() < deadline:
            time.sleep(0.5)
        print(f"never-read big replies: {sum(sent)} requests, RSS {before} -> {held} -> {after} KiB")
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert held - before < 120 * 1024, f"RSS grew by {held - before} KiB"
        assert after - before < 40 * 1024, f"RSS stayed {after - before} KiB above where it started"
    finally:
        stop.set()
        channel.close()
        server.close()


def test_a_reply_bigger_than_the_whole_budget_is_refused_as_never_satisfiable(tmp_path: Path) -> None:
    """A chunk whose reply alone is over max_reply_bytes can never be admitted, however long the
    client waits: INVALID_ARGUMENT naming the limit (it used to say RESOURCE_EXHAUSTED, "retry"),
    on Predict as on a stream; a shorter one still fits."""
    make_registry(tmp_path, versions=1)
    server = ServerProcess(tmp_path, "--max-reply-bytes", str(96 << 10))  # over the 64 KiB always let by
    try:
        chunk = BIG_CHUNK[:4096]  # ~220 KiB with its full distribution
        big = pb.PredictRequest(text=chunk, full_distribution=True)
        code, message, details = refused(lambda: server.stub.Predict(big, timeout=10))
        assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, {"limit": "max_reply_bytes"}), message
        assert "max_reply_bytes" in message and "retry" not in message
        streamed = pb.PredictStreamRequest(text=chunk, full_distribution=True)
        stream = server.stub.PredictStream(iter([streamed]), timeout=10)
        assert refused(lambda: list(stream))[0] == grpc.StatusCode.INVALID_ARGUMENT
        reply = server.stub.Predict(pb.PredictRequest(text=chunk[:1000], full_distribution=True), timeout=10)
        assert reply.predictions.count == 1000
    finally:
        server.close()


def test_a_one_character_writer_that_never_reads_stalls_without_growing_the_server(tmp_path: Path) -> None:
    """The server's receive windows stay at HTTP/2's default (no BDP growth): a flood of tiny
    requests fills them, and the writer's sends stall."""
    make_registry(tmp_path, versions=1)
    server = ServerProcess(tmp_path)
    sent, stop = [0], threading.Event()
    channel = grpc.insecure_channel(server.address)
    try:
        stub = pb_grpc.NextCharServiceStub(channel)
        before = server.rss_kb()
        call = stub.PredictStream(never_reading("a", False, sent, 0, stop))
        settle(sent, within=60.0)
        grown = server.rss_kb() - before
        print(f"never-read one-character writer: stalled after {sent[0]} requests, RSS +{grown} KiB")
        assert grown < 16 * 1024
        cancel(call)
    finally:
        stop.set()
        channel.close()
        server.close()


def test_memory_a_flood_of_big_requests_took_comes_back(tmp_path: Path) -> None:
    """Long-id requests (60,000 characters, each refused) flooding beside a stream that never
    reads: gRPC's threads take the buffers, and once the flood stops and the server is idle the
    memory is back (it stayed ~150 MB up for good while each thread had a malloc arena of its own)."""
    make_registry(tmp_path, versions=1)
    server = ServerProcess(tmp_path)
    sent, stop = [0], threading.Event()
    stuck, flood = grpc.insecure_channel(server.address), grpc.insecure_channel(server.address)
    try:
        before = server.rss_kb()
        call = pb_grpc.NextCharServiceStub(stuck).PredictStream(never_reading("a", False, sent, 0, stop))
        stub, codes = pb_grpc.NextCharServiceStub(flood), set()
        end = time.monotonic() + 10.0
        while time.monotonic() < end:
            try:
                stub.GetSession(pb.GetSessionRequest(session_id="i" * 60_000), timeout=5)
            except grpc.RpcError as err:
                codes.add(err.code())
        peak = server.rss_kb()
        stop.set()
        cancel(call)
        deadline = time.monotonic() + 30.0  # the idle server trims within a few seconds
        while (after := server.rss_kb()) - before > 24 * 1024 and time.monotonic() < deadline:
            time.sleep(1.0)
        print(f"long-id flood beside a stuck stream: RSS {before} -> {peak} -> {after} KiB")
        assert codes == {grpc.StatusCode.INVALID_ARGUMENT}
        assert after - before <= 24 * 1024, f"RSS stayed {after - before} KiB above where it started"
    finally:
        stop.set()
        stuck.close()
        flood.close()
        server.close()


def test_memory_long_predicts_took_comes_back_once_idle(tmp_path: Path) -> None:
    """200 unary Predicts of 4,096 characters with every character's top 9: each call's reply
    budget was given back by a done-callback gRPC keeps in a reference cycle with the call's
    core state, so each call's reply stayed in memory until a collection, which an idle server
    never reached (118 such calls kept 12 MB for good)."""
    make_registry(tmp_path, versions=1)
    server = ServerProcess(tmp_path)
    try:
        before = server.rss_kb()
        text = (NOTEBOOK_TEXT * (4096 // len(NOTEBOOK_TEXT) + 1))[:4096]
        for _ in range(200):
            server.stub.Predict(pb.PredictRequest(text=text, top_k=9), timeout=30)
        peak = server.rss_kb()
        deadline = time.monotonic() + 30.0  # the idle server trims within a few seconds
        while (after := server.rss_kb()) - before > 8 * 1024 and time.monotonic() < deadline:
            time.sleep(1.0)
        print(f"200 long Predicts: RSS {before} -> {peak} -> {after} KiB")
        assert after - before <= 8 * 1024, f"RSS stayed {after - before} KiB above where it started"
    finally:
        server.close()


@pytest.mark.parametrize("method", ["GetSession", "UploadText"])
def test_refused_calls_leave_no_reference_cycles(srv: ServerThread, method: str) -> None:
    """Bytes that are not a request are refused INVALID_ARGUMENT, and no refused call's state is
    left for the garbage collector. The refusal's error held its traceback, whose frames held the
    request that held the error, and with them the call's context and gRPC's call state: ~18
    objects per call (~31 for an upload) in cycles that an idle server never collected (make
    bench-abuse's malformed kind left ~900 calls' worth 30 s after)."""
    service = pb.DESCRIPTOR.services_by_name["NextCharService"]
    path = f"/{service.full_name}/{method}"
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    streaming = service.methods_by_name[method].client_streaming
    upload = channel.stream_unary(path, None, None)
    unary = channel.unary_unary(path, None, None)

    def garbage() -> object:  # (raw bytes: no serializer)
        return (
            upload(iter([b"\xff\xff\xff"]), timeout=10) if streaming else unary(b"\xff\xff\xff", timeout=10)
        )

    def refused_calls(n: int) -> None:
        codes = []
        for _ in range(n):
            try:
                garbage()
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * n

    refused_calls(10)  # every path warmed
    time.sleep(0.3)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds unreachable is kept for counting
    try:
        refused_calls(100)
        time.sleep(0.3)  # each call's end has run on the server's loop
        gc.collect()
        held = [
            o
            for o in gc.garbage
            if type(o).__name__ in ("_ServicerContext", "RPCState")  # (the server's call state)
            or (isinstance(o, types.FrameType) and "nextchar" in o.f_code.co_filename)
        ]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        channel.close()
    assert not held, f"{len(held)} of the refused calls' frames and call states left in cycles"


def test_a_text_bigger_than_any_message_trains_through_an_upload(tmp_path: Path) -> None:
    """Every message stays under 4 MiB; the client library uploads a bigger text in pieces first."""
    make_registry(tmp_path, versions=1)
    srv = start_server(tmp_path)
    try:
        from nextchar.client import NextCharClient, TrainConfig

        text = NOTEBOOK_TEXT * 160_000  # 5.6 MB: more than max_message_bytes
        with NextCharClient(f"127.0.0.1:{srv.port}") as client:
            code, _, _ = refused(
                lambda: list(srv.stub.Train(pb.TrainRequest(model_name="big", text=text), timeout=30))
            )
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            info = client.train(text, name="big", train_config=TrainConfig(max_chars=4096, val_fraction=0.0))
        assert info.model.name == "big" and info.model.version == 1
        assert not list((tmp_path / "_texts").glob(".*.tmp"))
        code, _, details = refused(
            lambda: list(srv.stub.Train(pb.TrainRequest(text_id="0" * 32), timeout=10))
        )
        assert code == grpc.StatusCode.NOT_FOUND and details == {"subject": "text"}
    finally:
        srv.close()


def test_past_max_streams_the_longest_idle_call_makes_room_and_active_streams_stay(tmp_path: Path) -> None:
    """A client opening streams (or uploads) by the thousand and never sending grew the server
    ~14 KB each, without bound (20,000: 66 -> 349 MB). Past max_streams the call idle the longest
    is closed (RESOURCE_EXHAUSTED) for each new one, so the open ones stay at the cap; one that keeps
    sending is never the one closed, and a new well-behaved stream always gets in (refusing new
    calls instead let the idle holder lock everyone out)."""
    make_registry(tmp_path, versions=1)
    server = ServerProcess(tmp_path, "--max-streams", "100", "--metrics-port", "0")
    metrics = next(m for line in server.log if (m := re.search(r"metrics on (http://\S+)", line)))

    def scraped(name: str) -> str:
        text = urllib.request.urlopen(metrics.group(1), timeout=5).read().decode()
        return next(line.split()[-1] for line in text.splitlines() if line.startswith(name))

    async def until_scraped(name: str, want: str, within: float = 30.0) -> None:
        """Until the server counts what the client did (its calls arrive in their own time)."""
        deadline = time.monotonic() + within
        while (got := scraped(name)) != want:
            assert time.monotonic() < deadline, f"{name} stayed {got}, not {want}"
            await asyncio.sleep(0.1)

    async def attack() -> None:
        channel: Any = grpc.aio.insecure_channel(server.address)
        stub: Any = pb_grpc.NextCharServiceStub(channel)  # grpc-stubs predate aio streams
        try:
            active = stub.PredictStream()
            await active.write(pb.PredictStreamRequest(text="h"))
            await active.read()
            idle = [stub.PredictStream() for _ in range(99)]  # the cap reached, never a message
            await until_scraped("nextchar_streams_open", "100.0")  # all 99 held before `active` moves
            await active.write(pb.PredictStreamRequest(text="e"))  # now the most recently active
            await active.read()
            extra = [stub.PredictStream() for _ in range(60)]  # each closes the longest idle one
            await until_scraped("nextchar_streams_evicted_total", "60.0")
            assert scraped("nextchar_streams_open") == "100.0"
            closed = await asyncio.wait_for(asyncio.gather(*(c.code() for c in idle[:60])), 30)
            assert set(closed) == {grpc.StatusCode.RESOURCE_EXHAUSTED}  # the oldest idle ones went
            assert "max_streams" in str(await idle[0].details())
            assert not any(c.done() for c in idle[60:])  # the younger idle ones are still open
            fresh = extra[-1]  # a new stream is open and serves
            await fresh.write(pb.PredictStreamRequest(text="h"))
            assert (await fresh.read()).predictions.count == 1
            await active.write(pb.PredictStreamRequest(text="l"))  # the active one never went
            assert (await active.read()).predictions.count == 1
            with pytest.raises(grpc.aio.AioRpcError) as err:  # unary calls are not held: answered
                await stub.GetSession(pb.GetSessionRequest(session_id="absent"), timeout=5)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            for call in (active, *idle[60:], *extra):
                call.cancel()
        finally:
            await channel.close()

    try:
        asyncio.run(attack())
    finally:
        server.close()


@contextlib.asynccontextmanager
async def two_connections(address: str) -> AsyncIterator[tuple[Any, Any]]:
    """Two stubs, each on a connection of its own (grpc.aio channels share one otherwise)."""
    own = [("grpc.use_local_subchannel_pool", 1)]
    channels: list[Any] = [grpc.aio.insecure_channel(address, options=own) for _ in range(2)]
    try:
        yield pb_grpc.NextCharServiceStub(channels[0]), pb_grpc.NextCharServiceStub(channels[1])
    finally:
        for channel in channels:
            await channel.close()


def test_past_max_streams_the_connection_holding_the_most_calls_loses_one(tmp_path: Path) -> None:
    """A well-behaved client's 10 streams, each a message in and then quiet (a user thinking), and
    then a flood of 300 streams on another connection (10 answered once, 290 that never send),
    max_streams 100: the flood's own oldest calls are closed for room, not the older, quieter
    streams of the other client (when the call idle the longest of all went, a flood arriving
    faster than the server read first messages closed every stream a well-behaved client opened
    meanwhile: make bench-abuse). The flood's 10 answered calls are its oldest on the server; the
    290 silent ones reach it in no set order (their handlers start as gRPC hands them over)."""
    make_registry(tmp_path, versions=1)
    server = ServerProcess(tmp_path, "--max-streams", "100")

    async def attack() -> None:
        async with two_connections(server.address) as (stub, flooder):
            streams = [stub.PredictStream() for _ in range(10)]
            for call in streams:
                await call.write(pb.PredictStreamRequest(text="h"))
                await call.read()
            idle = [flooder.PredictStream() for _ in range(10)]
            for call in idle:  # the flood's first ones, surely its oldest on the server: answered once
                await call.write(pb.PredictStreamRequest(text="h"))
                await call.read()
            idle += [flooder.PredictStream() for _ in range(290)]  # reach the server in any order
            for call in idle[:10]:  # the flood's oldest: closed once its later ones arrive
                assert await asyncio.wait_for(call.code(), 30) == grpc.StatusCode.RESOURCE_EXHAUSTED
            deadline = time.monotonic() + 30
            while sum(c.done() for c in idle) < 210:  # 10 + 300 open, 100 kept
                assert time.monotonic() < deadline, f"{sum(c.done() for c in idle)} of the flood closed"
                await asyncio.sleep(0.1)
            for call in idle:
                if call.done():
                    assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for call in streams:  # the quiet client's streams all stayed
                await call.write(pb.PredictStreamRequest(text="e"))
                assert (await call.read()).predictions.count == 1
            for call in (*streams, *idle):
                call.cancel()

    try:
        asyncio.run(attack())
    finally:
        server.close()


def test_one_connection_holds_at_most_max_streams_per_connection_and_others_still_get_in(
    tmp_path: Path,
) -> None:
    """max_streams_per_connection is HTTP/2's MAX_CONCURRENT_STREAMS: of 80 streams one connection
    opens (each sends a message), 30 are answered, the rest wait in the client until one of those
    ends; meanwhile another connection's stream is served at once. (Unbounded, one connection
    opening thousands of streams filled gRPC's queue of calls not yet handed to the server, and
    gRPC cancelled the new calls of every other client: make bench-abuse.)"""
    make_registry(tmp_path, versions=1)
    server = ServerProcess(tmp_path, "--max-streams-per-connection", "30")

    async def attack() -> None:
        async with two_connections(server.address) as (stub, other):
            calls = [stub.PredictStream() for _ in range(80)]
            # a stream waiting for a slot waits in its write: all are written at once
            writes = [asyncio.ensure_future(call.write(pb.PredictStreamRequest(text="h"))) for call in calls]
            replies = [asyncio.ensure_future(call.read()) for call in calls]
            deadline = time.monotonic() + 30
            while sum(r.done() for r in replies) < 30 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # a 31st, were it let in, would be answered by now
            answered = [i for i, r in enumerate(replies) if r.done()]
            assert len(answered) == 30, f"{len(answered)} of one connection's streams were served"
            newcomer = other.PredictStream()
            await newcomer.write(pb.PredictStreamRequest(text="h"))
            assert (await asyncio.wait_for(newcomer.read(), 10)).predictions.count == 1
            for i in answered[:10]:  # ten end: ten of the waiting ones are served
                calls[i].cancel()
            deadline = time.monotonic() + 10
            while sum(r.done() and not r.cancelled() for r in replies) < 40:
                assert time.monotonic() < deadline, "the waiting streams were not served"
                await asyncio.sleep(0.05)
            for call in (*calls, newcomer):
                call.cancel()
            for task in (*writes, *replies):  # (a write still waiting for its stream's slot)
                task.cancel()
            await asyncio.gather(*writes, *replies, return_exceptions=True)

    try:
        asyncio.run(attack())
    finally:
        server.close()


def test_uploads_cancelled_before_their_first_piece_leave_no_coroutine_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload cancelled (a 20 ms deadline) before the server read a piece (its client sends the
    first one late) left gRPC's request receiver never awaited: a RuntimeWarning per call. With
    warnings as errors in the server, none is reported, and uploads still work."""
    make_registry(tmp_path, versions=1)
    kept = tmp_path / "_texts"
    kept.mkdir()
    for i in range(20_000):  # counting them takes a while: the window before the first read
        (kept / f"{i:032x}.txt").write_text("hello")
    monkeypatch.setenv("PYTHONWARNINGS", "error::RuntimeWarning")
    srv = ServerProcess(tmp_path)
    try:

        def late_piece() -> Iterator[pb.UploadTextRequest]:
            time.sleep(0.2)  # past the deadline: the call ends before the server reads a piece
            yield pb.UploadTextRequest(piece="hello")

        codes = [refused(lambda: srv.stub.UploadText(late_piece(), timeout=0.02))[0] for _ in range(20)]
        assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}
        upload = srv.stub.UploadText(iter([pb.UploadTextRequest(piece=NOTEBOOK_TEXT)]), timeout=30)
        assert upload.chars == len(NOTEBOOK_TEXT)  # after every cancelled one was collected
        srv.stub.ListModels(pb.ListModelsRequest(), timeout=5)
        warned = [line for line in srv.log if "never awaited" in line or "Exception ignored" in line]
        assert not warned, "".join(srv.log[-20:])
    finally:
        srv.close()


def test_uploads_and_queued_jobs_have_a_total_and_a_job_taking_its_text_frees_its_share(
    tmp_path: Path,
) -> None:
    """Uploaded texts wait an hour on disk and queued jobs keep their texts: without totals a
    client uploading (or queueing) again and again filled the disk the models are written to.
    Past max_pending_upload_bytes an upload is refused and leaves nothing; past max_queued_jobs a
    Train is refused and its inline text is removed; a job that takes an upload frees its share."""
    make_registry(tmp_path, versions=1)
    srv = start_server(tmp_path, max_pending_upload_bytes=200_000, max_queued_jobs=1, sweep_interval=3600)
    texts = tmp_path / "_texts"

    def upload(chars: int) -> str:
        pieces = (pb.UploadTextRequest(piece=NOTEBOOK_TEXT[:25] * 4) for _ in range(chars // 100))
        return srv.stub.UploadText(pieces, timeout=30).text_id

    def train(**fields: Any) -> pb.JobInfo:
        config = pb.TrainConfigSpec(epochs=100_000, seq_len=8, batch=1, val_fraction=0.0)
        call = srv.stub.Train(pb.TrainRequest(model_name="capped", train_config=config, **fields), timeout=30)
        return take(call).event.job

    try:
        first = upload(150_000)
        code, message, details = refused(lambda: upload(100_000))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details == {"limit": "max_pending_upload_bytes"}
        assert "max_pending_upload_bytes (200000)" in message
        assert not list(texts.glob(".*.tmp")) and len(list(texts.glob("*.txt"))) == 1
        running = train(text_id=first)  # the trainer takes it: the upload's text moves to the job
        assert not list(texts.glob("*.txt"))
        upload(100_000)  # its share is free again
        waiting = train(text=NOTEBOOK_TEXT * 10)
        assert waiting.state == pb.JOB_STATE_QUEUED and waiting.queue_position == 1
        code, message, details = refused(lambda: train(text=NOTEBOOK_TEXT * 10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details == {"limit": "max_queued_jobs"}
        assert len(list(texts.glob("*.txt"))) == 1  # the refused job's inline text is gone
        for job in (waiting, running):
            srv.stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=10)
    finally:
        srv.close()


def test_a_server_keeps_only_the_newest_ended_jobs(tmp_path: Path) -> None:
    """Every ended job used to stay listed, loaded and held for good: ListJobs' one reply would pass
    max_message_bytes after ~30,000 jobs. The sweep keeps the newest max_finished_jobs."""
    make_registry(tmp_path, versions=1)
    srv = start_server(tmp_path, max_finished_jobs=1, sweep_interval=0.2)
    try:
        config = pb.TrainConfigSpec(epochs=1, seq_len=8, batch=1, val_fraction=0.0)
        finished = []
        for name in ("older", "newer"):
            events = list(
                srv.stub.Train(
                    pb.TrainRequest(model_name=name, text=NOTEBOOK_TEXT, train_config=config), timeout=60
                )
            )
            assert events[-1].event.job.state == pb.JOB_STATE_SUCCEEDED
            finished.append(events[-1].event.job.job_id)
        deadline = time.monotonic() + 10
        while (
            len(listed := srv.stub.ListJobs(pb.ListJobsRequest(), timeout=5).jobs) > 1
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert [j.job_id for j in listed] == finished[1:]
        assert not (tmp_path / "_jobs" / finished[0]).exists()
        assert srv.stub.DescribeModel(
            pb.DescribeModelRequest(model=pb.ModelRef(name="older")), timeout=5
        )  # its model stays
    finally:
        srv.close()


def test_a_train_is_refused_while_the_registry_holds_max_model_bytes(tmp_path: Path) -> None:
    """Every job adds a version to the registry's disk (and to every replica's cache): past
    max_model_bytes a Train is refused (deleting a version makes room), not queued to fill the
    disk the checkpoints and models go to."""
    make_registry(tmp_path, versions=1)
    size = (tmp_path / "default" / "1.npz").stat().st_size
    srv = start_server(tmp_path, max_model_bytes=size + 1)  # room for what is there, not one more
    config = pb.TrainConfigSpec(epochs=1, seq_len=8, batch=1, val_fraction=0.0)

    def train() -> list[pb.TrainResponse]:
        request = pb.TrainRequest(model_name="more", text=NOTEBOOK_TEXT, train_config=config)
        return list(srv.stub.Train(request, timeout=60))

    try:
        assert train()[-1].event.job.state == pb.JOB_STATE_SUCCEEDED  # below the cap: trains
        code, message, details = refused(train)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details == {"limit": "max_model_bytes"}
        assert "DeleteModel" in message and not list((tmp_path / "_texts").glob("*.txt"))
        srv.stub.DeleteModel(pb.DeleteModelRequest(model=pb.ModelRef(name="more", version=1)), timeout=10)
        assert train()[-1].event.job.state == pb.JOB_STATE_SUCCEEDED  # the room is back
    finally:
        srv.close()
