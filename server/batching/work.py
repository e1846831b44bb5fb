"""The units of work the scheduler batches, their results, and how a batch of them is computed.

A batch is a list of works; ``compute`` groups its predictions by model version and
advances each group with ONE ``nextchar.core.inference.advance`` call (the
sessions' chunks packed side by side), and samples each generation. It runs
wherever an executor puts it (the loop, a thread); the compute process runs the
same ``advance`` on the packed arrays (``pack``), so every path gives the same answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from nextchar.core.config import Sampling
from nextchar.core.inference import Advanced, advance, generate, pack_chunks
from nextchar.core.model import CharRNN
from nextchar.server.sessions.session import Session


@dataclass(slots=True)
class ChunkResult:
    """Predictions for one chunk of n characters: views into its batch's arrays, sliced on demand.

    Slicing lazily keeps per-session work in the batch to two row copies (state,
    probs); the handler turns the views into reply fields.
    """

    start_offset: int
    idx: np.ndarray  # (n,) the chunk's character indices (0: unknown)
    k: int
    col: int  # this chunk's column in the batch arrays
    batch: Advanced
    state: np.ndarray  # (S,) after the chunk, a copy
    probs: np.ndarray  # (V,) prediction after the chunk, a copy
    unknown_chars: str = ""  # the chunk's characters the model does not know (set by the session manager)

    @property
    def n(self) -> int:
        return len(self.idx)

    @property
    def top_index(self) -> np.ndarray:  # (n, k), most likely first
        return self.batch.top_index[: self.n, self.col, : self.k]

    @property
    def top_prob(self) -> np.ndarray:  # (n, k)
        return self.batch.top_prob[: self.n, self.col, : self.k]

    @property
    def surprisal_bits(self) -> np.ndarray:  # (n,)
        return self.batch.surprisal[: self.n, self.col]

    @property
    def distribution(self) -> np.ndarray | None:  # (n, V)
        probs_seq = self.batch.probs_seq
        return None if probs_seq is None else probs_seq[1 : self.n + 1, self.col]


@dataclass(slots=True)
class GenerateResult:
    start_offset: int
    text: str
    state: np.ndarray
    probs: np.ndarray


@dataclass(slots=True)
class PredictWork:
    session: Session
    idx: np.ndarray  # (n,) int64
    top_k: int
    full: bool
    gen: int  # the session's gen when asked: a result for an older gen is dropped
    future: asyncio.Future[ChunkResult]
    size: int = field(init=False)  # characters: read several times per work by the scheduler

    def __post_init__(self) -> None:
        self.size = len(self.idx)


@dataclass(slots=True)
class GenerateWork:
    session: Session
    length: int
    rng: np.random.Generator
    sampling: Sampling
    gen: int
    future: asyncio.Future[GenerateResult]

    @property
    def size(self) -> int:  # characters
        return self.length


Work = PredictWork | GenerateWork
Result = ChunkResult | GenerateResult


@dataclass
class BatchStats:
    """Counters for tests and the benchmark: how well the batching works."""

    batches: int = 0
    steps: int = 0
    chars: int = 0
    max_sessions: int = 0
    compute_seconds: float = 0.0  # wall time computing batches, wherever they ran
    remote_batches: int = 0  # batches the compute process ran

    def count(self, works: Sequence[PredictWork]) -> None:
        sizes = [w.size for w in works]
        self.steps += max(sizes)
        self.chars += sum(sizes)
        self.max_sessions = max(self.max_sessions, len(works))


@dataclass(slots=True)
class Packed:
    """One model's predictions of a batch, as the arrays ``advance`` takes (column i: works[order[i]])."""

    order: list[int]
    lens: list[int]  # chunk length per column, non-increasing
    idx: np.ndarray  # (T, N) int64, zero-padded past each chunk's end
    states: np.ndarray  # (N, S)
    probs0: np.ndarray  # (N, V) prediction before each chunk
    k: int  # the largest top-k asked for
    full: bool  # someone wants the full distributions


def rows(vectors: list[np.ndarray]) -> np.ndarray:
    """Equal-length vectors as the rows of one array: a third of np.stack's time at 150 rows."""
    return np.concatenate(vectors).reshape(len(vectors), -1)


def pack(works: Sequence[PredictWork]) -> Packed:
    """One model's predictions side by side, as ``advance`` takes them (it never writes its inputs)."""
    if len(works) == 1:  # a lone stream (ping-pong): its own arrays, viewed as one column
        w = works[0]
        n = len(w.idx)
        return Packed(
            [0], [n], w.idx.reshape(n, 1), w.session.state[None], w.session.probs[None], w.top_k, w.full
        )
    order, lens, idx = pack_chunks([w.idx for w in works])
    ws = [works[i] for i in order]
    states = rows([w.session.state for w in ws])  # (N, S)
    probs0 = rows([w.session.probs for w in ws])  # (N, V)
    return Packed(order, lens, idx, states, probs0, max(w.top_k for w in ws), any(w.full for w in ws))


def advance_packed(model: CharRNN, packed: Packed) -> Advanced:
    return advance(model, packed.idx, packed.lens, packed.states, packed.probs0, packed.k, packed.full)


def unpack(works: Sequence[PredictWork], packed: Packed, out: Advanced) -> list[ChunkResult]:
    """One ChunkResult per work, in the works' order; per session only two row copies."""
    results: list[ChunkResult | None] = [None] * len(works)
    one = len(works) == 1  # a lone session's rows are its own arrays: nothing else keeps them alive
    for col, j in enumerate(packed.order):
        w = works[j]
        state = out.states[col] if one else out.states[col].copy()
        probs = out.last_probs[col] if one else out.last_probs[col].copy()
        results[j] = ChunkResult(w.session.offset, w.idx, w.top_k, col, out, state, probs)
    return [r for r in results if r is not None]


def prediction_groups(batch: Sequence[Work]) -> list[tuple[list[int], list[PredictWork]]]:
    """The batch's predictions grouped by the model version they run on: (positions, works) per
    group. The usual batch, predictions on one model, is one group."""
    model = batch[0].session.model
    if all(isinstance(w, PredictWork) and w.session.model is model for w in batch):
        return [(list(range(len(batch))), list(batch))]  # type: ignore[arg-type]  # all PredictWork, checked
    groups: dict[int, tuple[list[int], list[PredictWork]]] = {}
    for i, work in enumerate(batch):
        if isinstance(work, PredictWork):
            members, works = groups.setdefault(id(work.session.model), ([], []))
            members.append(i)
            works.append(work)
    return list(groups.values())


def compute(batch: Sequence[Work], stats: BatchStats) -> list[Result]:
    """Run one batch here: predictions one advance per model version, generations one by one."""
    start = time.perf_counter()
    out: list[Result | None] = [None] * len(batch)
    for i, work in enumerate(batch):
        if isinstance(work, GenerateWork):
            s = work.session
            text, state, probs = generate(
                s.model.require(), s.state, s.probs, work.length, work.rng, work.sampling
            )
            out[i] = GenerateResult(s.offset, text, state, probs)
    for members, works in prediction_groups(batch):
        packed = pack(works)
        answer = advance_packed(works[0].session.model.require(), packed)
        for i, result in zip(members, unpack(works, packed, answer), strict=True):
            out[i] = result
        stats.count(works)
    stats.batches += 1
    stats.compute_seconds += time.perf_counter() - start
    return out  # type: ignore[return-value]  # every position filled above
