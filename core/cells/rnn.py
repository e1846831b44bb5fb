"""The tanh RNN, the notebook's cell: h' = tanh(x Wxh + h Whh + b)."""

from __future__ import annotations

import numpy as np
from nextchar.core.cells.base import Cell, LayerCache


class RNN(Cell):
    name = "rnn"
    gates = 1

    def step(self, xp: np.ndarray, state: np.ndarray, Whh: np.ndarray, bhn: np.ndarray | None) -> np.ndarray:
        a = state @ Whh
        a += xp
        return np.tanh(a, out=a)

    def forward(
        self, xp: np.ndarray, state: np.ndarray, Whh: np.ndarray, bhn: np.ndarray | None
    ) -> tuple[np.ndarray, LayerCache]:
        T, B, H = xp.shape
        hs = np.empty((T, B, H), dtype=xp.dtype)
        h = state
        for t in range(T):
            a = np.matmul(h, Whh, out=hs[t])
            a += xp[t]
            h = np.tanh(a, out=a)
        return h.copy(), LayerCache(h0=state, hs=hs)

    def backward_preacts(
        self, cache: LayerCache, dhs: np.ndarray, Whh: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        T = cache.hs.shape[0]
        da = np.square(cache.hs)  # becomes 1 - h^2, then dL/da in place
        np.subtract(1.0, da, out=da)
        WhhT = np.ascontiguousarray(Whh.T)
        dh = dhs[T - 1].copy()
        for t in range(T - 1, -1, -1):
            if t < T - 1:
                np.matmul(da[t + 1], WhhT, out=dh)
                dh += dhs[t]
            da[t] *= dh
        return da, da
