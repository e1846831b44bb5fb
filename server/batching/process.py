"""The compute process for big batches: the arithmetic on its own core, free of the server's GIL.

In a thread, the batch step fights the event loop for the GIL: every NumPy call
in the recurrence releases it and must win it back, so a 64-character batch ran at
~60% of its in-process speed while the loop served gRPC. Here a batch's arrays
(states (N, S), chunks (T, N)) go over a socket to a process that holds a copy of
each model, runs ``nextchar.core.inference.advance`` and sends the answer back. A
static session's generation goes the same way (``generate``, its random generator
travelling both ways): drawn one character at a time, in Python, it is the most GIL
a work can hold, and in a thread it slowed the loop that serves every stream.

The server's side is driven by the event loop itself, with no thread: a request is
a non-blocking write and the answer arrives as the loop reads the socket, so
nothing waits for the GIL, and the batcher can queue the next batch behind the one
computing (answers come back in the order asked). Frames are an 8-byte length and
a pickle (protocol 5: arrays travel as raw bytes) of one message class below: the
server sends ``LoadModel``, ``Forget``, ``Advance`` and ``Draw``; the child answers each
Advance or Draw with ``Answer`` or ``ComputeFailed``; anything else is refused. Models are sent once per model
object, and the child forgets a model once the server has none of it left (a deleted
version, one no session is on any more): the server holds its models weakly here. If
the process fails, or hangs past a batch's deadline, every waiting batch
gets RuntimeError; the process executor then computes in a thread from then on:
slower, never wrong. This module is what the child imports: NumPy and nextchar.core only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import multiprocessing as mp
import os
import pickle
import socket
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from nextchar.core.config import Sampling
from nextchar.core.inference import Advanced
from nextchar.core.model import CharRNN
from nextchar.core.modelfile import ModelPayload

if TYPE_CHECKING:  # the child never imports the server's side
    from nextchar.server.batching.work import Packed

FRAME = struct.Struct("!Q")  # payload length
DEADLINE = 30.0  # seconds: far beyond any batch's time, even on a loaded machine...
DEADLINE_CHARS_PER_SEC = 10_000  # ...plus its characters at 1/30 of the usual speed


@dataclass(frozen=True, slots=True)
class LoadModel:
    key: int  # the model's key from now on; keys are never reused
    model: ModelPayload


@dataclass(frozen=True, slots=True)
class Forget:
    key: int  # the server holds this model no more


@dataclass(frozen=True, slots=True)
class Advance:
    """One model's part of a batch, as nextchar.core.inference.advance takes it."""

    key: int
    idx: np.ndarray
    lens: list[int]
    states: np.ndarray
    probs0: np.ndarray
    k: int
    full: bool


@dataclass(frozen=True, slots=True)
class Draw:
    """One generation, as nextchar.core.inference.generate takes it; the generator comes back
    with the answer, moved on as far as the draws took it."""

    key: int
    state: np.ndarray
    probs: np.ndarray
    length: int
    rng: np.random.Generator
    sampling: Sampling


@dataclass(frozen=True, slots=True)
class Drawn:
    text: str
    state: np.ndarray
    probs: np.ndarray
    rng: np.random.Generator


@dataclass(frozen=True, slots=True)
class Answer:
    result: Advanced | Drawn


@dataclass(frozen=True, slots=True)
class ComputeFailed:
    why: str  # the executor computes in a thread from then on


def _frame(message: LoadModel | Forget | Advance | Draw | Answer | ComputeFailed) -> list[bytes]:
    payload = pickle.dumps(message, protocol=5)
    return [FRAME.pack(len(payload)), payload]


def _read_exact(sock: socket.socket, n: int) -> bytearray | None:
    """n bytes from a blocking socket; None at end of stream."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        size = sock.recv_into(view[got:])
        if size == 0:
            return None
        got += size
    return buf


def child_main(sock: socket.socket, parent_pid: int) -> None:
    """The child's loop: LoadModel registers a model, Forget drops it, Advance and Draw are answered."""
    from nextchar.server.lifeline import die_with_parent

    die_with_parent(parent_pid)
    from nextchar.core.inference import advance, generate
    from nextchar.core.memory import keep_freed_memory

    keep_freed_memory()
    models: dict[int, CharRNN] = {}
    with sock:
        while True:
            header = _read_exact(sock, FRAME.size)
            body = _read_exact(sock, FRAME.unpack(header)[0]) if header is not None else None
            if body is None:  # the server is gone
                return
            answer: Answer | ComputeFailed
            match pickle.loads(body):
                case LoadModel(key, payload):
                    models[key] = payload.model()
                    continue
                case Forget(key):
                    models.pop(key, None)
                    continue
                case Advance(key, idx, lens, states, probs0, k, full):
                    try:
                        answer = Answer(advance(models[key], idx, lens, states, probs0, k, full))
                    except Exception as exc:  # the executor falls back to computing in a thread
                        answer = ComputeFailed(f"{type(exc).__name__}: {exc}")
                case Draw(key, state, probs, length, rng, sampling):
                    try:
                        answer = Answer(
                            Drawn(*generate(models[key], state, probs, length, rng, sampling), rng)
                        )
                    except Exception as exc:
                        answer = ComputeFailed(f"{type(exc).__name__}: {exc}")
                case other:
                    answer = ComputeFailed(f"not a message of this protocol: {type(other).__name__}")
            for part in _frame(answer):
                sock.sendall(part)


class ComputeProcess:
    """The server's side of the child; every method runs on the event loop's thread."""

    def __init__(self, deadline: float = DEADLINE) -> None:
        self.deadline = deadline  # seconds a batch may take, plus its size at DEADLINE_CHARS_PER_SEC
        self._sock, child_sock = socket.socketpair()
        self._child_sock: socket.socket | None = child_sock
        ctx = mp.get_context("spawn")  # fork would copy the server's threads and sockets
        self._proc = ctx.Process(
            target=child_main, args=(child_sock, os.getpid()), name="nextchar-compute", daemon=True
        )
        # the key each model sent has in the child, held weakly: a model the server drops is
        # forgotten there too (its key goes to _gone, and the child hears at the next batch), so
        # deleted versions do not stay alive in both processes
        self._keys: weakref.WeakKeyDictionary[CharRNN, int] = weakref.WeakKeyDictionary()
        self._serial = itertools.count()  # keys are never reused
        self._gone: list[int] = []
        self._waiting: collections.deque[asyncio.Future[Advanced | Drawn]] = collections.deque()
        self._connected: asyncio.Task[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._failure: str | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def start(self) -> None:
        """Spawn the child; call with the event loop running."""
        self._proc.start()
        if self._child_sock is not None:
            self._child_sock.close()
            self._child_sock = None
        self._connected = asyncio.get_running_loop().create_task(asyncio.open_connection(sock=self._sock))

    async def advance(self, model: CharRNN, packed: Packed) -> Advanced:
        """The batch's answer; raises RuntimeError if the child cannot give it."""
        answer = await self._ask(
            model,
            lambda key: Advance(
                key, packed.idx, packed.lens, packed.states, packed.probs0, packed.k, packed.full
            ),
            int(packed.idx.size),
        )
        assert isinstance(answer, Advanced)
        return answer

    async def generate(
        self,
        model: CharRNN,
        state: np.ndarray,
        probs: np.ndarray,
        length: int,
        rng: np.random.Generator,
        sampling: Sampling,
    ) -> Drawn:
        """generate's text, state and probs after it, and a copy of rng moved on as far as the draws
        took it (rng itself is untouched); raises RuntimeError if the child cannot give it."""
        # (a piece draws at most a few dozen characters: the deadline's floor covers it)
        answer = await self._ask(model, lambda key: Draw(key, state, probs, length, rng, sampling), length)
        assert isinstance(answer, Drawn)
        return answer

    async def _ask(
        self, model: CharRNN, message: Callable[[int], Advance | Draw], steps: int
    ) -> Advanced | Drawn:
        """Send the message for model's key in the child (the model loaded there first if need be)
        and wait for its answer, at most the deadline plus steps characters' worth."""
        assert self._connected is not None, "start() first"
        reader, writer = await self._connected
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read(reader))
        if self._failure is not None:
            raise RuntimeError(self._failure)
        while self._gone:
            writer.writelines(_frame(Forget(self._gone.pop())))
        key = self._keys.get(model)
        if key is None:
            key = self._keys[model] = next(self._serial)
            weakref.finalize(model, self._gone.append, key)
            writer.writelines(_frame(LoadModel(key, ModelPayload.of(model))))
        writer.writelines(_frame(message(key)))
        future: asyncio.Future[Advanced | Drawn] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        await writer.drain()
        # a child that hangs without dying must not stall the server's big batches forever
        deadline = self.deadline + steps / DEADLINE_CHARS_PER_SEC
        try:
            return await asyncio.wait_for(future, deadline)
        except TimeoutError:
            self._fail(f"compute process gave no answer in {deadline:.0f} s")
            raise RuntimeError(self._failure) from None

    async def _read(self, reader: asyncio.StreamReader) -> None:
        """Hand each answer to the oldest waiting batch; on any failure, fail them all."""
        try:
            while True:
                header = await reader.readexactly(FRAME.size)
                message = pickle.loads(await reader.readexactly(FRAME.unpack(header)[0]))
                future = self._waiting.popleft()
                if future.done():
                    continue
                if isinstance(message, Answer):
                    future.set_result(message.result)
                else:
                    why = message.why if isinstance(message, ComputeFailed) else repr(message)[:200]
                    future.set_exception(RuntimeError(f"compute process: {why}"))
        except (asyncio.IncompleteReadError, OSError) as exc:
            self._fail(f"compute process stopped (exit code {self._proc.exitcode}): {exc!r}")
        except asyncio.CancelledError:
            self._fail("compute process closed")
            raise

    def _fail(self, reason: str) -> None:
        self._failure = reason
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(RuntimeError(reason))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._connected is not None:
            with contextlib.suppress(Exception):
                _, writer = await self._connected
                writer.close()
        self._sock.close()
        await asyncio.to_thread(self._stop_process)

    def _stop_process(self) -> None:
        self._proc.join(2)  # the child sees end-of-stream and returns
        if self._proc.is_alive():  # hung (or stopped): SIGKILL, which even a stopped process obeys
            self._proc.kill()
            self._proc.join(2)
