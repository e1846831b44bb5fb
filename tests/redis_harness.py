"""A real redis-server for the shared-store tests: a free loopback port, a temp dir, no persistence.

``.ci/run`` installs Debian's redis-server; where the binary is absent the tests that
need it skip and say so. ``stop``/``start`` restart it on the same port (empty, as
a restarted Redis without persistence is), for the outage tests.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis
from nextchar.proto import nextchar_pb2 as pb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server); .ci/run installs it")
        self.binary, self.directory, self.port = binary, directory, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis(port=self.port, socket_timeout=2)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        cmd = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self.proc = subprocess.Popen([*cmd, "--dir", str(self.directory)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise AssertionError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
        self.client.connection_pool.disconnect()

    def hget(self, key: str, field: str) -> bytes | None:
        value = self.client.hget(key, field)
        assert value is None or isinstance(value, bytes)
        return value

    def stored_offset(self, session_id: str) -> int | None:
        """The offset of the value the store last wrote for a session (its snapshot's), if any."""
        snap = self.hget(f"nextchar:s:{session_id}", "snap")
        return None if snap is None else int(pb.SessionSnapshot.FromString(snap).offset)
