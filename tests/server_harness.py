"""Test harness for the server tests: a REAL nextchar server on 127.0.0.1:0 in a background thread.

The server runs on its own asyncio loop in a thread; tests talk to it over the
network with the generated synchronous stubs, exactly as a client would, and use
``run`` to reach into the server's loop (drain, inspect the batcher) when needed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
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
    state = model.initial_state(1)[0]
    _, probs = model.run(state, idx)  # (T, V) after each char
    h0 = np.zeros((1, model.config.hidden), dtype=model.dtype)
    before = np.vstack([model.probabilities(h0), probs[:-1]])  # prediction each char was scored under
    surprisal = -np.log2(before[np.arange(len(idx)), idx])
    return model.vocab.decode(probs.argmax(axis=1)), surprisal


def iter_until(it: Iterator[T], n: int) -> list[T]:
    return [next(it) for _ in range(n)]


def take(call: grpc.CallIterator[T]) -> T:
    """The next response of a streaming call (grpc-stubs lack __next__; iter() returns the call itself)."""
    return next(iter(call))


def cancel(call: grpc.Call) -> None:
    call.cancel()  # type: ignore[no-untyped-call]  # untyped in grpc-stubs
