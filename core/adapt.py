"""Dynamic evaluation (Krause et al. 2018): a session's own weights, learnt from its own text.

The shared model never changes. An adaptive session carries an ``Adapter``: deltas
for a few of the shared weights, added to them for its predictions (``adapted``),
and stepped after every ``segment`` characters from the gradient of that segment's
loss, each segment scored BEFORE the step that uses it (``feed``). Delaying the
steps (so a rewind never has to undo one) was measured to lose most of the gain
(issue 22), so a rewind restores the adapter exactly instead (below).

Which weights adapt (``adapted_names``): the read-out (Why, by), layer 0's biases,
and the columns of layer 0's input weights that feed the cell's candidate gate (GRU
n, LSTM g, the RNN's only gate): per input character, the content it proposes. On
the shipped GRU-256 the candidate columns kept all of the full input rows' gain on
the first 10,000 characters of tinyshakespeare's validation text (2.097 vs 2.096
bits/char; the reset and update gates' columns added nothing) at a third of their
memory: 139 KB per adapter instead of 271 KB, so a session keeps two (below) in
279 KB, within the 512 KB a session may cost. Adapting Whh too (1 MB) was worse
at the same rate (2.253 vs 2.157 on the whole validation text).

The rule is the paper's RMS-normalised one with decay toward the shared weights:

    delta <- delta * (1 - min(decay * rms / mean(rms), 1)) - lr * grad / max(rms, floor * mean(rms))

rms is each weight's root-mean-square segment gradient under the shared weights on
the model's training text (``nextchar.core.adapt_tune``), mean(rms) its mean
over the adapted weights. The paper divides by rms + eps; here rms is floored,
because a weight the validation text hardly moves (the input row of a character it
never holds, the unknown slot) has an rms near zero: on code, the paper's rule took
the first 10,000 characters from 5.72 bits/char (static) to 24; floored at a tenth
of the mean, 3.6. The statistics are stored whole, as float16 in base64 (``Stats``,
93 KB of the default model's JSON metadata): a matrix's row and column means
instead (rms_ij from r_i c_j) cost 0.006 bits/char in-domain. A file without them
adapts by plain SGD at ``SGD_LR``.

Segments, exactly. A window starts at an offset a multiple of ``segment`` from
where adaptation began, in state ``start``, and collects the inputs consumed since
(``window``). When the character after a full window arrives it is scored (under
the old adapter), completes the window's targets, and the step runs on
``CharRNN.loss_and_grads`` over the window from ``start``; the character is then
consumed under the new adapter, from the window's last state. The adapter is
therefore a function of the text alone, whatever the chunks it came in: every
gradient is computed over one whole window, in one call, on one thread.

Rewind, bit for bit, in bounded memory. Everything here is a pure function of the
shared weights, an ``Adapter`` value and the characters that follow it, so feeding
the same characters from the same value gives the same bits. A session keeps two
adapters: its current one and the value it had at its oldest rewind mark (the
server's trail, nextchar.server.sessions.trail, keeps that mark's state and the
text since). A rewind to offset t feeds the trail's text from the oldest mark to t
(``feed``): the adapter, state and predictions are those of a session that never
received what was taken back. When the trail drops its oldest mark, the kept value
moves to the next mark by feeding the text between them (``replay``): one extra
pass over each character, no extra memory. A rewind re-feeds at most the trail's
keep plus one mark spacing (256 + 64 characters by default: 16 steps).

Divergence: a step whose loss or new deltas are not finite, or whose deltas leave
+-``LIMIT``, resets the adapter to the shared weights (``Adapter.resets`` counts
it, so a server can log and count it); the reset is a function of the text too,
so a replay resets at the same place.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from nextchar.core import adapt_batch, inference, losses
from nextchar.core.inference import Advanced
from nextchar.core.model import CharRNN

SEGMENT = 20  # characters per step: the paper's and the issue's prototypes'
DECAY = 5e-4  # toward the shared weights, per step, scaled by each weight's rms share
SGD_LR = 0.05  # a file without gradient statistics: plain SGD (in-domain 2.214 bits/char; 0.1: 2.203)
FLOOR = 0.2  # of the mean rms: see the rule above
LIMIT = 8.0  # |delta| beyond this is a diverging adapter (the shipped model's largest weight: 2.6)
NO_TEXT = np.zeros(0, dtype=np.int64)
NO_TEXT.flags.writeable = False

Stats = dict[str, str]  # weight name -> its gradient rms, float16 little-endian, base64 (JSON-able)


@dataclass(frozen=True)
class AdaptConfig:
    """How a model adapts; JSON-able (``to_dict``) for the model file's metadata."""

    lr: float = SGD_LR
    decay: float = DECAY
    segment: int = SEGMENT
    floor: float = FLOOR  # rms below floor * mean(rms) counts as that
    stats: Stats | None = None  # None: unit rms, plain SGD

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"lr must be finite and >= 0, got {self.lr!r}")
        if not 0 <= self.decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {self.decay!r}")
        if not 0 < self.floor <= 1:
            raise ValueError(f"floor must be in (0, 1], got {self.floor!r}")
        if not 1 <= self.segment <= 4096:
            raise ValueError(f"segment must be in 1..4096, got {self.segment!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, recorded: Mapping[str, Any] | None) -> AdaptConfig:
        """The config a model file records (keys it does not know are ignored); defaults without one."""
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in (recorded or {}).items() if k in known})
        except TypeError as exc:  # a value of the wrong type: compared with a number above
            raise ValueError(f"adapt config: {exc}") from exc


@dataclass(frozen=True, slots=True, eq=False)
class Adapter:
    """A session's adaptation: immutable (its arrays are read-only), so a snapshot is a reference."""

    deltas: tuple[np.ndarray, ...]  # one per adapted weight (``adapted_names``); () = the shared weights
    start: np.ndarray  # (S,) the state the window starts from
    window: np.ndarray  # (n <= segment,) int64 inputs consumed since start
    steps: int = 0
    resets: int = 0  # times a diverging adapter was reset to the shared weights

    @property
    def nbytes(self) -> int:
        """What this value holds (arrays shared with an earlier value counted again)."""
        return sum(d.nbytes for d in self.deltas) + self.start.nbytes + self.window.nbytes


@dataclass(frozen=True, slots=True, eq=False)
class Rule:
    """The update per adapted weight, from a model and its AdaptConfig (``rule``): delta * keep - rate * grad."""

    config: AdaptConfig
    rate: tuple[np.ndarray, ...]
    keep: tuple[np.ndarray, ...]


def adapted_names(model: CharRNN) -> tuple[str, ...]:
    names = ("Why", "by", "l0.Wxh", "l0.bh")
    return (*names, "l0.bhn") if model.cell.has_bhn else names


def candidate_columns(model: CharRNN) -> slice:
    """The columns of l0.Wxh (gates fused along its last axis) that feed the candidate gate."""
    H = model.config.hidden
    return slice(model.cell.candidate * H, (model.cell.candidate + 1) * H)


def delta_shapes(model: CharRNN) -> tuple[tuple[int, ...], ...]:
    H = model.config.hidden
    return tuple(
        (model.vocab.size, H) if name == "l0.Wxh" else model.params[name].shape
        for name in adapted_names(model)
    )


def adapter_bytes(model: CharRNN) -> int:
    """The deltas of one adapter of this model, in bytes."""
    return sum(math.prod(shape) for shape in delta_shapes(model)) * model.dtype.itemsize


def fresh(model: CharRNN, state: np.ndarray | None = None) -> Adapter:
    """The adapter of a session that starts adapting in state (S,) (a new session: zeros)."""
    return Adapter((), _frozen(model.initial_state(1)[0] if state is None else state.copy()), NO_TEXT)


def adapted(model: CharRNN, adapter: Adapter) -> CharRNN:
    """The shared weights plus the adapter's deltas (the shared model itself while there are none)."""
    if not adapter.deltas:
        return model
    params = dict(model.params)
    for name, delta in zip(adapted_names(model), adapter.deltas, strict=True):
        if name == "l0.Wxh":
            weight = params[name].copy()
            weight[:, candidate_columns(model)] += delta
        else:
            weight = params[name] + delta
        params[name] = weight
    return CharRNN(model.config, model.vocab, params)


def rule(model: CharRNN, config: AdaptConfig) -> Rule:
    """rate = lr / max(rms, floor * mean rms), keep = 1 - min(decay * rms / mean rms, 1), per weight."""
    shapes = delta_shapes(model)
    if config.stats is None:
        rms = [np.ones(shape) for shape in shapes]
    else:
        rms = [
            unpacked(config.stats[name], shape)
            for name, shape in zip(adapted_names(model), shapes, strict=True)
        ]
    mean = float(np.concatenate([r.ravel() for r in rms]).mean()) or 1.0
    dtype = model.dtype
    rate = tuple(_frozen((config.lr / np.maximum(r, config.floor * mean)).astype(dtype)) for r in rms)
    keep = tuple(_frozen((1.0 - np.minimum(config.decay * r / mean, 1.0)).astype(dtype)) for r in rms)
    return Rule(config, rate, keep)


def learn_many(
    model: CharRNN, rule: Rule, adapters: Sequence[Adapter], segments: np.ndarray
) -> list[tuple[Adapter, float]]:
    """Each adapter learns from its window, together: segments (k, segment + 1) holds each
    adapter's window and the character after it (its last target). Returns, per adapter, the
    new one (its window empty, starting where the old window's inputs end) and the nats the
    window's targets cost before the step (its score). Each is what it would be alone, bit for
    bit (nextchar.core.adapt_batch)."""
    return _learnt(model, rule, adapters, segments)[0]


def _learnt(
    model: CharRNN, rule: Rule, adapters: Sequence[Adapter], segments: np.ndarray
) -> tuple[list[tuple[Adapter, float]], np.ndarray]:
    """learn_many, and the logits (k, segment, V) after each of the windows' inputs under the
    adapters before the step: a window's predictions, which advance_many serves."""
    nats, grads, states, logits = adapt_batch.gradients(
        model, [a.deltas for a in adapters], np.stack([a.start for a in adapters]), segments
    )
    if rule.config.lr == 0:  # the static model, bit for bit: no delta is ever added
        return [
            (Adapter(a.deltas, _frozen(s), NO_TEXT, a.steps + 1, a.resets), float(n))
            for a, s, n in zip(adapters, states, nats, strict=True)
        ], logits
    deltas = []
    for i, (grad, rate, keep) in enumerate(zip(grads, rule.rate, rule.keep, strict=True)):
        grad *= rate  # in place: no (k, *shape) temporary
        new = np.empty_like(grad)
        for n, adapter in enumerate(adapters):
            if adapter.deltas:
                np.multiply(adapter.deltas[i], keep, out=new[n])
            else:
                new[n] = 0.0  # a fresh adapter's deltas are zeros
        new -= grad
        deltas.append(new)
    within = np.isfinite(nats)  # and every new delta inside +-LIMIT (NaN fails the comparisons)
    for new in deltas:
        rows = new.reshape(len(adapters), -1)
        within &= (rows.max(axis=1, initial=0.0) <= LIMIT) & (rows.min(axis=1, initial=0.0) >= -LIMIT)
    return [
        (
            Adapter(
                tuple(_frozen(d[n].copy()) for d in deltas) if within[n] else (),
                _frozen(states[n]),
                NO_TEXT,
                a.steps + 1,
                a.resets + int(not within[n]),
            ),
            float(nats[n]),
        )
        for n, a in enumerate(adapters)
    ], logits


def learn(model: CharRNN, rule: Rule, adapter: Adapter, segment: np.ndarray) -> tuple[Adapter, float]:
    """learn_many of one adapter: segment = adapter.window plus the character after it."""
    return learn_many(model, rule, [adapter], segment[None, :])[0]


def step(model: CharRNN, rule: Rule, adapter: Adapter, segment: np.ndarray) -> Adapter:
    """learn, without the score."""
    return learn(model, rule, adapter, segment)[0]


def advance_many(
    model: CharRNN,
    rule: Rule,
    adapters: Sequence[Adapter],
    idx: np.ndarray,
    lens: list[int],
    states: np.ndarray,
    probs0: np.ndarray,
    k: int,
    full: bool,
) -> tuple[Advanced, list[Adapter]]:
    """inference.advance (the same packing: idx (T, N) zero-padded past each column's length, lens
    non-increasing; the same outputs) with column n an adaptive session with adapters[n]: it
    steps wherever its window completes, each character scored before the step that learns it.

    The steps come first: a window's gradient needs its text and the adapter before it, not the
    predictions, so every column's j-th window in this chunk steps with the others'
    (``learn_many``). A step's forward runs from the window's start under the adapter in force
    through the window's inputs: it IS those characters' predictions, so they are served from it
    (row by row, each column's bits whatever the batch). What follows a column's last step (its
    tail, one character at least) is under one adapter, the newest, and every column's tail runs
    in one adapt_batch.forward. A rate of 0 never changes a weight: inference.advance, bit for bit."""
    segment = rule.config.segment
    T, N = idx.shape
    held = np.array([len(a.window) for a in adapters])  # (N,) inputs each window held before the chunk
    texts = [
        np.concatenate((a.window, idx[:length, n]))
        for n, (a, length) in enumerate(zip(adapters, lens, strict=True))
    ]
    current = list(adapters)
    if rule.config.lr == 0:
        for _ in _windows(model, rule, current, texts):
            pass
        out = inference.advance(model, idx, lens, states, probs0, k, full)
        return out, [_windowed(a, text, segment) for a, text in zip(current, texts, strict=True)]
    probs_seq = None  # [t + 1]: after character t; a single character needs none (a step)
    if T > 1:
        probs_seq = np.zeros((T + 1, N, probs0.shape[1]), dtype=probs0.dtype)
        probs_seq[0] = probs0
    tail = np.zeros(N, dtype=np.int64)  # where each column's tail starts in the chunk
    starts = states.copy()  # and the state it starts from
    for j, group, learnt, logits in _windows(model, rule, current, texts):
        cols = np.asarray(group)
        tail[cols] = (j + 1) * segment - held[cols]  # the character after the window
        starts[cols] = np.stack([adapter.start for adapter, _ in learnt])
        if (
            probs_seq is not None
        ):  # the window's predictions: after its inputs i, chunk position tail - segment + i
            after = tail[cols, None] - segment + 1 + np.arange(segment)  # (k, segment) rows of probs_seq
            inside = after >= 1
            probs = losses.probabilities(model.config.loss, logits[inside])
            probs_seq[after[inside], np.broadcast_to(cols[:, None], after.shape)[inside]] = probs
    if probs_seq is None:  # every tail is the chunk's one character: a step
        new_states, probs = adapt_batch.forward(model, [a.deltas for a in current], idx, lens, starts)
        out = inference.stepped(probs0, probs[0], idx, new_states, k, full)
        return out, [_windowed(a, text, segment) for a, text in zip(current, texts, strict=True)]
    length = np.asarray(lens) - tail  # (N,) each tail's
    order = np.argsort(-length, kind="stable")  # packed longest first, as adapt_batch.forward takes them
    at = tail[order] + np.arange(length.max())[:, None]  # (L, N) chunk positions of the packed tails
    x = idx[np.minimum(at, T - 1), order]  # past a tail's end: padding
    deltas = [current[n].deltas for n in order]
    tail_states, probs = adapt_batch.forward(model, deltas, x, length[order].tolist(), starts[order])
    new_states = np.empty_like(states)
    new_states[order] = tail_states
    inside = np.arange(length.max())[:, None] < length[order]
    probs_seq[at[inside] + 1, np.broadcast_to(order, at.shape)[inside]] = probs[inside]
    out = inference.scored(probs_seq, idx, lens, new_states, k, full)
    return out, [_windowed(a, text, segment) for a, text in zip(current, texts, strict=True)]


def feed(
    model: CharRNN,
    rule: Rule,
    adapter: Adapter,
    state: np.ndarray,
    probs: np.ndarray,
    idx: np.ndarray,
    k: int = 1,
    full: bool = False,
) -> tuple[Adapter, Advanced]:
    """advance_many of one session (state (S,), prediction probs (V,)) through idx (T,): the new
    adapter and what inference.feed would return (top k, surprisal, the full distributions when
    asked). idx holds one character at least."""
    if len(idx) == 0:
        raise ValueError("feed needs one character at least")
    out, adapters = advance_many(
        model, rule, [adapter], idx.reshape(-1, 1), [len(idx)], state[None, :], probs[None, :], k, full
    )
    return adapters[0], out


def replay(model: CharRNN, rule: Rule, adapter: Adapter, idx: np.ndarray) -> Adapter:
    """The adapter after idx: what feed computes, without the predictions (the window's start state
    and inputs are all a step needs). Moves a rewind's kept adapter from one mark to the next."""
    return score(model, rule, adapter, idx)[0]


def replay_many(
    model: CharRNN, rule: Rule, adapters: Sequence[Adapter], texts: Sequence[np.ndarray]
) -> list[Adapter]:
    """replay of several adapters, each through its own text, their windows stepped together
    (each adapter what replay alone gives, bit for bit)."""
    joined = [np.concatenate((a.window, t)) for a, t in zip(adapters, texts, strict=True)]
    current = list(adapters)
    for _ in _windows(model, rule, current, joined):
        pass
    return [_windowed(a, text, rule.config.segment) for a, text in zip(current, joined, strict=True)]


def score(model: CharRNN, rule: Rule, adapter: Adapter, idx: np.ndarray) -> tuple[Adapter, np.ndarray]:
    """replay, and the nats of each completed window's targets, scored before its step (float64)."""
    text = np.concatenate((adapter.window, idx))
    current = [adapter]
    nats = [float(learnt[0][1]) for _, _, learnt, _ in _windows(model, rule, current, [text])]
    return _windowed(current[0], text, rule.config.segment), np.array(nats)


def _windows(
    model: CharRNN, rule: Rule, current: list[Adapter], texts: list[np.ndarray]
) -> Iterator[tuple[int, list[int], list[tuple[Adapter, float]], np.ndarray]]:
    """Every window that texts[n] (adapter n's window, then what follows) completes, stepped in
    rounds: round j steps the j-th window of each column that has one, together. current[n] is
    adapter n, updated as it steps; yields (j, the columns stepped, learn_many's results, the
    windows' logits)."""
    segment = rule.config.segment
    counts = [max(len(text) - 1, 0) // segment for text in texts]
    for j in range(max(counts, default=0)):
        group = [n for n, count in enumerate(counts) if count > j]
        windows = np.stack([texts[n][j * segment : (j + 1) * segment + 1] for n in group])
        learnt, logits = _learnt(model, rule, [current[n] for n in group], windows)
        for n, (adapter, _) in zip(group, learnt, strict=True):
            current[n] = adapter
        yield j, group, learnt, logits


def _windowed(adapter: Adapter, text: np.ndarray, segment: int) -> Adapter:
    """adapter, its window the end of text that its last step left (text: its window before)."""
    window = _frozen(text[max(len(text) - 1, 0) // segment * segment :])
    return Adapter(adapter.deltas, adapter.start, window, adapter.steps, adapter.resets)


def _within(delta: np.ndarray) -> bool:
    """Finite and inside +-LIMIT (NaN fails both comparisons)."""
    return bool(delta.size == 0 or (np.abs(delta).max() <= LIMIT))


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def packed(rms: np.ndarray) -> str:
    """A weight's gradient rms for the model file: float16 (a normaliser needs no more), base64."""
    return base64.b64encode(rms.astype("<f2").tobytes()).decode("ascii")


def unpacked(recorded: str, shape: tuple[int, ...]) -> np.ndarray:
    """packed's inverse (float64), checked: the shape the model's weight has, finite, >= 0."""
    try:
        rms = np.frombuffer(base64.b64decode(recorded, validate=True), dtype="<f2").astype(np.float64)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"adapt stats: not base64 float16: {exc}") from exc
    if rms.size != math.prod(shape) or not np.all(np.isfinite(rms)) or np.any(rms < 0):
        raise ValueError(
            f"adapt stats: {rms.size} values for a weight of shape {shape}, or not finite and >= 0"
        )
    return rms.reshape(shape)
