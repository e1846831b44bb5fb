"""Models and training over the network: jobs in worker processes, registry, hot-swap, health, reflection."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from nextchar.core.demo import NOTEBOOK_TEXT
from nextchar.proto import nextchar_pb2 as pb
from server_harness import (
    ServerThread,
    cancel,
    expected,
    make_registry,
    start_server,
    surprisals,
    take,
    train_notebook_model,
)

TEXT = NOTEBOOK_TEXT * 8
SMALL = pb.ModelConfigSpec(cell="rnn", hidden=16)


def quick(**fields: float | int | str) -> pb.TrainConfigSpec:
    spec: dict[str, float | int | str] = {
        "seq_len": 16,
        "batch": 2,
        "epochs": 3,
        "val_fraction": 0.1,
        "log_every": 2,
    }
    spec.update(fields)
    return pb.TrainConfigSpec(**spec)  # type: ignore[arg-type]


def wait_job(srv: ServerThread, job_id: str) -> list[pb.WatchJobResponse]:
    return list(srv.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=60))


def versions(srv: ServerThread, name: str) -> list[int]:
    listed = srv.stub.ListModels(pb.ListModelsRequest(), timeout=5).models
    return [m.model.version for m in listed if m.model.name == name]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    model_dir = tmp_path_factory.mktemp("models")
    make_registry(model_dir, versions=1)
    server = start_server(model_dir, max_jobs=1)
    yield server
    server.close()


def test_train_streams_progress_and_registers_a_version(srv: ServerThread) -> None:
    events = [
        r.event
        for r in srv.stub.Train(
            pb.TrainRequest(model_name="small", text=TEXT, model_config=SMALL, train_config=quick()),
            timeout=60,
        )
    ]
    assert events[0].job.state == pb.JOB_STATE_RUNNING and not events[0].HasField("progress")
    final = events[-1].job
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert final.result.name == "small" and final.result.version == 1
    progress = [e.progress for e in events if e.HasField("progress")]
    assert progress and progress[-1].kind == "epoch" and progress[-1].epoch == 3
    assert progress[-1].HasField("val_bpc") and progress[-1].chars_per_sec > 0
    history = srv.stub.GetModelHistory(pb.GetModelHistoryRequest(model=final.result), timeout=5).records
    assert len(history) == len(progress)
    described = srv.stub.DescribeModel(pb.DescribeModelRequest(model=final.result), timeout=5)
    assert described.info.hidden == 16 and described.info.available
    assert described.vocab == "".join(sorted(set(TEXT)))
    assert json.loads(described.config_json)["cell"] == "rnn"
    # a session on the new version works and the default did not move (promote was false)
    created = srv.stub.CreateSession(pb.CreateSessionRequest(model=final.result), timeout=5)
    assert created.session.model.name == "small"
    assert srv.stub.ListModels(pb.ListModelsRequest(), timeout=5).default_model.name == "default"
    watched = wait_job(srv, final.job_id)
    assert [e.event.progress.step for e in watched if e.event.HasField("progress")] == [
        p.step for p in progress
    ]


def test_regularisation_and_schedule_travel_to_the_trainer_and_into_the_file(srv: ServerThread) -> None:
    config = quick(dropout=0.2, weight_decay=0.01, schedule="cosine", warmup_steps=2, min_lr=0.1)
    events = [
        r.event
        for r in srv.stub.Train(
            pb.TrainRequest(model_name="regularised", text=TEXT, model_config=SMALL, train_config=config),
            timeout=60,
        )
    ]
    final = events[-1].job
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    described = srv.stub.DescribeModel(pb.DescribeModelRequest(model=final.result), timeout=5)
    recorded = json.loads(described.summary_json)["config"]
    assert {k: recorded[k] for k in ("dropout", "weight_decay", "schedule", "warmup_steps", "min_lr")} == {
        "dropout": 0.2,
        "weight_decay": 0.01,
        "schedule": "cosine",
        "warmup_steps": 2,
        "min_lr": 0.1,
    }
    with pytest.raises(grpc.RpcError) as err:
        list(
            srv.stub.Train(
                pb.TrainRequest(text=TEXT, model_config=SMALL, train_config=quick(dropout=1.0)), timeout=10
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "train_config.dropout" in str(err.value.details())


def test_client_disconnect_does_not_kill_the_job(srv: ServerThread) -> None:
    call = srv.stub.Train(
        pb.TrainRequest(model_name="detached", text=TEXT, model_config=SMALL, train_config=quick(epochs=40)),
        timeout=60,
    )
    job_id = take(call).event.job.job_id
    cancel(call)
    events = wait_job(srv, job_id)
    assert events[-1].event.job.state == pb.JOB_STATE_SUCCEEDED
    assert versions(srv, "detached") == [1]
    jobs = srv.stub.ListJobs(pb.ListJobsRequest(), timeout=5).jobs
    assert job_id in [j.job_id for j in jobs]


def test_cancel_registers_nothing(srv: ServerThread) -> None:
    call = srv.stub.Train(
        pb.TrainRequest(
            model_name="cancelled", text=TEXT, model_config=SMALL, train_config=quick(epochs=100000)
        ),
        timeout=60,
    )
    first = take(call).event.job
    # while it runs, a second job waits in the queue (max_jobs 1) instead of being refused
    second = srv.stub.Train(
        pb.TrainRequest(model_name="second", text=TEXT, model_config=SMALL, train_config=quick()), timeout=60
    )
    queued = take(second).event.job
    assert queued.state == pb.JOB_STATE_QUEUED and queued.queue_position == 1
    srv.stub.CancelJob(pb.CancelJobRequest(job_id=first.job_id), timeout=5)
    last = list(call)[-1].event.job
    assert last.state == pb.JOB_STATE_CANCELLED and "cancel" in last.error
    assert versions(srv, "cancelled") == []
    assert list(second)[-1].event.job.state == pb.JOB_STATE_SUCCEEDED  # the queue moved on
    assert versions(srv, "second") == [1]


def test_a_trainer_that_keeps_dying_fails_its_job_with_a_reason(srv: ServerThread) -> None:
    call = srv.stub.Train(
        pb.TrainRequest(
            model_name="killed", text=TEXT, model_config=SMALL, train_config=quick(epochs=100000)
        ),
        timeout=60,
    )
    job_id = take(call).event.job.job_id
    killed: set[int] = set()
    deadline = time.monotonic() + 60
    while len(killed) < 3 and time.monotonic() < deadline:  # each death restarts it from its checkpoint
        running = srv.server.trainers.running.get(job_id)
        process = running.process if running else None
        if (
            process is not None
            and process.pid is not None
            and process.pid not in killed
            and process.is_alive()
        ):
            killed.add(process.pid)
            process.kill()
        time.sleep(0.05)
    last = list(call)[-1].event.job
    assert last.state == pb.JOB_STATE_FAILED and "died 3 times" in last.error and last.attempts == 3
    assert versions(srv, "killed") == []


def test_health_and_reflection(srv: ServerThread) -> None:
    health = health_pb2_grpc.HealthStub(srv.channel)
    for service in ("", "nextchar.v1.NextCharService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(srv.channel)
    answers = reflect.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for s in take(answers).list_services_response.service}
    assert "nextchar.v1.NextCharService" in names and "grpc.health.v1.Health" in names


def test_hot_swap_while_a_stream_is_live(tmp_path: Path) -> None:
    registry = make_registry(tmp_path, versions=2)  # v1 default, v2 another model
    v1, v2 = registry.resolve("default", 1).net, registry.resolve("default", 2).net
    assert v1 is not None and v2 is not None
    srv = start_server(tmp_path)
    try:
        feed: queue.Queue[pb.PredictStreamRequest | None] = queue.Queue()
        call = srv.stub.PredictStream(iter(feed.get, None), timeout=30)
        responses = []
        for i, ch in enumerate(NOTEBOOK_TEXT):
            feed.put(pb.PredictStreamRequest(text=ch))
            responses.append(take(call))
            if i == 10:
                swapped = srv.stub.SetDefaultModel(
                    pb.SetDefaultModelRequest(model=pb.ModelRef(version=2)), timeout=5
                )
                assert swapped.default_model.version == 2 and swapped.previous.version == 1
        feed.put(None)
        assert list(call) == []
        assert {r.model.version for r in responses} == {1}  # the live session finished on its version
        np.testing.assert_allclose(
            surprisals(responses), expected(v1, NOTEBOOK_TEXT)[1], rtol=1e-4, atol=1e-5
        )
        new = srv.stub.CreateSession(pb.CreateSessionRequest(), timeout=5).session
        assert new.model.version == 2
        got = srv.stub.Predict(pb.PredictRequest(session_id=new.session_id, text=NOTEBOOK_TEXT), timeout=5)
        np.testing.assert_allclose(
            got.predictions.surprisal_bits, expected(v2, NOTEBOOK_TEXT)[1], rtol=1e-4, atol=1e-5
        )
        assert json.loads((tmp_path / "_default.json").read_text()) == {"name": "default", "version": 2}
    finally:
        srv.close()


def test_corrupt_file_marks_version_unavailable_and_server_starts(tmp_path: Path) -> None:
    make_registry(tmp_path, versions=1)
    good = (tmp_path / "default" / "1.npz").read_bytes()
    (tmp_path / "default" / "2.npz").write_bytes(good[: len(good) // 2])  # truncated
    srv = start_server(tmp_path)
    try:
        models = {m.model.version: m for m in srv.stub.ListModels(pb.ListModelsRequest(), timeout=5).models}
        assert models[1].available and not models[2].available
        assert "2.npz" in models[2].reason
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.CreateSession(
                pb.CreateSessionRequest(model=pb.ModelRef(name="default", version=2)), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "unavailable" in str(
            err.value.details()
        )
        # the newest AVAILABLE version is what version 0 means
        assert srv.stub.CreateSession(pb.CreateSessionRequest(), timeout=5).session.model.version == 1
    finally:
        srv.close()


def test_delete_evicts_its_sessions_and_protects_the_default(tmp_path: Path) -> None:
    make_registry(tmp_path, versions=2)
    srv = start_server(tmp_path)
    try:
        ref = pb.ModelRef(name="default", version=2)
        sid = srv.stub.CreateSession(pb.CreateSessionRequest(model=ref), timeout=5).session.session_id
        srv.stub.DeleteModel(pb.DeleteModelRequest(model=ref), timeout=5)
        assert not (tmp_path / "default" / "2.npz").exists()
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.Predict(pb.PredictRequest(session_id=sid, text="h"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "evicted" in str(err.value.details())
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.DeleteModel(
                pb.DeleteModelRequest(model=pb.ModelRef(name="default", version=1)), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        srv.close()


def test_deleting_a_models_last_version_leaves_no_directory(tmp_path: Path) -> None:
    registry = make_registry(tmp_path, versions=1)
    model, history, summary = train_notebook_model(epochs=20)
    registry.register("other", model, history=history, summary=summary)
    assert (tmp_path / "other" / "1.npz").is_file()
    registry.delete("other", 1)
    assert not (tmp_path / "other").exists()  # not an empty directory a listing would show


def test_empty_registry_serves_the_shipped_default_at_once(tmp_path: Path) -> None:
    """No training at start: the shipped Shakespeare model is installed as default v1."""
    start = time.perf_counter()
    srv = start_server(tmp_path / "fresh")
    try:
        assert time.perf_counter() - start < 10
        listed = srv.stub.ListModels(pb.ListModelsRequest(), timeout=5)
        assert listed.default_model.name == "default" and listed.default_model.version == 1
        (info,) = listed.models
        assert (info.cell, info.hidden, info.vocab_size) == ("gru", 256, 66)
        r = srv.stub.Predict(pb.PredictRequest(text="To be, or not to", top_k=1), timeout=5)
        assert ("\ufffd" + r.vocab)[r.predictions.top_index[-1]] == " "
        assert not r.predictions.unknown_positions
    finally:
        srv.close()


def test_only_versions_in_use_hold_their_network_and_a_released_one_loads_again(tmp_path: Path) -> None:
    """A registry lists every version ever trained and held every network (50 versions of the
    shipped GRU-256: +92 MB in each replica and trainer). Now every file is checked at start, the
    default holds its network, another loads it when asked (the same weights), the idle ones let
    go, and a file damaged meanwhile makes its version unavailable instead of serving it."""
    from nextchar.server import messages
    from nextchar.server.errors import FailedPrecondition
    from nextchar.server.registry import Registry

    make_registry(tmp_path, versions=2)  # default v1 (the default), default v2
    written = Registry(tmp_path)
    written.load_all()
    third = written.register("other", written.resolve("default", 2).require(), history=[], summary={})
    registry = Registry(tmp_path)
    registry.load_all()
    held = {(mv.name, mv.version): mv.net is not None for mv in registry.versions()}
    assert held == {("default", 1): True, ("default", 2): False, ("other", 1): False}
    assert all(mv.available for mv in registry.versions())
    v2 = registry.resolve("default", 2, need_available=False)
    info = messages.model_info(v2, registry.default)  # listing needs no network
    assert (
        v2.net is None and info.available and info.hidden > 0 and info.vocab_size == len(v2.vocab_chars) + 1
    )
    net = v2.require()
    for name, array in third.require().params.items():  # the same file's weights, loaded again
        np.testing.assert_array_equal(net.params[name], array)
    assert registry.release_idle(idle=0.0) == 1 and v2.net is None  # the default keeps its own
    assert registry.default is not None and registry.default.net is not None
    (tmp_path / "other" / "1.npz").write_bytes(b"not a model any more")
    other = registry.resolve("other", 1, need_available=False)
    with pytest.raises(FailedPrecondition, match="unavailable"):
        other.require()
    assert not other.available and "other/1.npz" in other.reason
