"""Shared fixtures: the corpus location (optional) and small trained models."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from nextchar.server.app import NextCharServer, create_server
from nextchar.server.config import ServerConfig

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shakespeare() -> str:
    """A slice of tinyshakespeare; the tests that use it skip where ../shared is absent."""
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"{path} not present (only on the development machines)")
    return path.read_text()[:60_000]


# ---------------------------------------------------------------- a live server (client and CLI tests)


T = TypeVar("T")


@dataclass
class LiveServer:
    """A real nextchar server on 127.0.0.1:<free port>, its asyncio loop on a background thread."""

    address: str
    model_dir: Path
    server: NextCharServer
    loop: asyncio.AbstractEventLoop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the server's loop (e.g. to inspect or change its state)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for the session, with the default (notebook) model trained on first start."""
    model_dir = tmp_path_factory.mktemp("models")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="live-server", daemon=True)
    thread.start()
    config = ServerConfig(port=0, model_dir=model_dir, grace=0.5)
    server, port = asyncio.run_coroutine_threadsafe(create_server(config), loop).result(120)
    live = LiveServer(f"127.0.0.1:{port}", model_dir, server, loop)
    yield live
    live.run(server.stop(0))
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


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
def proxy(live_server: LiveServer) -> Iterator[DroppingProxy]:
    relay = DroppingProxy(live_server.address)
    yield relay
    relay.close()
