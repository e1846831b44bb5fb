"""The arithmetic of adaptive sessions (nextchar.core.adapt), many at once: their forward and their gradients.

A session's deltas come in ``adapt.adapted_names``' order: Why (H, V), by (V,), the
candidate gate's columns of l0.Wxh (V, H), l0.bh (G*H,), and the GRU's l0.bhn (H,);
``()`` while it has none. Deeper layers and every Whh are the shared ones.

``forward`` serves a batch's columns, each under one adapter (adapt.advance_many serves
what precedes a column's last step from the step's own forward): the shared weights'
products for all of them at once, plus each column's corrections. Layer 0's input is
one-hot, so its input delta is a row gather per column; bias deltas are adds (the GRU's
bhn one row per column, inside the recurrence); the read-out's delta is one
(len, H) @ (H, V) product per column, over its own positions.

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

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from nextchar.core import losses
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
    model: CharRNN, deltas: Sequence[Deltas], x: np.ndarray, lens: Sequence[int], states: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """B columns, each through its own inputs under its own deltas: x (T, B) packed as
    inference.advance packs it (column b's inputs x[:lens[b], b], lens non-increasing), from states
    (B, S) -> (the states after each column's inputs (B, S), probs (T, B, V) after each input; rows
    past a column's length are padding). One character is a step (no BPTT cache); more run as
    pieces of fixed width, cut only where the active prefix narrows, and the read-out runs once."""
    stack = Stack.of(deltas)
    if x.shape[0] == 1:
        hs, new_states = _step(model, stack, x[0], states)
    else:
        hs, new_states = _packed(model, stack, x, lens, states)
    return new_states, losses.probabilities(model.config.loss, _read_out(model, stack, hs, lens))


def _step(model: CharRNN, stack: Stack, x: np.ndarray, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One character x (B,) for every column, as model.step: (the top layer's h (1, B, H), new states)."""
    cfg, p, cell = model.config, model.params, model.cell
    B, W = x.shape[0], model.layer_width
    new_states = np.empty_like(states)
    below: np.ndarray | None = None
    for layer in range(cfg.layers):
        xp = model.input_projection(layer, x, below)  # (B, G*H)
        bhn = p.get(f"l{layer}.bhn")
        if layer == 0 and stack.deltas:
            _add_input_deltas(model, stack, x[None], xp.reshape(1, B, cell.gates, -1))
            bhn = None if bhn is None else stack.rows(bhn, BHN, B)
        s = slice(layer * W, (layer + 1) * W)
        new_states[:, s] = cell.step(xp, states[:, s], p[f"l{layer}.Whh"], bhn)
        below = new_states[:, s.start : s.start + cfg.hidden]
    assert below is not None
    return below[None], new_states


def _packed(
    model: CharRNN, stack: Stack, x: np.ndarray, lens: Sequence[int], states: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Every layer over x (T, B) packed (forward), each column stopping at its length: (the top
    layer's hs (T, B, H), zeros past a column's length; the states after each column's inputs)."""
    cfg, p, cell = model.config, model.params, model.cell
    T, B = x.shape
    W = model.layer_width
    ends = sorted(set(lens))
    widths = [B - bisect.bisect_left(lens[::-1], end) for end in ends]  # columns still active
    new_states = np.empty_like(states)
    hs: np.ndarray | None = None
    for layer in range(cfg.layers):
        xp, bhn = _layer_input(model, stack, layer, x, hs, together)
        hs = np.zeros((T, B, cfg.hidden), dtype=xp.dtype)
        s = slice(layer * W, (layer + 1) * W)
        state = states[:, s].copy()
        start = 0
        for end, n in zip(ends, widths, strict=True):
            rows = None if bhn is None else bhn[:n]
            state[:n], cache = cell.forward(xp[start:end, :, :n], state[:n], p[f"l{layer}.Whh"], rows)
            hs[start:end, :n] = cache.hs
            start = end
        new_states[:, s] = state
    assert hs is not None
    return hs, new_states


def _read_out(model: CharRNN, stack: Stack, hs: np.ndarray, lens: Sequence[int]) -> np.ndarray:
    """logits (T, B, V) of the top layer's hs (T, B, H): the shared read-out for all columns in one
    product, then each column's delta over its own positions, one (len, H) @ (H, V) product."""
    p = model.params
    T, B, H = hs.shape
    logits = (hs.reshape(T * B, H) @ p["Why"]).reshape(T, B, -1)
    logits += p["by"]
    for col, d in zip(stack.cols, stack.deltas, strict=True):
        length = lens[col]
        fix = hs[:length, col] @ d[WHY]  # (len, V)
        fix += d[BY]
        logits[:length, col] += fix
    return logits


def gradients(
    model: CharRNN, deltas: Sequence[Deltas], starts: np.ndarray, segments: np.ndarray
) -> tuple[np.ndarray, tuple[np.ndarray, ...], np.ndarray, np.ndarray]:
    """For k sessions, each window segments[n] (T + 1,) (its inputs, and one on its targets) from
    starts[n] (S,) under deltas[n]: (nats of each window (k,) float64, the gradients of each
    window's mean loss with respect to each delta (k, *shape), the states after the inputs (k, S),
    the logits after each input (k, T, V)). Each session's bits are those it has alone (above)."""
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
    return nats, grads, states, logits


def _recur(
    model: CharRNN, stack: Stack, x: np.ndarray, states: np.ndarray, product: Product
) -> tuple[list[LayerCache], np.ndarray]:
    """Every layer's forward over x (T, B) from states (B, S), layer 0 with the stack's input and
    bias deltas: (the layers' caches, the states after x)."""
    cfg, p, cell = model.config, model.params, model.cell
    W = model.layer_width
    caches: list[LayerCache] = []
    new_states = np.empty_like(states)
    for layer in range(cfg.layers):
        xp, bhn = _layer_input(model, stack, layer, x, caches[-1].hs if caches else None, product)
        s = slice(layer * W, (layer + 1) * W)
        new_states[:, s], cache = cell.forward(xp, states[:, s], p[f"l{layer}.Whh"], bhn, product)
        caches.append(cache)
    return caches, new_states


def _layer_input(
    model: CharRNN, stack: Stack, layer: int, x: np.ndarray, below: np.ndarray | None, product: Product
) -> tuple[np.ndarray, np.ndarray | None]:
    """A layer's xp (T, G, B, H), gate-major as the cells take it, over x (T, B) or the layer below's
    hs (T, B, H), and its bhn, one row per column (B, H) (the GRU's; None for the other cells):
    layer 0 with the stack's deltas, the layers above the shared weights'."""
    p, cell = model.params, model.cell
    T, B = x.shape
    G, H = cell.gates, model.config.hidden
    if below is None:
        xp = np.take(gate_blocks(p["l0.Wxh"] + p["l0.bh"], G), x, axis=1)  # (G, T, B, H)
        if stack.deltas:
            _add_input_deltas(model, stack, x, xp.transpose(1, 2, 0, 3))
    else:
        xp = product(
            below.reshape(T * B, H),
            gate_blocks(p[f"l{layer}.Wxh"], G),
            np.empty((G, T * B, H), dtype=below.dtype),
        )
        xp += p[f"l{layer}.bh"].reshape(G, 1, H)
        xp = xp.reshape(G, T, B, H)
    bhn = p.get(f"l{layer}.bhn")
    if bhn is not None:
        bhn = stack.rows(bhn, BHN, B) if layer == 0 and stack.deltas else np.broadcast_to(bhn, (B, H))
    return xp.transpose(1, 0, 2, 3), bhn


def _add_input_deltas(model: CharRNN, stack: Stack, x: np.ndarray, xp: np.ndarray) -> None:
    """Adds each column's layer-0 deltas to xp, a (T, B, G, H) view of the shared projection of
    x (T, B): its bias delta, and its candidate delta's rows (the input is one-hot: a gather)."""
    cols = stack.cols
    G, H = model.cell.gates, model.config.hidden
    xp[:, cols] += stack.stacked(BH).reshape(-1, G, H)
    rows = [d[WXH][x[:, col]] for col, d in zip(cols, stack.deltas, strict=True)]  # (T, H) each
    xp[:, cols, model.cell.candidate] += np.stack(rows, axis=1)
