"""The tanh RNN, the notebook's cell: h' = tanh(x Wxh + h Whh + b)."""

from __future__ import annotations

import numpy as np
from nextchar.core.cells.base import Cell, LayerCache, Product, hidden_buffer, together


class RNN(Cell):
    name = "rnn"
    gates = 1

    def step(self, xp: np.ndarray, state: np.ndarray, Whh: np.ndarray, bhn: np.ndarray | None) -> np.ndarray:
        a = state @ Whh
        a += xp
        return np.tanh(a, out=a)

    def forward(
        self,
        xp: np.ndarray,
        state: np.ndarray,
        Whh: np.ndarray,
        bhn: np.ndarray | None,
        product: Product = together,
    ) -> tuple[np.ndarray, LayerCache]:
        T, H = xp.shape[0], xp.shape[3]
        h = hidden_buffer(state, xp, H)  # (T+1, B, H)
        for t in range(T):
            a = product(h[t], Whh, h[t + 1])  # (B, H)
            a += xp[t, 0]
            np.tanh(a, out=a)
        return h[T].copy(), LayerCache(h0=state, h=h)

    def backward_preacts(
        self, cache: LayerCache, dhs: np.ndarray, Whh: np.ndarray, product: Product = together
    ) -> tuple[np.ndarray, np.ndarray]:
        T = dhs.shape[0]
        hs = cache.hs
        da = np.empty_like(dhs)  # (T, B, H) dL/d(preact)
        WhhT = np.ascontiguousarray(Whh.T)
        dh = dhs[T - 1].copy()  # (B, H)
        for t in range(T - 1, -1, -1):
            if t < T - 1:
                product(da[t + 1], WhhT, dh)
                dh += dhs[t]
            # da = dh * (1 - h^2), on the step's (B, H) while it is in cache
            np.multiply(hs[t], hs[t], out=da[t])
            np.subtract(1.0, da[t], out=da[t])
            da[t] *= dh
        return da, da
