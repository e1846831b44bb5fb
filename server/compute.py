"""A compute worker process for big batches: the arithmetic on its own core, free of the server's GIL.

In a thread, the batch step fights the event loop for the GIL: every NumPy call
in the recurrence releases it and must win it back, and each wait can last a switch
interval, so a 64-character batch ran at ~60% of its in-process speed while the
loop served gRPC. Here the batch's arrays (states (N, S), chunks (T, N)) go over
a pipe to a process that holds a copy of each model, runs ``stepping.advance`` and
sends the answer back; the batch thread only waits on the pipe, without the GIL.

Models are sent once per model object. If the worker fails, the batcher logs it and
computes in its thread from then on: slower, never wrong.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from multiprocessing.connection import Connection
from typing import Any

from nextchar.core.model import CharRNN
from nextchar.server.stepping import Advanced, Packed


def worker_main(conn: Connection) -> None:
    """The worker's loop: ("model", key, ...) registers a model; ("advance", key, ...) answers."""
    from nextchar.core.memory import keep_freed_memory
    from nextchar.core.model import CharRNN, ModelConfig
    from nextchar.core.vocab import Vocab
    from nextchar.server.stepping import advance

    keep_freed_memory()
    models: dict[int, CharRNN] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the server is gone
            return
        if msg is None:
            return
        if msg[0] == "model":
            _, key, config, chars, params = msg
            models[key] = CharRNN(ModelConfig(**config), Vocab(chars), params)
            continue
        _, key, idx, lens, states, probs0, k, full = msg
        try:
            conn.send(("ok", advance(models[key], idx, lens, states, probs0, k, full)))
        except Exception as exc:  # the batcher falls back to computing in-process
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class ComputeProcess:
    """The server side of the worker. Not thread-safe: only the batch thread calls advance."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")  # fork would copy the server's threads and sockets
        self._conn, child = ctx.Pipe()
        self._child: Connection | None = child
        self._proc = ctx.Process(target=worker_main, args=(child,), name="nextchar-compute", daemon=True)
        self._models: dict[int, CharRNN] = {}  # keeps every sent model alive, so its id stays its key

    def start(self) -> None:
        self._proc.start()
        if self._child is not None:
            self._child.close()
            self._child = None

    def advance(self, model: CharRNN, packed: Packed) -> Advanced:
        """Blocking round trip; raises RuntimeError if the worker cannot answer."""
        if not self._proc.is_alive():
            raise RuntimeError(f"compute worker is not running (exit code {self._proc.exitcode})")
        key = id(model)
        if key not in self._models:
            self._conn.send(("model", key, model.config.to_dict(), model.vocab.chars, model.params))
            self._models[key] = model
        self._conn.send(
            ("advance", key, packed.idx, packed.lens, packed.states, packed.probs0, packed.k, packed.full)
        )
        kind, body = self._conn.recv()
        if kind != "ok":
            raise RuntimeError(f"compute worker: {body}")
        result: Any = body
        assert isinstance(result, Advanced)
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._conn.send(None)
        self._proc.join(2)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(2)
        self._conn.close()
