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
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
from nextchar.core import inference
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


def gradients(
    model: CharRNN, adapter: Adapter, segment: np.ndarray
) -> tuple[float, tuple[np.ndarray, ...], np.ndarray]:
    """(nats, gradients of the segment's mean loss with respect to each delta, the state after its
    inputs): segment (n + 1,) holds the window's inputs and, one on, its targets, from adapter.start."""
    x, y = segment[:-1].reshape(-1, 1), segment[1:].reshape(-1, 1)
    _, grads, state, nats = adapted(model, adapter).loss_and_grads(x, y, adapter.start[None, :])
    cols = candidate_columns(model)
    return (
        nats,
        tuple(grads[n][:, cols] if n == "l0.Wxh" else grads[n] for n in adapted_names(model)),
        state[0],
    )


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


def step(model: CharRNN, rule: Rule, adapter: Adapter, segment: np.ndarray) -> Adapter:
    """Learn from one window: segment = adapter.window plus the character after it (its last target).

    The new adapter's window is empty and starts where the old window's inputs end."""
    return learn(model, rule, adapter, segment)[0]


def learn(model: CharRNN, rule: Rule, adapter: Adapter, segment: np.ndarray) -> tuple[Adapter, float]:
    """step, and the nats the window's targets cost under the adapter before it (its score)."""
    nats, grads, state = gradients(model, adapter, segment)
    start = _frozen(state)
    if rule.config.lr == 0:  # the static model, bit for bit: no delta is ever added
        return Adapter(adapter.deltas, start, NO_TEXT, adapter.steps + 1, adapter.resets), nats
    old = adapter.deltas or tuple(np.zeros(shape, dtype=model.dtype) for shape in delta_shapes(model))
    deltas = []
    for delta, grad, rate, keep in zip(old, grads, rule.rate, rule.keep, strict=True):
        new = delta * keep
        new -= rate * grad
        deltas.append(_frozen(new))
    if not (math.isfinite(nats) and all(_within(d) for d in deltas)):
        return Adapter((), start, NO_TEXT, adapter.steps + 1, adapter.resets + 1), nats
    return Adapter(tuple(deltas), start, NO_TEXT, adapter.steps + 1, adapter.resets), nats


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
    """Advance one adaptive session (state (S,), prediction probs (V,)) through idx (T,), stepping
    wherever a window completes; returns the new adapter and what inference.feed would (top k,
    surprisal, the full distributions when asked), each character scored before it is learnt.
    idx holds one character at least."""
    if len(idx) == 0:
        raise ValueError("feed needs one character at least")
    segment = rule.config.segment
    pieces: list[Advanced] = []
    pos = 0
    while pos < len(idx):
        if len(adapter.window) == segment:
            # the state after the window's inputs, where the step starts the next window, is the
            # session's state now (bit for bit: the recurrence does not depend on the chunks)
            adapter = step(model, rule, adapter, np.append(adapter.window, idx[pos]))
            state = adapter.start
        piece = idx[pos : pos + segment - len(adapter.window)]
        out = inference.advance(
            adapted(model, adapter),
            piece.reshape(-1, 1),
            [len(piece)],
            state[None, :],
            probs[None, :],
            k,
            full,
        )
        pieces.append(out)
        adapter = replace(adapter, window=_frozen(np.concatenate((adapter.window, piece))))
        state, probs = out.states[0], out.last_probs[0]
        pos += len(piece)
    return adapter, _joined(pieces)


def replay(model: CharRNN, rule: Rule, adapter: Adapter, idx: np.ndarray) -> Adapter:
    """The adapter after idx: what feed computes, without the predictions (the window's start state
    and inputs are all a step needs). Moves a rewind's kept adapter from one mark to the next."""
    return score(model, rule, adapter, idx)[0]


def score(model: CharRNN, rule: Rule, adapter: Adapter, idx: np.ndarray) -> tuple[Adapter, np.ndarray]:
    """replay, and the nats of each completed window's targets, scored before its step (float64)."""
    segment = rule.config.segment
    text = np.concatenate((adapter.window, idx))
    nats = np.zeros(max(len(text) - 1, 0) // segment)
    for i in range(len(nats)):
        adapter, nats[i] = learn(model, rule, adapter, text[i * segment : (i + 1) * segment + 1])
    return replace(adapter, window=_frozen(text[len(nats) * segment :])), nats


def _joined(pieces: list[Advanced]) -> Advanced:
    first, last = pieces[0], pieces[-1]
    if len(pieces) == 1:
        return first
    probs_seq = None
    if first.probs_seq is not None:
        probs_seq = np.concatenate(
            [first.probs_seq[:1], *(p.probs_seq[1:] for p in pieces if p.probs_seq is not None)]
        )
    return Advanced(
        np.concatenate([p.top_index for p in pieces]),
        np.concatenate([p.top_prob for p in pieces]),
        np.concatenate([p.surprisal for p in pieces]),
        probs_seq,
        last.states,
        last.last_probs,
    )


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
