"""Shared fixtures: the corpus location (optional) and small trained models."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_harness import ServerThread, start_server

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shakespeare() -> str:
    """A slice of tinyshakespeare; the tests that use it skip where ../shared is absent."""
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"{path} not present (only on the development machines)")
    return path.read_text()[:60_000]


# ---------------------------------------------------------------- a live server (client and CLI tests)


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """One server for the client and CLI tests; it trains the embedded default model on start."""
    server = start_server(tmp_path_factory.mktemp("models"))
    yield server
    server.close()


@pytest.fixture(scope="session")
def server_address(live_server: ServerThread) -> str:
    return f"127.0.0.1:{live_server.port}"


class DroppingProxy:
    """A TCP relay in front of a server whose live connections can be cut, as a network blip would."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def drop(self) -> None:
        """Cut every live connection (both directions); new connections are accepted as before."""
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.listener.close()
        self.drop()


@pytest.fixture
def proxy(server_address: str) -> Iterator[DroppingProxy]:
    relay = DroppingProxy(server_address)
    yield relay
    relay.close()
