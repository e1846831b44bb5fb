"""The LSTM, PyTorch's formulation: gates (i, f, g, o), state [h, c].

The four gate nonlinearities are one tanh over the fused (N, 4H) pre-activation, since
sigmoid(x) = 0.5 * tanh(0.5 * x) + 0.5 (base.sigmoid's formula): every gate is
``scale * tanh(scale * x) + shift``, with scale and shift 0.5 on i, f, o and 1 and 0 on g.
One contiguous tanh per step instead of four strided ones, and one derivative for all
four gates: scale^2 - (scale * tanh(scale * x))^2.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from nextchar.core.cells.base import Cell, LayerCache, Product, gate_blocks, hidden_buffer, together

GATE_SCALE = (0.5, 0.5, 1.0, 0.5)  # i, f, g, o: sigmoid, sigmoid, tanh, sigmoid
GATE_SHIFT = (0.5, 0.5, 0.0, 0.5)


@functools.cache
def _gate_constants(H: int, dtype: np.dtype[Any], shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) shaped to broadcast over the gates: shape (4, 1, 1) gate-major, or (4 * H,)
    for PyTorch's (N, 4H) row layout. Cached (inference steps one character at a time), so
    read-only."""
    scale, shift = np.array(GATE_SCALE, dtype=dtype), np.array(GATE_SHIFT, dtype=dtype)
    if shape == (4 * H,):
        scale, shift = np.repeat(scale, H), np.repeat(shift, H)
    else:
        scale, shift = scale.reshape(shape), shift.reshape(shape)
    scale.flags.writeable = shift.flags.writeable = False
    return scale, shift


def _activate(a: np.ndarray, scale: np.ndarray, shift: np.ndarray, dact: np.ndarray | None = None) -> None:
    """Pre-activations a -> gates i, f, g, o, in place; with dact (a's shape), also d gate / d a.
    a is (N, 4H) in PyTorch's layout or (4, B, H) gate-major, with _gate_constants to match."""
    a *= scale
    np.tanh(a, out=a)
    a *= scale  # scale * tanh(scale * x)
    if dact is not None:
        np.multiply(a, a, out=dact)
        np.subtract(np.square(scale), dact, out=dact)  # scale^2 * (1 - tanh^2)
    a += shift


class LSTM(Cell):
    name = "lstm"
    gates = 4
    state_width = 2
    candidate = 2  # g

    def step(self, xp: np.ndarray, state: np.ndarray, Whh: np.ndarray, bhn: np.ndarray | None) -> np.ndarray:
        H = Whh.shape[0]
        h, c = state[:, :H], state[:, H:]
        a = h @ Whh  # (N, 4H)
        a += xp
        _activate(a, *_gate_constants(H, a.dtype, (4 * H,)))
        i, f, g, o = a[:, :H], a[:, H : 2 * H], a[:, 2 * H : 3 * H], a[:, 3 * H :]
        c_new = f * c + i * g
        return np.concatenate([o * np.tanh(c_new), c_new], axis=1)

    def forward(
        self,
        xp: np.ndarray,
        state: np.ndarray,
        Whh: np.ndarray,
        bhn: np.ndarray | None,
        product: Product = together,
    ) -> tuple[np.ndarray, LayerCache]:
        """T steps. Each step's gates are laid out gate-major, (4, B, H), so that every gate is one
        contiguous block (NumPy runs an operation on a strided (B, H) slice of a (B, 4H) row
        layout about 3x slower than on a contiguous one). What the backward needs is computed
        here, per step, while it is in cache: k (T, 4, B, H) turns dc (i, f, g) or dh (o) into
        the gates' pre-activation gradients (each gate's derivative times what the gate
        multiplies), k_c (T, B, H) turns dh into dc, and f (T, B, H) carries dc back a step."""
        T, _, B, H = xp.shape
        scale, shift = _gate_constants(H, xp.dtype, (4, 1, 1))
        h = hidden_buffer(state, xp, H)  # (T+1, B, H)
        k = np.empty((T, 4, B, H), dtype=xp.dtype)
        k_c = np.empty((T, B, H), dtype=xp.dtype)
        fs = np.empty((T, B, H), dtype=xp.dtype)
        Whh4 = gate_blocks(Whh, 4)  # (4, H, H)
        a = np.empty((4, B, H), dtype=xp.dtype)  # this step's gates
        i, f, g, o = a
        c, c_new = state[:, H:].copy(), np.empty((B, H), dtype=xp.dtype)
        ig = np.empty((B, H), dtype=xp.dtype)
        tc = np.empty((B, H), dtype=xp.dtype)
        for t in range(T):
            product(h[t], Whh4, a)  # (4, B, H)
            a += xp[t]
            kt = k[t]
            _activate(a, scale, shift, dact=kt)
            np.multiply(f, c, out=c_new)  # c' = f * c + i * g
            np.multiply(i, g, out=ig)
            c_new += ig
            np.tanh(c_new, out=tc)
            np.multiply(o, tc, out=h[t + 1])  # h' = o * tanh(c')
            kt[0] *= g  # d c' / d a_i
            kt[1] *= c  # d c' / d a_f
            kt[2] *= i  # d c' / d a_g
            kt[3] *= tc  # d h' / d a_o
            np.multiply(tc, tc, out=k_c[t])  # d h' / d c' = o * (1 - tanh(c')^2)
            np.subtract(1.0, k_c[t], out=k_c[t])
            k_c[t] *= o
            fs[t] = f
            c, c_new = c_new, c
        final = np.concatenate([h[T], c], axis=1)
        return final, LayerCache(h0=state, h=h, gates={"k": k, "k_c": k_c, "f": fs})

    def backward_preacts(
        self, cache: LayerCache, dhs: np.ndarray, Whh: np.ndarray, product: Product = together
    ) -> tuple[np.ndarray, np.ndarray]:
        T, B, H = cache.hs.shape
        k, k_c, f = cache.gates["k"], cache.gates["k_c"], cache.gates["f"]
        da = np.empty((T, B, 4 * H), dtype=dhs.dtype)  # dL/d(pre-activations), PyTorch's row layout
        da4 = da.reshape(T, B, 4, H).transpose(0, 2, 1, 3)  # the same, gate-major views (written into)
        WhhT = np.ascontiguousarray(Whh.T)
        dh = np.zeros((B, H), dtype=dhs.dtype)
        dc = np.zeros((B, H), dtype=dhs.dtype)
        tmp = np.empty((B, H), dtype=dhs.dtype)
        for t in range(T - 1, -1, -1):
            dh += dhs[t]
            np.multiply(dh, k_c[t], out=tmp)
            dc += tmp
            np.multiply(dc, k[t, :3], out=da4[t, :3])  # i, f, g
            np.multiply(dh, k[t, 3], out=da4[t, 3])  # o
            dc *= f[t]
            product(da[t], WhhT, dh)
        return da, da
