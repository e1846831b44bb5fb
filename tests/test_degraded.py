"""A shared store that is up but cannot do its job: health says so, and the models stay listed.

On a real redis-server: one over its ``maxmemory`` (``noeviction``) that still answers PING
while refusing every write, and one restarted empty under a running replica.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from nextchar.proto import nextchar_pb2 as pb
from redis_harness import RedisServer
from server_harness import ServerProcess, make_registry, wait_until

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_follows_whether_the_store_takes_writes(tmp_path: Path) -> None:
    """Sessions fill a Redis of 3 MB with noeviction until it refuses their writes: every call is
    UNAVAILABLE, so health turns NOT_SERVING (it stayed SERVING: Redis still answers PING) and a
    load balancer stops sending traffic; given more memory, health is SERVING and calls work."""
    make_registry(tmp_path / "models", versions=1)
    store = RedisServer(tmp_path, "--maxmemory", "3mb", "--maxmemory-policy", "noeviction")
    srv = ServerProcess(tmp_path / "models", "--store", store.url, "--local-models")
    try:
        assert srv.status() == SERVING
        for _ in range(100_000):
            try:
                srv.stub.CreateSession(pb.CreateSessionRequest(), timeout=5)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                assert "maxmemory" in str(err.details())
                break
        else:
            pytest.fail("a 3 MB Redis took 100,000 sessions")
        wait_until(lambda: srv.status() == NOT_SERVING, 10, "health NOT_SERVING while writes fail")
        srv.wait_for_line(r"session store .* refuses writes \(.*maxmemory", timeout=5)
        store.client.config_set("maxmemory", "64mb")
        wait_until(lambda: srv.status() == SERVING, 10, "health SERVING once writes succeed")
        assert srv.stub.CreateSession(pb.CreateSessionRequest(), timeout=5).session.session_id
    finally:
        srv.close()
        store.stop()


def model_refs(srv: ServerProcess) -> tuple[set[tuple[str, int]], tuple[str, int]]:
    """The versions a replica lists, and its default."""
    reply = srv.stub.ListModels(pb.ListModelsRequest(), timeout=10)
    default = (reply.default_model.name, reply.default_model.version)
    return {(m.model.name, m.model.version) for m in reply.models}, default


def test_models_a_redis_restarted_empty_lost_are_published_again(tmp_path: Path) -> None:
    """Redis restarted without persistence holds no model: the replica listed 0 models (and new
    sessions found no default) while its old sessions ran on the cached default. A replica that
    sees the store lost its models publishes again the versions it holds, and the default: it
    lists them, new sessions work, and a replica started afterwards sees them too."""
    store = RedisServer(tmp_path)
    srv = ServerProcess(tmp_path / "a", "--store", store.url)
    other: ServerProcess | None = None
    try:
        before = model_refs(srv)
        assert before[0] and before[1] in before[0]
        store.stop()
        store.start()  # empty
        wait_until(lambda: srv.status() == SERVING, 10, "the replica back on the restarted store")
        assert model_refs(srv) == before
        assert srv.stub.CreateSession(pb.CreateSessionRequest(), timeout=5).session.model.version
        srv.wait_for_line(r"model registry .* lost its models", timeout=5)
        other = ServerProcess(tmp_path / "b", "--store", store.url, "--no-default-model")
        assert model_refs(other) == before
        assert other.stub.Predict(pb.PredictRequest(text="to be"), timeout=10).predictions.count == 5
    finally:
        for server in (srv, other):
            if server is not None:
                server.close()
        store.stop()
