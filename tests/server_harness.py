"""Test harness for the server tests: a REAL nextchar server on 127.0.0.1:0, in a thread or a subprocess.

``ServerThread`` runs the server on its own asyncio loop in a thread; tests talk to
it over the network with the generated synchronous stubs, exactly as a client would,
and use ``run`` to reach into the server's loop (drain, inspect the batcher) when
needed. ``ServerProcess`` runs ``python -m nextchar.cli serve`` for the tests where the
server must be signalled, killed, or have its memory measured on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nextchar.client import NextCharClient
from nextchar.core import losses
from nextchar.core.demo import NOTEBOOK_TEXT, notebook_configs
from nextchar.core.model import CharRNN
from nextchar.core.train import train
from nextchar.proto import nextchar_pb2 as pb
from nextchar.proto import nextchar_pb2_grpc as pb_grpc
from nextchar.server.app import NextCharServer, create_server
from nextchar.server.config import ServerConfig
from nextchar.server.registry import Registry

T = TypeVar("T")
UNK_CHAR = "\ufffd"


def train_notebook_model(
    epochs: int = 200, seed: int = 0
) -> tuple[CharRNN, list[dict[str, Any]], dict[str, Any]]:
    model_config, train_config = notebook_configs(epochs=epochs, seed=seed)
    result = train(NOTEBOOK_TEXT, model_config, train_config)
    return result.model, result.history, result.summary


def error_details(error: grpc.RpcError) -> dict[str, str]:
    """The nextchar-* details of a refused call's trailing metadata, prefix dropped.
    (grpc-stubs types the metadata as objects; at runtime they are (key, value) pairs.)"""
    pairs: Any = error.trailing_metadata() or ()
    return {str(k).removeprefix("nextchar-"): str(v) for k, v in pairs if str(k).startswith("nextchar-")}


def make_registry(model_dir: Path, versions: int = 2) -> Registry:
    """default v1 (the notebook model) and, if asked, default v2 (another seed) for hot-swap tests."""
    registry = Registry(model_dir)
    registry.load_all()
    for v in range(versions):
        model, history, summary = train_notebook_model(epochs=200 - 100 * v, seed=v)
        registry.register("default", model, history=history, summary=summary, promote=(v == 0))
    return registry


class ServerThread:
    """A started server and its loop; ``stub`` is a sync stub on a fresh channel."""

    def __init__(self, config: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self._thread.start()
        self.server: NextCharServer
        self.server, self.port = self.run(create_server(config))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.NextCharServiceStub(self.channel)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def new_stub(self) -> tuple[grpc.Channel, pb_grpc.NextCharServiceStub]:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        return channel, pb_grpc.NextCharServiceStub(channel)

    def close(self) -> None:
        self.channel.close()
        try:
            self.run(self.server.stop(0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)


def start_server(model_dir: Path, **overrides: Any) -> ServerThread:
    config = replace(ServerConfig(port=0, model_dir=model_dir, sweep_interval=0.2), **overrides)
    return ServerThread(config)


def client_of(server: ServerThread, timeout: float = 10.0) -> NextCharClient:
    """A client library connection to a server started here."""
    return NextCharClient(f"127.0.0.1:{server.port}", timeout=timeout)


@contextlib.contextmanager
def replicas(model_dir: Path, store: str, **overrides: Any) -> Iterator[tuple[ServerThread, ServerThread]]:
    """Two replicas sharing one Redis session store (their models each from model_dir)."""
    a = start_server(model_dir, store=store, shared_models=False, **overrides)
    try:
        b = start_server(model_dir, store=store, shared_models=False, **overrides)
        try:
            yield a, b
        finally:
            b.close()
    finally:
        a.close()


class LoggedProcess:
    """``python -m nextchar.cli *args`` in a subprocess, its log (stderr) collected as it comes."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nextchar.cli", *args],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            self.lines.put(line)

    def wait_for_line(self, pattern: str, timeout: float = 60) -> tuple[float, re.Match[str]]:
        """Until a log line not read yet matches pattern (a regex): when (time.monotonic) it was
        read, and the match. A process that ends first, or a timeout, fails the test with its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            match = re.search(pattern, line)
            if match:
                return time.monotonic(), match
        self.proc.kill()
        raise AssertionError(f"no log line matched {pattern!r}:\n" + "".join(self.log))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class ServerProcess(LoggedProcess):
    """``python -m nextchar.cli serve --port 0 --model-dir DIR *args``; the bound port is read from its log."""

    def __init__(self, model_dir: Path, *args: str) -> None:
        super().__init__("serve", "--port", "0", "--model-dir", str(model_dir), *args)
        self.port = int(self.wait_for_line(r"serving on [\d.]+:(\d+)")[1].group(1))
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.NextCharServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def status(self) -> int:
        return int(self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status)

    @property
    def http_url(self) -> str:
        """The HTTP API's base URL (the server was started with --http-port)."""
        for line in self.log:
            match = re.search(r"http api and playground on (https?://[\d.]+:\d+)/", line)
            if match:
                return match.group(1)
        raise AssertionError("the server serves no HTTP API (start it with --http-port)")

    def rss_kb(self) -> int:
        """Resident memory of the server process (VmRSS), in KiB."""
        return proc_rss_kb(self.proc.pid)

    def close(self) -> None:
        self.channel.close()
        super().close()


def children(pid: int) -> set[int]:
    """Every descendant of pid, from /proc (Linux)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            with_children = {int(c) for c in task.read_text().split()}
            todo.extend(with_children - found)
            found |= with_children
    return found


def ignores_sigint(pid: int) -> bool:
    """Whether the live process pid ignores SIGINT (SigIgn in /proc/<pid>/status, Linux): the
    server's children do from their first act on (nextchar.server.lifeline), and a test that
    signals them must wait for that, not for a fixed time a busy machine outruns."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGINT - 1) & 1)
    return False


def proc_rss_kb(pid: int) -> int:
    """VmRSS of a live process from /proc/<pid>/status, in KiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


class DroppingProxy:
    """A TCP relay in front of a server whose live connections can be cut, as a network blip would.

    ``mute_replies`` stops reading the server's side of every connection (the client's bytes
    still flow): a client that never reads its responses, as the server's socket sees it.
    """

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._replies = threading.Event()
        self._replies.set()
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
            threading.Thread(target=self._pipe, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, self._replies), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, gate: threading.Event | None) -> None:
        try:
            while (gate is None or gate.wait()) and (data := src.recv(65536)):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def mute_replies(self) -> None:
        """From now on nothing the server sends is read (at most one read already under way)."""
        self._replies.clear()

    def unmute_replies(self) -> None:
        """What the server sends is read again (on the connections made from now on too)."""
        self._replies.set()

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
        self._replies.set()
        self.drop()


def stream_chars(
    stub: pb_grpc.NextCharServiceStub, text: str, session_id: str = "", chunk: int = 1, **fields: Any
) -> list[pb.PredictStreamResponse]:
    requests = [
        pb.PredictStreamRequest(session_id=session_id if i == 0 else "", text=text[i : i + chunk], **fields)
        for i in range(0, len(text), chunk)
    ]
    return list(stub.PredictStream(iter(requests), timeout=30))


def top1(vocab: str, responses: list[pb.PredictStreamResponse]) -> str:
    table = UNK_CHAR + vocab
    out: list[str] = []
    for r in responses:
        p = r.predictions
        out.extend(table[p.top_index[i * p.top_k]] for i in range(p.count))
    return "".join(out)


def surprisals(responses: list[pb.PredictStreamResponse]) -> np.ndarray:
    return np.concatenate([np.array(r.predictions.surprisal_bits, dtype=np.float64) for r in responses])


def expected(model: CharRNN, text: str) -> tuple[str, np.ndarray]:
    """What a session must answer: top-1 after each char and the surprisal of each char, one state carried."""
    idx = model.vocab.encode(text)
    _, logits, _ = model.forward(idx.reshape(-1, 1), model.initial_state(1))  # the training path
    probs = losses.probabilities(model.config.loss, logits)  # (T, V) after each char
    h0 = np.zeros((1, model.config.hidden), dtype=model.dtype)
    before = np.vstack([model.probabilities(h0), probs[:-1]])  # prediction each char was scored under
    surprisal = -np.log2(before[np.arange(len(idx)), idx])
    return model.vocab.decode(probs.argmax(axis=1)), surprisal


def iter_until(it: Iterator[T], n: int) -> list[T]:
    return [next(it) for _ in range(n)]


def wait_until(condition: Callable[[], T | None], timeout: float, what: str, every: float = 0.05) -> T:
    """Poll condition until it returns something true, and return that; fail naming what was
    awaited after timeout seconds. A test asserts a state the server reaches in its own time
    this way, never after a fixed sleep that a busy machine outruns."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(every)
    return result


def take(call: grpc.CallIterator[T]) -> T:
    """The next response of a streaming call (grpc-stubs lack __next__; iter() returns the call itself)."""
    return next(iter(call))


def cancel(call: grpc.Call) -> None:
    call.cancel()  # type: ignore[no-untyped-call]  # untyped in grpc-stubs
