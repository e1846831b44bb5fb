"""The shared session store on a real redis-server: replicas (in-process servers) sharing sessions.

A session advanced on one replica continues exactly on another; replicas racing on
one session never both advance it (the version check); tombstones and expiry
reasons cross replicas; write-every-N writes state every N characters and flushes
on stop; a Redis restart is UNAVAILABLE naming the store, then recovery.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nextchar.core.demo import NOTEBOOK_TEXT
from nextchar.core.model import CharRNN
from nextchar.proto import nextchar_pb2 as pb
from nextchar.server.sessions.redis_store import RedisSessionStore, key
from redis_harness import RedisServer
from server_harness import (
    ServerThread,
    expected,
    make_registry,
    replicas,
    start_server,
    stream_chars,
    surprisals,
    top1,
    wait_until,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    make_registry(directory, versions=1)
    return directory


@pytest.fixture(scope="module")
def pair(model_dir: Path, redis_server: RedisServer) -> Iterator[tuple[ServerThread, ServerThread]]:
    with replicas(model_dir, redis_server.url) as both:
        yield both


@pytest.fixture(scope="module")
def model(pair: tuple[ServerThread, ServerThread]) -> CharRNN:
    net = pair[0].server.registry.resolve("default", 1).net
    assert net is not None
    return net


def create(srv: ServerThread) -> str:
    return str(srv.stub.CreateSession(pb.CreateSessionRequest(), timeout=5).session.session_id)


def offset(srv: ServerThread, sid: str) -> int:
    return int(srv.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=5).session.offset)


def shared(srv: ServerThread) -> RedisSessionStore:
    assert isinstance(srv.server.store, RedisSessionStore)
    return srv.server.store


def test_a_session_continues_exactly_on_another_replica(
    pair: tuple[ServerThread, ServerThread], model: CharRNN
) -> None:
    a, b = pair
    sid, half = create(a), len(NOTEBOOK_TEXT) // 2
    first = stream_chars(a.stub, NOTEBOOK_TEXT[:half], session_id=sid)
    second = stream_chars(b.stub, NOTEBOOK_TEXT[half:], session_id=sid)
    vocab = first[0].vocab
    want_top1, want_surprisal = expected(model, NOTEBOOK_TEXT + "hello")
    assert top1(vocab, first) + top1(vocab, second) == want_top1[: len(NOTEBOOK_TEXT)]
    got = np.concatenate([surprisals(first), surprisals(second)])
    np.testing.assert_allclose(got, want_surprisal[: len(NOTEBOOK_TEXT)], rtol=1e-4, atol=1e-5)
    assert offset(a, sid) == len(NOTEBOOK_TEXT)  # a's memory was behind: it asked the store
    # a's hot copy is stale: the write-back check refuses it, a reloads and re-runs the chunk
    third = stream_chars(a.stub, "hello", session_id=sid)
    assert top1(vocab, third) == want_top1[len(NOTEBOOK_TEXT) :]
    assert [r.predictions.start_offset for r in third] == list(
        range(len(NOTEBOOK_TEXT), len(NOTEBOOK_TEXT) + 5)
    )


def test_list_sessions_pages_through_every_replica_s_sessions(
    pair: tuple[ServerThread, ServerThread],
) -> None:
    """ListSessions on the shared store (it answered INTERNAL once any session existed: the
    store read its hashes as flat lists, and redis-py hands them over as dicts)."""
    a, b = pair
    made = {create(a), create(b), create(a)}
    stream_chars(b.stub, "hello", session_id=sorted(made)[0])
    listed, token = {}, ""
    while True:
        page = a.stub.ListSessions(pb.ListSessionsRequest(page_size=2, page_token=token), timeout=5)
        assert len(page.sessions) <= 2 and page.total >= len(made)
        listed.update({s.session_id: s.offset for s in page.sessions})
        if not (token := page.next_page_token):
            break
    assert made <= listed.keys()
    assert listed[sorted(made)[0]] == 5 and {listed[sid] for sid in made} == {0, 5}


def test_racing_replicas_never_both_advance_a_session(
    pair: tuple[ServerThread, ServerThread], model: CharRNN, redis_server: RedisServer
) -> None:
    a, b = pair
    sid = create(a)
    answered: list[tuple[int, str, int, float]] = []  # (start offset, char, top-1 index, surprisal)
    refused: list[grpc.StatusCode] = []
    conflicts_before = shared(a).conflicts + shared(b).conflicts

    def hammer(srv: ServerThread, char: str) -> None:
        channel, stub = srv.new_stub()
        for _ in range(30):
            try:
                r = stub.Predict(pb.PredictRequest(session_id=sid, text=char, top_k=1), timeout=10)
            except grpc.RpcError as err:
                refused.append(err.code())
                continue
            p = r.predictions
            answered.append((p.start_offset, char, p.top_index[0], p.surprisal_bits[0]))
        channel.close()

    threads = [
        threading.Thread(target=hammer, args=(srv, c)) for srv, c in [(a, "l"), (a, "o"), (b, "h"), (b, " ")]
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    answered.sort()
    conflicts = shared(a).conflicts + shared(b).conflicts - conflicts_before
    print(f"race: {len(answered)} answered, {len(refused)} refused, {conflicts} version conflicts re-run")
    assert set(refused) <= {grpc.StatusCode.ABORTED}
    # every offset answered exactly once: no two replicas advanced the session from the same state
    assert [o for o, *_ in answered] == list(range(len(answered)))
    assert offset(b, sid) == offset(a, sid) == len(answered)
    assert conflicts > 0, "the replicas never raced: the test proved nothing"
    text = "".join(c for _, c, _, _ in answered)
    want_top1, want_surprisal = expected(model, text)
    vocab = model.vocab.chars
    assert "".join(("\ufffd" + vocab)[i] for _, _, i, _ in answered) == want_top1
    np.testing.assert_allclose([s for *_, s in answered], want_surprisal, rtol=1e-4, atol=1e-5)
    assert redis_server.stored_offset(sid) == len(answered)


def test_tombstones_and_expiry_reasons_cross_replicas(model_dir: Path, redis_server: RedisServer) -> None:
    # database 1: replicas sharing a store share its timeouts, and the pair on database 0 has others
    url = redis_server.url.removesuffix("/0") + "/1"
    # an idle time a busy machine's gaps between one client's calls stay under (0.3 s did not
    # always), and a lifetime well past it
    a = start_server(model_dir, store=url, shared_models=False, idle_timeout=1.0, session_lifetime=2.5)
    b = start_server(model_dir, store=url, shared_models=False, idle_timeout=1.0, session_lifetime=2.5)
    try:
        closed, idle = create(a), create(a)
        a.stub.CloseSession(pb.CloseSessionRequest(session_id=closed), timeout=5)
        for sid, reason in [(closed, "closed by the client"), ("never-existed", "no such session")]:
            with pytest.raises(grpc.RpcError) as err:
                b.stub.Predict(pb.PredictRequest(session_id=sid, text="h"), timeout=5)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and reason in str(err.value.details())
        busy, start = create(a), time.monotonic()
        with pytest.raises(grpc.RpcError) as err:  # used on both replicas until its lifetime ends
            while time.monotonic() - start < 10:
                for srv in (a, b):
                    srv.stub.Predict(pb.PredictRequest(session_id=busy, text="h"), timeout=5)
                time.sleep(0.05)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "lifetime of 2.5 s" in str(
            err.value.details()
        )
        assert 2.4 < time.monotonic() - start < 5.0
        for srv in (b, a):  # idle since creation, long ago: the reason, on either replica
            with pytest.raises(grpc.RpcError) as err:
                srv.stub.GetSession(pb.GetSessionRequest(session_id=idle), timeout=5)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and "idle for more than 1 s" in str(
                err.value.details()
            )
    finally:
        a.close()
        b.close()


def test_deleting_a_model_evicts_its_sessions_held_by_another_replica(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Replica A deletes a version whose session lives on replica B (never loaded on A): the
    delete succeeds and the session is gone on both, saying why."""
    make_registry(tmp_path, versions=2)
    url = redis_server.url.removesuffix("/0") + "/2"  # a database of its own
    a = start_server(tmp_path, store=url, shared_models=False)
    b = start_server(tmp_path, store=url, shared_models=False)
    try:
        v2 = pb.ModelRef(name="default", version=2)
        sid = b.stub.CreateSession(
            pb.CreateSessionRequest(model=v2, prime_text="hel"), timeout=5
        ).session.session_id
        deleted = a.stub.DeleteModel(pb.DeleteModelRequest(model=v2), timeout=5)
        assert (deleted.model.name, deleted.model.version) == ("default", 2)
        for srv in (b, a):
            with pytest.raises(grpc.RpcError) as err:
                srv.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=5)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert "evicted: model default v2 was deleted" in str(err.value.details())
    finally:
        a.close()
        b.close()


def test_write_every_n_writes_state_every_n_chars_and_flushes_on_stop(
    model_dir: Path, redis_server: RedisServer, pair: tuple[ServerThread, ServerThread]
) -> None:
    lazy = start_server(model_dir, store=redis_server.url, shared_models=False, store_write_every=4)
    try:
        sid = create(lazy)
        stream_chars(lazy.stub, "hello ", session_id=sid)
        assert redis_server.stored_offset(sid) == 4  # the state written at 4 characters, not 5 or 6
        assert offset(lazy, sid) == 6  # its own copy is ahead of the store's
        assert redis_server.hget(key(sid), "by") == f"127.0.0.1:{lazy.port}".encode()
    finally:
        lazy.close()  # stopping writes back what was not written yet
    assert redis_server.stored_offset(sid) == 6
    assert offset(pair[1], sid) == 6


def test_redis_restarted_mid_load_is_unavailable_then_recovers(model_dir: Path, tmp_path: Path) -> None:
    store = RedisServer(tmp_path)
    srv = start_server(model_dir, store=store.url, shared_models=False, sweep_interval=0.2)
    health = health_pb2_grpc.HealthStub(srv.channel)

    def status() -> int:
        return int(health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status)

    def wait_for(want: int) -> float:
        start = time.monotonic()
        while status() != want:
            assert time.monotonic() - start < 5, f"health never became {want}"
            time.sleep(0.05)
        return time.monotonic() - start

    codes: list[grpc.StatusCode] = []
    stop = threading.Event()

    def load() -> None:  # new sessions streaming all along, through the outage
        channel, stub = srv.new_stub()
        while not stop.is_set():
            try:
                stream_chars(stub, "hello world", chunk=3)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
                time.sleep(0.02)
        channel.close()

    try:
        old = create(srv)
        loader = threading.Thread(target=load)
        loader.start()
        wait_until(lambda: grpc.StatusCode.OK in codes, 10, "a stream served before the outage")
        store.stop()
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.Predict(pb.PredictRequest(session_id=old, text="h"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"session store {store.url}" in str(err.value.details())
        down = wait_for(health_pb2.HealthCheckResponse.NOT_SERVING)
        store.start()  # empty: no persistence
        up = wait_for(health_pb2.HealthCheckResponse.SERVING)
        served = len(codes)
        wait_until(lambda: grpc.StatusCode.OK in codes[served:], 10, "a stream served after the restart")
        stop.set()
        loader.join(10)
        print(f"redis restart: health NOT_SERVING after {down:.2f} s, SERVING {up:.2f} s after the restart")
        print(f"load through the outage: {len(codes)} streams, codes {sorted({c.name for c in codes})}")
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
        assert grpc.StatusCode.UNAVAILABLE in codes and codes[-1] == grpc.StatusCode.OK
        with pytest.raises(grpc.RpcError) as err:  # the restarted Redis lost it: never served from memory
            srv.stub.Predict(pb.PredictRequest(session_id=old, text="h"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert stream_chars(srv.stub, "hello")[-1].predictions.start_offset == 4
    finally:
        stop.set()
        srv.close()
        store.stop()


def test_store_round_trips_are_timed_in_the_metrics(pair: tuple[ServerThread, ServerThread]) -> None:
    a, _ = pair
    registry = a.server.metrics.registry
    before = registry.get_sample_value("nextchar_store_rtt_seconds_count") or 0.0
    sid = create(a)
    stream_chars(a.stub, "hello", sid)
    after = registry.get_sample_value("nextchar_store_rtt_seconds_count") or 0.0
    assert after >= before + 2  # at least the create and one write-back
