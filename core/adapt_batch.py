"""The arithmetic of adaptive sessions (nextchar.core.adapt), many at once: their forward and their gradients.

A session's deltas come in ``adapt.adapted_names``' order: Why (H, V), by (V,), the
candidate gate's columns of l0.Wxh (V, H), l0.bh (G*H,), and the GRU's l0.bhn (H,);
``()`` while it has none. Deeper layers and every Whh are the shared ones.

``forward`` serves a batch's columns: the shared weights' products for all of them at
once, plus each column's corrections. Layer 0's input is one-hot, so its input delta
is a row gather per column; bias deltas are adds (the GRU's bhn one row per column,
inside the recurrence); the read-out's delta is one (T, H) @ (H, V) product per column,
a stacked matmul. A batch without deltas is the static model's, bit for bit
(``inference.shared_forward``).

``gradients`` differentiates a window's loss with respect to each session's deltas:
BPTT through every layer's Whh (and the upper layers' Wxh) under the session's own
adapted weights, forming only the adapted weights' gradients. An adapter must be a
function of its session's text alone, bit for bit (adapt), but a BLAS product's row can
change with the number of rows (gemv and gemm kernels sum in different orders). So here
every product is a stacked np.matmul whose slices are one session's, with the same
shapes and strides whatever the batch: the recurrent and inter-layer products row by
row (``cells.rowwise``), the read-out and the scatter of dWxh one (T, .) matrix per
session; NumPy calls BLAS once per slice. Elementwise operations round each element
alone; the loss runs per session; sums over a window run along time, each element's in
time order. Batching saves the per-operation overhead of Python and NumPy, not the
products' work: per session-character, the recurrent products cost ~2.2x a gemm's on
100 rows (8.7 vs 3.9 us at H=256 on one AMD EPYC thread). tests/test_adapt_batch.py
compares batches of 1, 2, 7 and 100 sessions with each alone, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from nextchar.core import inference, losses
from nextchar.core.cells import LayerCache, Product, gate_blocks, rowwise, together
from nextchar.core.model import CharRNN

Deltas = tuple[np.ndarray, ...]  # one session's, in adapted_names' order; () = the shared weights
WHY, BY, WXH, BH, BHN = range(5)  # their positions


@dataclass(frozen=True, slots=True)
class Stack:
    """The columns of a batch that have deltas, and theirs: deltas[j] is column cols[j]'s. Only
    what a computation reads is stacked (a served batch would copy 139 KB per column to stack
    the two matrices; it gathers rows of one and multiplies by the other column by column)."""

    cols: np.ndarray  # (m,) int64, increasing
    deltas: list[Deltas]

    @classmethod
    def of(cls, deltas: Sequence[Deltas]) -> Stack:
        cols = [n for n, d in enumerate(deltas) if d]
        return cls(np.asarray(cols, dtype=np.int64), [deltas[n] for n in cols])

    def stacked(self, i: int) -> np.ndarray:
        """(m, *shape): delta i of every column that has deltas."""
        return np.stack([d[i] for d in self.deltas])

    def rows(self, shared: np.ndarray, i: int, n: int) -> np.ndarray:
        """(n, *shared.shape): the shared weight for every column, plus its delta i where it has one."""
        out = np.repeat(shared[None], n, axis=0)
        for col, d in zip(self.cols, self.deltas, strict=True):
            out[col] += d[i]
        return out


def forward(
    model: CharRNN, deltas: Sequence[Deltas], x: np.ndarray, states: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """inference's Forward for B columns with these deltas: x (T, B) from states (B, S) ->
    (new states (B, S), probs (T * B, V) after each character)."""
    stack = Stack.of(deltas)
    if not stack.deltas:
        return inference.shared_forward(model, x, states)
    caches, new_states = _recur(model, stack, x, states, together)
    T, B, H = caches[-1].hs.shape
    h = caches[-1].hs  # (T, B, H)
    logits = h.reshape(T * B, H) @ model.params["Why"]
    logits += model.params["by"]
    columns = logits.reshape(T, B, -1)
    for col, d in zip(stack.cols, stack.deltas, strict=True):
        fix = h[:, col] @ d[WHY]  # (T, V)
        fix += d[BY]
        columns[:, col] += fix
    return new_states, losses.probabilities(model.config.loss, logits)


def gradients(
    model: CharRNN, deltas: Sequence[Deltas], starts: np.ndarray, segments: np.ndarray
) -> tuple[np.ndarray, tuple[np.ndarray, ...], np.ndarray]:
    """For k sessions, each window segments[n] (T + 1,) (its inputs, and one on its targets) from
    starts[n] (S,) under deltas[n]: (nats of each window (k,) float64, the gradients of each
    window's mean loss with respect to each delta (k, *shape), the states after the inputs (k, S)).
    Each session's bits are those it has alone (above)."""
    cfg, p, cell = model.config, model.params, model.cell
    k, T = segments.shape[0], segments.shape[1] - 1
    H, V = cfg.hidden, model.vocab.size
    stack = Stack.of(deltas)
    x = np.ascontiguousarray(segments[:, :-1].T)  # (T, k)
    caches, states = _recur(model, stack, x, starts, rowwise)
    hs = np.ascontiguousarray(caches[-1].hs.transpose(1, 0, 2))  # (k, T, H)
    Why = stack.rows(p["Why"], WHY, k)  # (k, H, V) each session's read-out
    logits = np.matmul(hs, Why)  # (k, T, V)
    logits += stack.rows(p["by"], BY, k)[:, None]
    nats = np.zeros(k)
    dlogits = np.empty_like(logits)
    for n in range(k):
        _, dlogits[n], nats[n] = losses.LOSSES[cfg.loss](logits[n], segments[n, 1:])
    dWhy = np.matmul(hs.transpose(0, 2, 1), dlogits)  # (k, H, V)
    dby = dlogits.sum(axis=1)
    dhs = np.matmul(dlogits, Why.transpose(0, 2, 1)).transpose(1, 0, 2)  # (T, k, H)
    for layer in reversed(range(1, cfg.layers)):
        dxp, _ = cell.backward_preacts(caches[layer], dhs, p[f"l{layer}.Whh"], rowwise)
        WxhT = np.ascontiguousarray(p[f"l{layer}.Wxh"].T)  # (G*H, H)
        dhs = rowwise(dxp.reshape(T * k, -1), WxhT, np.empty((T * k, H), dtype=dxp.dtype)).reshape(T, k, H)
    dxp, drec = cell.backward_preacts(caches[0], dhs, p["l0.Whh"], rowwise)  # (T, k, G*H)
    onehot = np.zeros((k, V, T), dtype=dxp.dtype)
    onehot[np.arange(k)[:, None], x.T, np.arange(T)] = 1.0
    candidate = dxp[:, :, cell.candidate * H : (cell.candidate + 1) * H]
    dWxh = np.matmul(onehot, np.ascontiguousarray(candidate.transpose(1, 0, 2)))  # (k, V, H)
    grads: tuple[np.ndarray, ...] = (dWhy, dby, dWxh, dxp.sum(axis=0))
    if cell.has_bhn:
        grads = (*grads, drec[:, :, 2 * H :].sum(axis=0))
    return nats, grads, states


def _recur(
    model: CharRNN, stack: Stack, x: np.ndarray, states: np.ndarray, product: Product
) -> tuple[list[LayerCache], np.ndarray]:
    """Every layer's forward over x (T, B) from states (B, S), layer 0 with the stack's input and
    bias deltas: (the layers' caches, the states after x)."""
    cfg, p, cell = model.config, model.params, model.cell
    T, B = x.shape
    G, H, W = cell.gates, cfg.hidden, model.layer_width
    caches: list[LayerCache] = []
    new_states = np.empty_like(states)
    for layer in range(cfg.layers):
        if layer == 0:
            xp = _input_projection(model, stack, x)
        else:
            below = caches[-1].hs.reshape(T * B, H)
            xp = product(
                below, gate_blocks(p[f"l{layer}.Wxh"], G), np.empty((G, T * B, H), dtype=below.dtype)
            )
            xp += p[f"l{layer}.bh"].reshape(G, 1, H)
            xp = xp.reshape(G, T, B, H).transpose(1, 0, 2, 3)
        bhn = p.get(f"l{layer}.bhn")
        if layer == 0 and bhn is not None and stack.deltas:
            bhn = stack.rows(bhn, BHN, B)
        s = slice(layer * W, (layer + 1) * W)
        new_states[:, s], cache = cell.forward(xp, states[:, s], p[f"l{layer}.Whh"], bhn, product)
        caches.append(cache)
    return caches, new_states


def _input_projection(model: CharRNN, stack: Stack, x: np.ndarray) -> np.ndarray:
    """Layer 0's xp (T, G, B, H), gate-major as the cells take it: the shared rows of Wxh + bh
    gathered, then each column's bias delta and its candidate delta's rows added."""
    p, cell = model.params, model.cell
    G, H = cell.gates, model.config.hidden
    xp = np.take(gate_blocks(p["l0.Wxh"] + p["l0.bh"], G), x, axis=1)  # (G, T, B, H)
    if stack.deltas:
        cols = stack.cols
        xp[:, :, cols] += stack.stacked(BH).reshape(-1, G, H).transpose(1, 0, 2)[:, None]
        rows = [d[WXH][x[:, col]] for col, d in zip(cols, stack.deltas, strict=True)]  # (T, H) each
        xp[cell.candidate][:, cols] += np.stack(rows, axis=1)
    return xp.transpose(1, 0, 2, 3)
