"""Shared fixtures: the corpus (core/data, in every clone) and small trained models."""

from __future__ import annotations

import os

# Before gRPC is imported. pexpect forks this process for every pty it opens, and with gRPC's
# fork support on (the default) a fork taken while the threads of a server running in this
# process poll left the child dead before it ran anything (epoll_wait: Bad file descriptor:
# test_cli_terminal failed about one run in five). No test forks a process that goes on to
# use gRPC: the servers' own processes are spawned.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

from collections.abc import Iterator

import pytest
from job_harness import CORPUS
from redis_harness import RedisServer
from server_harness import DroppingProxy, ServerThread, make_registry, start_server


@pytest.fixture
def shakespeare() -> str:
    """A slice of tinyshakespeare, the corpus every clone has (core/data): no test skips for want of it."""
    return CORPUS.read_text()[:60_000]


# ---------------------------------------------------------------- a live server (client and CLI tests)


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """One server for the client and CLI tests, serving the notebook model (tiny and fast, and what
    they predict); a real first start installs the shipped model instead (test_default_model)."""
    model_dir = tmp_path_factory.mktemp("models")
    make_registry(model_dir, versions=1)
    server = start_server(model_dir)
    yield server
    server.close()


@pytest.fixture(scope="session")
def server_address(live_server: ServerThread) -> str:
    return f"127.0.0.1:{live_server.port}"


@pytest.fixture
def proxy(server_address: str) -> Iterator[DroppingProxy]:
    relay = DroppingProxy(server_address)
    yield relay
    relay.close()


# ---------------------------------------------------------------- a real redis-server (shared session store)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the shared-store tests; each test's sessions have their own random ids."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()
