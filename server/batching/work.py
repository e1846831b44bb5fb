"""The units of work the scheduler batches, their results, and how a batch of them is computed.

A work is pure arithmetic on arrays its caller gave (a network, a state, a
prediction): the compute path knows nothing of sessions, and its results are
values the caller decides what to do with (nextchar.server.sessions.manager
commits them). A batch is a list of works; ``compute`` groups its predictions by
network and advances each group with ONE ``nextchar.core.inference.advance`` call
(the chunks packed side by side), samples each generation and searches each
completion. It runs wherever an executor puts it (the loop, a thread); the compute
process runs the same ``advance`` on the packed arrays (``pack``), so every path
gives the same answer.

Adaptive sessions (nextchar.core.adapt) send ``AdaptWork``: their chunks are
advanced under their own adapters, with the gradient steps their text completes,
and never on the event loop (the scheduler and executors see to it).
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import numpy as np
from nextchar.core import adapt
from nextchar.core.adapt import Adapter, Rule
from nextchar.core.completion import Continuation, complete
from nextchar.core.config import Sampling
from nextchar.core.inference import Advanced, advance, generate, pack_chunks
from nextchar.core.model import CharRNN


@dataclass(slots=True)
class Rows:
    """Predictions for one chunk of n characters: views into its batch's arrays, sliced on demand.

    Slicing lazily keeps per-chunk work in the batch to two row copies (state,
    probs); the reply is written from the views.
    """

    idx: np.ndarray  # (n,) the chunk's character indices (0: unknown)
    k: int
    col: int  # this chunk's column in the batch arrays
    batch: Advanced
    state: np.ndarray  # (S,) after the chunk, a copy
    probs: np.ndarray  # (V,) prediction after the chunk, a copy
    adapter: Adapter | None = None  # an adaptive session's adapter after the chunk
    base: Adapter | None = None  # and the one at its trail's oldest mark (Adapting.base, replayed)

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
class Generated:
    text: str
    idx: np.ndarray  # (n,) the drawn characters' indices
    state: np.ndarray  # (S,) after them
    probs: np.ndarray  # (V,)
    adapter: Adapter | None = None  # as Rows'
    base: Adapter | None = None


@dataclass(frozen=True, slots=True)
class Adapting:
    """What an adaptive session's work carries beyond a static one's."""

    rule: Rule
    adapter: Adapter
    base: Adapter | None  # where the trail's oldest mark after the work comes from (SessionValue.base_source)
    replay: np.ndarray  # (m,) int64: the text base moves through to get there

    def moved_base(self, net: CharRNN) -> Adapter | None:
        if self.base is None or not len(self.replay):
            return self.base
        return adapt.replay(net, self.rule, self.base, self.replay)


# What a work costs the scheduler, in characters of a batched prediction: what decides whether
# it computes on the event loop and whether it is long (nextchar.server.batching.scheduler).
# A generated character is a step of its own, one session wide, and a draw in Python: at H=256
# 64 drawn characters took 4.4-5.9 ms, one session's 64-character chunk 0.85 ms (Intel Xeon).
# Counted as one character each, a 64-character Generate piece ran inline, batched with
# one-character streams, and held every one of them ~5 ms (make bench-abuse's poison kind:
# the streams' p99 3.2x alone).
DRAW_COST = 6

# Every work names its caller's key (a session, or any object standing for one): the
# scheduler puts at most one work per key in a batch, and tells a lone caller by it.


@dataclass(slots=True)
class PredictWork:
    key: object
    net: CharRNN
    idx: np.ndarray  # (n,) int64
    state: np.ndarray  # (S,) before the chunk
    probs: np.ndarray  # (V,) the prediction before it
    top_k: int
    full: bool
    future: asyncio.Future[Rows]
    size: int = field(init=False)  # characters: read several times per work by the scheduler
    cost: int = field(init=False)  # what the scheduler weighs (see DRAW_COST): one per character
    learns: ClassVar[bool] = False  # takes an adapter's gradient steps: computed off the event loop

    def __post_init__(self) -> None:
        self.size = self.cost = len(self.idx)


@dataclass(slots=True)
class AdaptWork:
    """An adaptive session's chunk: PredictWork's fields, and its adapter. A chunk that completes
    no window (and moves no trail base) takes no gradient step: it runs where a static chunk of
    its size would (a lone one-character message inline, at once); one that steps runs off the
    event loop."""

    key: object
    net: CharRNN
    idx: np.ndarray  # (n,) int64
    state: np.ndarray
    probs: np.ndarray
    top_k: int
    full: bool
    adapting: Adapting
    future: asyncio.Future[Rows]
    size: int = field(init=False)
    cost: int = field(init=False)
    learns: bool = field(init=False)

    def __post_init__(self) -> None:
        self.size = self.cost = len(self.idx)
        a = self.adapting
        # a step comes when a character arrives after a full window (nextchar.core.adapt)
        self.learns = len(a.adapter.window) + self.size > a.rule.config.segment or len(a.replay) > 0


@dataclass(slots=True)
class GenerateWork:
    """Sampling: an adaptive session's draws come from its adapted weights, a piece never longer
    than what its window has room for plus the character that completes it (so every draw is from
    the weights a session fed the same text would predict it with), and the drawn text is then fed
    as any other (its steps, its exact value)."""

    key: object
    net: CharRNN
    state: np.ndarray
    probs: np.ndarray
    length: int
    rng: np.random.Generator
    sampling: Sampling
    future: asyncio.Future[Generated]
    adapting: Adapting | None = None

    @property
    def size(self) -> int:  # characters
        return self.length

    @property
    def cost(self) -> int:  # each character drawn is a step of its own (see DRAW_COST)
        return self.length * DRAW_COST

    @property
    def learns(self) -> bool:
        return self.adapting is not None


@dataclass(slots=True)
class CompleteWork:
    """A beam search for the likeliest continuations (nextchar.core.completion): a few small
    products, batched with the rest so no model arithmetic runs outside the compute path."""

    key: object
    net: CharRNN
    state: np.ndarray
    probs: np.ndarray
    n: int
    max_chars: int
    future: asyncio.Future[list[Continuation]]
    adapter: Adapter | None = None  # an adaptive session's: the search runs on its weights

    @property
    def size(self) -> int:  # characters it may step, at most
        return self.n * self.max_chars

    @property
    def cost(self) -> int:  # (a bound: the beams step together, and most end early)
        return self.size

    @property
    def learns(self) -> bool:  # (no step: the adapted weights' copy is what goes off the loop)
        return self.adapter is not None


Work = PredictWork | AdaptWork | GenerateWork | CompleteWork
W = TypeVar("W", PredictWork, AdaptWork)
Result = Rows | Generated | list[Continuation]


@dataclass
class BatchStats:
    """Counters for tests and the benchmark: how well the batching works."""

    batches: int = 0
    steps: int = 0
    chars: int = 0
    max_sessions: int = 0
    compute_seconds: float = 0.0  # wall time computing batches, wherever they ran
    remote_batches: int = 0  # batches the compute process ran

    def count(self, works: Sequence[PredictWork | AdaptWork]) -> None:
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


def pack(works: Sequence[PredictWork | AdaptWork]) -> Packed:
    """One model's predictions side by side, as ``advance`` takes them (it never writes its inputs)."""
    if len(works) == 1:  # a lone stream (ping-pong): its own arrays, viewed as one column
        w = works[0]
        n = len(w.idx)
        return Packed([0], [n], w.idx.reshape(n, 1), w.state[None], w.probs[None], w.top_k, w.full)
    order, lens, idx = pack_chunks([w.idx for w in works])
    ws = [works[i] for i in order]
    states = rows([w.state for w in ws])  # (N, S)
    probs0 = rows([w.probs for w in ws])  # (N, V)
    return Packed(order, lens, idx, states, probs0, max(w.top_k for w in ws), any(w.full for w in ws))


def advance_packed(model: CharRNN, packed: Packed) -> Advanced:
    return advance(model, packed.idx, packed.lens, packed.states, packed.probs0, packed.k, packed.full)


def unpack(works: Sequence[PredictWork | AdaptWork], packed: Packed, out: Advanced) -> list[Rows]:
    """One Rows per work, in the works' order; per chunk only two row copies."""
    results: list[Rows | None] = [None] * len(works)
    one = len(works) == 1  # a lone session's rows are its own arrays: nothing else keeps them alive
    for col, j in enumerate(packed.order):
        w = works[j]
        state = out.states[col] if one else out.states[col].copy()
        probs = out.last_probs[col] if one else out.last_probs[col].copy()
        results[j] = Rows(w.idx, w.top_k, col, out, state, probs)
    return [r for r in results if r is not None]


def prediction_groups(batch: Sequence[Work]) -> list[tuple[list[int], list[PredictWork]]]:
    """The batch's predictions grouped by the network they run on: (positions, works) per
    group. The usual batch, predictions on one model, is one group."""
    net = batch[0].net
    if all(isinstance(w, PredictWork) and w.net is net for w in batch):
        return [(list(range(len(batch))), list(batch))]  # type: ignore[arg-type]  # all PredictWork, checked
    return grouped(batch, PredictWork)


def grouped(batch: Sequence[Work], kind: type[W]) -> list[tuple[list[int], list[W]]]:
    """The batch's works of one kind grouped by network: (positions, works) per group."""
    groups: dict[int, tuple[list[int], list[W]]] = {}
    for i, work in enumerate(batch):
        if isinstance(work, kind):
            members, works = groups.setdefault(id(work.net), ([], []))
            members.append(i)
            works.append(work)
    return list(groups.values())


def compute(batch: Sequence[Work], stats: BatchStats) -> list[Result]:
    """Run one batch here: predictions one advance per network, the other works one by one."""
    start = time.perf_counter()
    out: list[Result | None] = [None] * len(batch)
    draws: list[tuple[GenerateWork, np.random.Generator]] = []
    for i, work in enumerate(batch):
        if isinstance(work, GenerateWork):
            rng = copy.deepcopy(work.rng)
            out[i] = generated(work, rng)
            draws.append((work, rng))
        elif isinstance(work, CompleteWork):
            net = work.net if work.adapter is None else adapt.adapted(work.net, work.adapter)
            out[i] = complete(net, work.state, work.probs, work.n, work.max_chars)
    answered = 0
    for members, works in prediction_groups(batch):
        packed = pack(works)
        answer = advance_packed(works[0].net, packed)
        for i, result in zip(members, unpack(works, packed, answer), strict=True):
            out[i] = result
        stats.count(works)
        answered += len(works)
    if answered < len(batch):  # generations, completions or adaptive chunks too
        for members, adapting in grouped(batch, AdaptWork):  # (one network: one adaptation rule)
            for i, result in zip(members, adapted_rows(adapting), strict=True):
                out[i] = result
            stats.count(adapting)
    commit_draws(draws)
    stats.batches += 1
    stats.compute_seconds += time.perf_counter() - start
    return out  # type: ignore[return-value]  # every position filled above


def adapted_rows(works: Sequence[AdaptWork]) -> list[Rows]:
    """Adaptive sessions' chunks on one network, advanced together (nextchar.core.adapt.advance_many:
    shared products, each column with its own adapter), and each trail's base moved on."""
    net, rule = works[0].net, works[0].adapting.rule
    packed = pack(works)
    adapters = [works[j].adapting.adapter for j in packed.order]
    answer, learnt = adapt.advance_many(
        net, rule, adapters, packed.idx, packed.lens, packed.states, packed.probs0, packed.k, packed.full
    )
    results = unpack(works, packed, answer)
    for col, j in enumerate(packed.order):
        results[j].adapter = learnt[col]
        results[j].base = works[j].adapting.base
    moving, bases, texts = [], [], []  # the works whose trail's base moves past some text
    for j, work in enumerate(works):
        base, replay = work.adapting.base, work.adapting.replay
        if base is not None and len(replay):
            moving.append(j)
            bases.append(base)
            texts.append(replay)
    for j, base in zip(moving, adapt.replay_many(net, rule, bases, texts), strict=True):
        results[j].base = base
    return results


def commit_draws(draws: Sequence[tuple[GenerateWork, np.random.Generator]]) -> None:
    """Move each work's generator on to where its draws (made from a copy) left it, once the whole
    batch is answered. A batch that fails part way is computed again, work by work: a generator
    moved by the failed try made a seeded Generate batched beside a failing work draw other text."""
    for work, rng in draws:
        work.rng.bit_generator.state = rng.bit_generator.state


def static_generated(work: GenerateWork, text: str, state: np.ndarray, probs: np.ndarray) -> Generated:
    """A static session's work's result, from generate's (text, state, probs), wherever drawn."""
    return Generated(text, work.net.vocab.encode(text), state, probs)


def generated(work: GenerateWork, rng: np.random.Generator) -> Generated:
    """work's draws, from rng (a copy of the work's generator: see commit_draws)."""
    a = work.adapting
    net = work.net if a is None else adapt.adapted(work.net, a.adapter)
    text, state, probs = generate(net, work.state, work.probs, work.length, rng, work.sampling)
    if a is None:
        return static_generated(work, text, state, probs)
    idx = work.net.vocab.encode(text)
    adapter, out = adapt.feed(work.net, a.rule, a.adapter, work.state, work.probs, idx)
    return Generated(text, idx, out.states[0], out.last_probs[0], adapter, a.moved_base(work.net))
