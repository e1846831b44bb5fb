"""Every row of the status-code table in docs/api.md, over the network; bad input loses nothing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from nextchar.core.demo import NOTEBOOK_TEXT
from nextchar.proto import nextchar_pb2 as pb
from server_harness import ServerThread, cancel, error_details, make_registry, start_server, take, wait_until


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models")
    make_registry(path, versions=1)
    return path


@pytest.fixture(scope="module")
def srv(model_dir: Path) -> Iterator[ServerThread]:
    server = start_server(model_dir, max_chunk_chars=64, max_generate_chars=100_000)
    yield server
    server.close()


def status_of(fn: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    code, message, _ = refusal(fn)
    return code, message


def refusal(fn: Callable[[], Any]) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """(status code, message, the nextchar-* details of the trailing metadata, prefix dropped)."""
    with pytest.raises(grpc.RpcError) as err:
        result = fn()
        if isinstance(result, Iterator):
            list(result)
    return err.value.code(), str(err.value.details()), error_details(err.value)


def session(srv: ServerThread, **fields: Any) -> str:
    return str(srv.stub.CreateSession(pb.CreateSessionRequest(**fields), timeout=5).session.session_id)


def predict(srv: ServerThread, **fields: Any) -> Callable[[], Any]:
    return lambda: srv.stub.Predict(pb.PredictRequest(**fields), timeout=5)


def train(srv: ServerThread, text: str = NOTEBOOK_TEXT * 4, **fields: Any) -> Callable[[], Any]:
    return lambda: srv.stub.Train(pb.TrainRequest(text=text, **fields), timeout=10)


def gen(srv: ServerThread, **fields: Any) -> Callable[[], Any]:
    return lambda: srv.stub.Generate(pb.GenerateRequest(**fields), timeout=10)


def test_unknown_session_is_not_found(srv: ServerThread) -> None:
    code, message, details = refusal(predict(srv, session_id="nobody", text="h"))
    assert code == grpc.StatusCode.NOT_FOUND and "no such session" in message
    assert details == {"subject": "session"}


def test_closed_session_is_not_found_with_the_reason(srv: ServerThread) -> None:
    sid = session(srv)
    srv.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=5)
    code, message, details = refusal(predict(srv, session_id=sid, text="h"))
    assert code == grpc.StatusCode.NOT_FOUND and "closed" in message
    assert details == {"subject": "session", "reason": "closed"}  # machine-readable, beside the words


def test_idle_and_lifetime_expiry_are_not_found_with_the_reason(model_dir: Path) -> None:
    # an idle time a busy machine's gaps between one client's calls stay under (0.3 s did not:
    # `busy` below expired idle before its lifetime), and a lifetime well past it
    srv = start_server(model_dir, idle_timeout=1.0, session_lifetime=2.5)
    try:
        idle, swept = session(srv), session(srv)
        # the sweeper (every 0.2 s) removes `swept` unasked, once idle for 1 s
        wait_until(lambda: not srv.server.sessions.store.contains(swept), 10, "the idle session swept")
        for _ in range(2):  # the reason is remembered, not only reported once
            code, message, details = refusal(predict(srv, session_id=idle, text="h"))
            assert code == grpc.StatusCode.NOT_FOUND and "idle" in message and details["reason"] == "idle"
        busy, start = session(srv), time.monotonic()
        with pytest.raises(grpc.RpcError) as err:  # keep `busy` in use until its lifetime ends
            while time.monotonic() - start < 10:
                srv.stub.Predict(pb.PredictRequest(session_id=busy, text="h"), timeout=5)
                time.sleep(0.05)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "lifetime" in str(err.value.details())
        assert error_details(err.value)["reason"] == "lifetime"
        assert time.monotonic() - start >= 2.4
    finally:
        srv.close()


def test_evicted_session_is_not_found_with_the_reason(tmp_path: Path) -> None:
    """A session whose model version is deleted ends; its id then says why, in words and as a detail."""
    make_registry(tmp_path, versions=2)
    server = start_server(tmp_path)
    try:
        doomed = pb.ModelRef(name="default", version=2)
        sid = session(server, model=doomed)
        server.stub.DeleteModel(pb.DeleteModelRequest(model=doomed), timeout=5)
        for call in (
            predict(server, session_id=sid, text="h"),
            lambda: server.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=5),
        ):
            code, message, details = refusal(call)
            assert code == grpc.StatusCode.NOT_FOUND and "evicted" in message and "v2" in message
            assert details == {"subject": "session", "reason": "evicted"}
        assert (
            server.stub.Predict(pb.PredictRequest(text="h"), timeout=5).predictions.count == 1
        )  # v1 serves on
    finally:
        server.close()


def test_duplicate_session_id_already_exists(srv: ServerThread) -> None:
    session(srv, session_id="dup")
    code, details = status_of(lambda: session(srv, session_id="dup"))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "session_id" in details
    code, _ = status_of(
        lambda: srv.stub.ForkSession(pb.ForkSessionRequest(source_session_id="dup", session_id="dup"))
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"text": ""}, "text"),
        ({"text": "x" * 65}, "max_chunk_chars"),
        ({"text": "h", "top_k": 10}, "top_k"),
        ({"text": "h", "model": pb.ModelRef(name="Bad Name!")}, "model.name"),
    ],
)
def test_bad_prediction_input_is_invalid_argument_and_loses_nothing(
    srv: ServerThread, fields: dict[str, Any], named: str
) -> None:
    sid = session(srv, prime_text="hel")
    with_session = {**fields, "session_id": sid} if "model" not in fields else fields
    code, details = status_of(predict(srv, **with_session))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and named in details
    assert srv.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=5).session.offset == 3


def test_bad_chunk_mid_stream_ends_the_stream_but_keeps_the_session(srv: ServerThread) -> None:
    sid = session(srv)
    requests = [pb.PredictStreamRequest(session_id=sid, text="hello"), pb.PredictStreamRequest(text="")]
    call = srv.stub.PredictStream(iter(requests), timeout=5)
    assert take(call).predictions.count == 5
    code, details = status_of(lambda: list(call))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "text" in details
    assert srv.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=5).session.offset == 5
    other = [
        pb.PredictStreamRequest(session_id=sid, text="h"),
        pb.PredictStreamRequest(session_id="other", text="h"),
    ]
    code, details = status_of(lambda: srv.stub.PredictStream(iter(other), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "session_id" in details


def test_bad_session_id_and_bad_blob_are_invalid_argument(srv: ServerThread) -> None:
    code, details = status_of(lambda: session(srv, session_id="has space"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "session_id" in details
    code, details = status_of(
        lambda: srv.stub.ImportSession(pb.ImportSessionRequest(blob=b"\xff\x00junk"), timeout=5)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "blob" in details


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"length": 0}, "length"),
        ({"length": 10, "temperature": -1.0}, "temperature"),
        ({"length": 10, "temperature": 1000.0}, "temperature"),
        ({"length": 10, "top_p": 1.5}, "top_p"),
    ],
)
def test_bad_sampling_parameters_are_invalid_argument(
    srv: ServerThread, fields: dict[str, Any], named: str
) -> None:
    code, details = status_of(gen(srv, **fields))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and named in details


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"model_config": pb.ModelConfigSpec(hidden=5000)}, "hidden"),
        ({"model_config": pb.ModelConfigSpec(cell="transformer")}, "cell"),
        ({"train_config": pb.TrainConfigSpec(lr=50.0)}, "lr"),
        ({"train_config": pb.TrainConfigSpec(optimizer="rmsprop")}, "optimizer"),
        ({"train_config": pb.TrainConfigSpec(val_fraction=0.9)}, "val_fraction"),
        ({"model_name": "No Such Name"}, "model.name"),
    ],
)
def test_out_of_range_hyperparameters_are_invalid_argument(
    srv: ServerThread, fields: dict[str, Any], named: str
) -> None:
    code, details = status_of(train(srv, **fields))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and named in details


def test_training_text_shorter_than_one_sequence_is_invalid_argument(srv: ServerThread) -> None:
    code, details = status_of(train(srv, text="hello", train_config=pb.TrainConfigSpec(seq_len=16, batch=2)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "text" in details
    code, details = status_of(train(srv, text=""))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "text" in details


def test_unknown_model_and_unknown_job_are_not_found(srv: ServerThread) -> None:
    code, message, details = refusal(lambda: session(srv, model=pb.ModelRef(name="nosuch")))
    assert code == grpc.StatusCode.NOT_FOUND and "nosuch" in message and details == {"subject": "model"}
    code, _, details = refusal(lambda: session(srv, model=pb.ModelRef(name="default", version=99)))
    assert code == grpc.StatusCode.NOT_FOUND and details == {"subject": "model"}
    code, _, details = refusal(lambda: srv.stub.WatchJob(pb.WatchJobRequest(job_id="job-0"), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND and details == {"subject": "job"}
    code, _ = status_of(lambda: srv.stub.CancelJob(pb.CancelJobRequest(job_id="job-0"), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND


def test_session_cap_refuses_new_sessions_and_never_starves_live_ones(model_dir: Path) -> None:
    srv = start_server(model_dir, max_sessions=2)
    try:
        a, _ = session(srv), session(srv)
        for call in (
            lambda: session(srv),
            lambda: srv.stub.ForkSession(pb.ForkSessionRequest(source_session_id=a), timeout=5),
            lambda: srv.stub.PredictStream(iter([pb.PredictStreamRequest(text="h")]), timeout=5),
        ):
            code, details = status_of(call)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "cap" in details
        assert (
            srv.stub.Predict(pb.PredictRequest(session_id=a, text="hello"), timeout=5).predictions.count == 5
        )
    finally:
        srv.close()


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_full_server_evicts_the_session_idle_the_longest_not_one_in_use(
    model_dir: Path, store: str, request: pytest.FixtureRequest
) -> None:
    """Sessions created and never used filled the cap and locked every new client out until they
    idled out (30 minutes): now, once the idlest has been idle session_evict_idle seconds, it makes
    room for a new one (its client is told why: NOT_FOUND, reason evicted); a session in use stays."""
    url = request.getfixturevalue("redis_server").url if store == "redis" else ""
    if url:
        request.getfixturevalue("redis_server").client.flushall()
    # 2 s: the three creates and the refused fourth finish well inside it, on a slow machine too
    srv = start_server(model_dir, max_sessions=3, session_evict_idle=2.0, store=url, shared_models=False)
    try:
        hoarded = [session(srv), session(srv)]
        used = session(srv)
        code, message = status_of(lambda: session(srv))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "cap" in message  # none idle long enough yet
        time.sleep(2.1)
        srv.stub.Predict(pb.PredictRequest(session_id=used, text="h"), timeout=5)  # in use: stays
        newcomer = session(srv)
        code, _, why = refusal(
            lambda: srv.stub.GetSession(pb.GetSessionRequest(session_id=hoarded[0]), timeout=5)
        )
        assert code == grpc.StatusCode.NOT_FOUND and why["reason"] == "evicted"
        for sid in (hoarded[1], used, newcomer):
            assert (
                srv.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=5).session.session_id == sid
            )
    finally:
        srv.close()


def test_draining_refuses_new_sessions_with_unavailable(model_dir: Path) -> None:
    srv = start_server(model_dir, grace=5.0)
    try:
        sid = session(srv)
        call = srv.stub.PredictStream(iter([pb.PredictStreamRequest(session_id=sid, text="h")]), timeout=5)
        srv.server.sessions.draining = (
            True  # the first thing drain() does; the full drain is in test_server_drain
        )
        code, details = status_of(lambda: session(srv))
        assert code == grpc.StatusCode.UNAVAILABLE and "draining" in details
        assert (
            srv.stub.Predict(pb.PredictRequest(session_id=sid, text="ello"), timeout=5).predictions.count == 4
        )
        assert len(list(call)) == 1
    finally:
        srv.close()


def test_oversized_message_is_resource_exhausted(model_dir: Path) -> None:
    srv = start_server(model_dir, max_message_bytes=8192)
    try:
        code, _ = status_of(train(srv, text="x" * 20_000))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        srv.close()


def test_deadline_and_client_cancel_are_honoured(srv: ServerThread) -> None:
    code, _ = status_of(lambda: srv.stub.Generate(pb.GenerateRequest(length=100_000), timeout=0.05))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    call = srv.stub.Generate(pb.GenerateRequest(length=100_000), timeout=10)
    take(call)
    cancel(call)
    code, _ = status_of(lambda: list(call))
    assert code == grpc.StatusCode.CANCELLED
    # the server is unharmed
    assert srv.stub.Predict(pb.PredictRequest(text="hello"), timeout=5).predictions.count == 5
