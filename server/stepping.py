"""The batch arithmetic on plain arrays: no sessions, no asyncio, no gRPC.

Kept apart from the batcher so the compute worker process (nextchar.server.compute)
imports only NumPy and nextchar.core, and so the same function runs in the server
process or in the worker and gives the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nextchar.core import losses
from nextchar.core.model import CharRNN

COLUMN_BLOCK = 256  # sessions per forward call: wider batches push the (T, B, H) cache out of the CPU cache


@dataclass(slots=True)
class Packed:
    """A batch's inputs, longest chunk first (order[i] = the work in column i)."""

    order: list[int]
    lens: list[int]  # chunk length per column, non-increasing
    idx: np.ndarray  # (T, N) int64, zero-padded past each chunk's end
    states: np.ndarray  # (N, S)
    probs0: np.ndarray  # (N, V) prediction before each chunk
    k: int  # the largest top-k asked for
    full: bool  # someone wants the full distributions


@dataclass(slots=True)
class Advanced:
    """A batch's outputs; rows past a chunk's end are padding."""

    top_index: np.ndarray  # (T, N, K) uint32, most likely first
    top_prob: np.ndarray  # (T, N, K) float32
    surprisal: np.ndarray  # (T, N) float32, bits
    probs_seq: np.ndarray | None  # (T + 1, N, V) when full distributions were asked for
    states: np.ndarray  # (N, S) after each chunk
    last_probs: np.ndarray  # (N, V) prediction after each chunk


ARGMAX_TOP_K = 8  # up to this k, k argmax passes beat argpartition + sort (3x at k=3, V=66)


def top_k_rows(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries of each row of probs (M, V), largest first: (indices, values)."""
    M, V = probs.shape
    if k <= ARGMAX_TOP_K:
        return _top_k_by_argmax(probs, k)
    rows = np.arange(M)[:, None]
    if k >= V:
        order = np.argsort(-probs, axis=1, kind="stable")
        return order.astype(np.uint32), probs[rows, order]
    part = np.argpartition(probs, V - k, axis=1)[:, V - k :]  # (M, k) unordered
    vals = probs[rows, part]
    order = np.argsort(-vals, axis=1, kind="stable")
    return part[rows, order].astype(np.uint32), vals[rows, order]


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


def advance(
    model: CharRNN,
    idx: np.ndarray,
    lens: list[int],
    states: np.ndarray,
    probs0: np.ndarray,
    k: int,
    full: bool,
) -> Advanced:
    """Advance N sessions through their chunks, all stepped together.

    Columns are ordered longest first, so the sessions still active at position t
    are a prefix of the batch. Between two distinct chunk lengths the active prefix
    is fixed, and that segment is ONE ``model.forward(idx (t, n), states (n, S))``:
    the recurrence is one (n, H) @ (H, H) product per position, the read-out one
    product for the whole segment. Usually every chunk has the same length (1 or 64
    characters), so a batch is a single forward call per column block.
    """
    T, N = idx.shape
    V = model.vocab.size
    states = states.copy()
    probs_seq = np.empty((T + 1, N, V), dtype=model.dtype)  # [0]: before the chunk; [t+1]: after char t
    probs_seq[0] = probs0
    start = 0
    for end in sorted(set(lens)):
        n = sum(1 for length in lens if length >= end)  # the active prefix
        for b in range(0, n, COLUMN_BLOCK):
            cols = slice(b, min(n, b + COLUMN_BLOCK))
            if end - start == 1:  # one position: the step path skips forward's BPTT cache
                new_states, probs = model.step(states[cols], idx[start, cols])
            else:
                _, logits, new_states = model.forward(idx[start:end, cols], states[cols])
                probs = losses.probabilities(model.config.loss, logits)  # (t * width, V)
            states[cols] = new_states
            probs_seq[start + 1 : end + 1, cols] = probs.reshape(end - start, -1, V)
        start = end
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # padding (past a short chunk's end) holds garbage; it is computed, never read
        before = probs_seq[:T].reshape(T * N, V)[np.arange(T * N), idx.ravel()]  # (T*N,) p of each char
        surprisal = (-np.log2(before)).reshape(T, N).astype(np.float32, copy=False)
        top_i, top_p = top_k_rows(probs_seq[1:].reshape(T * N, V), k)
    last = probs_seq[np.asarray(lens), np.arange(N)]  # (N, V)
    return Advanced(
        top_i.reshape(T, N, k),
        top_p.reshape(T, N, k).astype(np.float32, copy=False),
        surprisal,
        probs_seq if full else None,
        states,
        last,
    )
