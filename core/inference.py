"""Inference: advance sessions through text and score it (top-k, surprisal), or sample from them.

The one place where predictions are computed: the server's batches, its compute
process and the demo all call ``advance``; Generate and the demo's sampling call
``generate``. Everything works on plain arrays (no sessions, no asyncio), so the
same call gives the same answer in any process.

``advance`` takes N sessions at once, each with a chunk of its own length (N = 1
and one character is the ping-pong case). Columns are ordered longest chunk
first (``pack_chunks``), so the sessions still active at position t are a prefix
of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from nextchar.core import losses
from nextchar.core.config import Sampling
from nextchar.core.model import CharRNN
from nextchar.core.vocab import UNK

COLUMN_BLOCK = 256  # sessions per forward call: wider batches push the (T, B, H) cache out of the CPU cache
ARGMAX_TOP_K = 8  # up to this k, k argmax passes beat argpartition + sort (3x at k=3, V=66)
PLAIN_SAMPLING = Sampling()  # plain sampling from the model's distribution: temperature 1, no cut-off


@dataclass(slots=True)
class Advanced:
    """A batch's outputs, column i for the chunk in column i; rows past a chunk's end are padding."""

    top_index: np.ndarray  # (T, N, K) uint32, most likely first
    top_prob: np.ndarray  # (T, N, K) float32
    surprisal: np.ndarray  # (T, N) float32, bits: -log2 p(char) under the prediction before it
    probs_seq: np.ndarray | None  # (T + 1, N, V) when full distributions were asked for; [0] before the chunk
    states: np.ndarray  # (N, S) after each chunk
    last_probs: np.ndarray  # (N, V) prediction after each chunk


def initial_probs(model: CharRNN) -> np.ndarray:
    """(V,) the prediction before any character: every cell starts from a zero state."""
    return model.predict_from(model.initial_state(1))[0]


def pack_chunks(chunks: Sequence[np.ndarray]) -> tuple[list[int], list[int], np.ndarray]:
    """(order, lens, idx): chunk order[i] goes in column i, longest first; idx (T, N) int64 zero-padded."""
    lens = [len(c) for c in chunks]
    if min(lens) == max(lens):  # the usual case: every stream sends chunks of one size
        order = list(range(len(chunks)))
        idx = np.concatenate(chunks).reshape(len(chunks), -1).T  # a third of np.stack's time
        return order, lens, idx
    order = sorted(range(len(chunks)), key=lambda i: -lens[i])
    lens = [lens[i] for i in order]
    idx = np.zeros((lens[0], len(chunks)), dtype=np.int64)
    for col, i in enumerate(order):
        idx[: lens[col], col] = chunks[i]
    return order, lens, idx


def top_k_rows(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries of each row of probs (M, V), largest first: (indices, values).

    Ties go to the lower index on both paths: k argmax passes where they are cheapest
    (many rows, small k), one stable sort otherwise (a lone row: one NumPy call). A
    partition would be faster for large k but picks arbitrarily among ties at the cut.
    """
    if probs.shape[0] > 1 and k <= ARGMAX_TOP_K:
        return _top_k_by_argmax(probs, k)
    if probs.shape[0] == 1:  # the ping-pong case: plain indexing costs half of take_along_axis
        row = np.argsort(-probs[0], kind="stable")[:k]
        return row.astype(np.uint32)[None, :], probs[0, row][None, :]
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return order.astype(np.uint32), np.take_along_axis(probs, order, axis=1)


def _top_k_by_argmax(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k passes of argmax, masking each winner: ties go to the lower index, as argmax does."""
    M = probs.shape[0]
    rows = np.arange(M)
    work = probs.copy()
    top_i = np.empty((M, k), dtype=np.uint32)
    top_p = np.empty((M, k), dtype=probs.dtype)
    for j in range(k):
        best = work.argmax(axis=1)
        top_i[:, j] = best
        top_p[:, j] = work[rows, best]
        work[rows, best] = -np.inf
    return top_i, top_p


def surprisal_bits(p: np.ndarray) -> np.ndarray:
    """-log2 p as float32 bits; p = 0 gives inf (a character the model ruled out)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return (-np.log2(p)).astype(np.float32, copy=False)


def shared_forward(model: CharRNN, x: np.ndarray, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The shared weights over x (t, w) from states (w, S): (new states, probs (t * w, V) after each
    character). One position is one ``model.step`` (which skips forward's BPTT cache), more are ONE
    ``model.forward``: one (w, H) @ (H, H) product per position, the read-out one product for the
    whole piece."""
    if x.shape[0] == 1:
        return model.step(states, x[0])
    _, logits, new_states = model.forward(x, states)
    return new_states, losses.probabilities(model.config.loss, logits)  # (t * w, V)


def advance(
    model: CharRNN,
    idx: np.ndarray,
    lens: list[int],
    states: np.ndarray,
    probs0: np.ndarray,
    k: int,
    full: bool,
) -> Advanced:
    """Advance N sessions (states (N, S), predictions probs0 (N, V)) through the chunks in idx (T, N):
    between two distinct chunk lengths the active prefix is fixed, and that piece is one forward
    call per COLUMN_BLOCK columns."""
    T, N = idx.shape
    if T == 1:
        new_states, probs = model.step(states, idx[0])
        return stepped(probs0, probs, idx, new_states, k, full)
    V = probs0.shape[1]
    states = states.copy()
    probs_seq = np.empty((T + 1, N, V), dtype=probs0.dtype)  # [0]: before the chunk; [t+1]: after char t
    probs_seq[0] = probs0
    start = 0
    for end in sorted(set(lens)):
        n = sum(1 for length in lens if length >= end)  # the active prefix
        for b in range(0, n, COLUMN_BLOCK):
            cols = slice(b, min(n, b + COLUMN_BLOCK))
            states[cols], probs = shared_forward(model, idx[start:end, cols], states[cols])
            probs_seq[start + 1 : end + 1, cols] = probs.reshape(end - start, -1, V)
        start = end
    return scored(probs_seq, idx, lens, states, k, full)


def stepped(
    probs0: np.ndarray, probs: np.ndarray, idx: np.ndarray, states: np.ndarray, k: int, full: bool
) -> Advanced:
    """advance's outputs for one character per column, idx (1, N), from the predictions before it
    (probs0 (N, V)) and after it (probs (N, V)): no (T + 1, N, V) array to fill (ping-pong)."""
    N = idx.shape[1]
    before = probs0[np.arange(N), idx[0]]  # (N,) p of each character
    top_i, top_p = top_k_rows(probs, k)
    return Advanced(
        top_i.reshape(1, N, k),
        top_p.reshape(1, N, k).astype(np.float32, copy=False),
        surprisal_bits(before).reshape(1, N),
        np.stack([probs0, probs]) if full else None,
        states,
        probs,
    )


def scored(
    probs_seq: np.ndarray, idx: np.ndarray, lens: list[int], states: np.ndarray, k: int, full: bool
) -> Advanced:
    """advance's outputs from every prediction of a chunk idx (T, N): probs_seq (T + 1, N, V), [0]
    before the chunk, [t + 1] after character t (rows past a column's length are padding)."""
    T, N = idx.shape
    V = probs_seq.shape[2]
    # padding (past a short chunk's end) holds garbage; it is computed, never read
    with np.errstate(invalid="ignore", over="ignore"):
        before = probs_seq[:T].reshape(T * N, V)[np.arange(T * N), idx.ravel()]  # (T*N,)
        top_i, top_p = top_k_rows(probs_seq[1:].reshape(T * N, V), k)
    last = probs_seq[np.asarray(lens), np.arange(N)]  # (N, V)
    return Advanced(
        top_i.reshape(T, N, k),
        top_p.reshape(T, N, k).astype(np.float32, copy=False),
        surprisal_bits(before).reshape(T, N),
        probs_seq if full else None,
        states,
        last,
    )


def feed(model: CharRNN, state: np.ndarray, probs: np.ndarray, idx: np.ndarray, k: int = 1) -> Advanced:
    """Advance one session (state (S,), prediction probs (V,)) through idx (T,), full distributions kept."""
    return advance(model, idx.reshape(-1, 1), [len(idx)], state[None, :], probs[None, :], k, True)


# ---------------------------------------------------------------- sampling


def sample(probs: np.ndarray, rng: np.random.Generator, sampling: Sampling = PLAIN_SAMPLING) -> int:
    """Draw one index from probs (V,); the unknown slot is never drawn.

    Temperature rescales log-probabilities (p ** (1/T), renormalised), so it works the
    same for softmax and sigmoid models without needing their logits. Greedy sampling
    takes the likeliest (the lower index on a tie) and draws nothing from rng.
    """
    p = np.asarray(probs, dtype=np.float64).copy()
    p[UNK] = 0.0
    if sampling.greedy:
        return int(np.argmax(p))
    if sampling.temperature != 1.0:
        with np.errstate(divide="ignore"):
            logp = np.log(p) / sampling.temperature
        p = np.exp(logp - logp.max())
    order = np.argsort(-p, kind="stable")
    keep = len(p) if sampling.top_k <= 0 else min(sampling.top_k, len(p))
    if sampling.top_p < 1.0:
        cumulative = np.cumsum(p[order]) / p.sum()
        keep = min(keep, int(np.searchsorted(cumulative, sampling.top_p)) + 1)
    kept = order[:keep]
    weights = p[kept] / p[kept].sum()
    return int(kept[rng.choice(keep, p=weights)])


def generate(
    model: CharRNN,
    state: np.ndarray,
    probs: np.ndarray,
    length: int,
    rng: np.random.Generator,
    sampling: Sampling = PLAIN_SAMPLING,
) -> tuple[str, np.ndarray, np.ndarray]:
    """Sample length characters, feeding each back in; returns (text, state after it, probs after it).

    probs is the distribution after the last character the state consumed.
    """
    out: list[int] = []
    state = state[None, :]
    for _ in range(length):
        idx = sample(probs, rng, sampling)
        out.append(idx)
        state, batch_probs = model.step(state, np.array([idx]))
        probs = batch_probs[0]
    return model.vocab.decode(out), state[0], probs
