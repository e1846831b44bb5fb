"""The LSTM, PyTorch's formulation: gates (i, f, g, o), state [h, c]."""

from __future__ import annotations

import numpy as np
from nextchar.core.cells.base import Cell, LayerCache, sigmoid


class LSTM(Cell):
    name = "lstm"
    gates = 4
    state_width = 2

    def step(self, xp: np.ndarray, state: np.ndarray, Whh: np.ndarray, bhn: np.ndarray | None) -> np.ndarray:
        H = Whh.shape[0]
        h, c = state[:, :H], state[:, H:]
        a = h @ Whh
        a += xp
        i, f, o = sigmoid(a[:, :H]), sigmoid(a[:, H : 2 * H]), sigmoid(a[:, 3 * H :])
        g = np.tanh(a[:, 2 * H : 3 * H])
        c_new = f * c + i * g
        return np.concatenate([o * np.tanh(c_new), c_new], axis=1)

    def forward(
        self, xp: np.ndarray, state: np.ndarray, Whh: np.ndarray, bhn: np.ndarray | None
    ) -> tuple[np.ndarray, LayerCache]:
        T, B, G = xp.shape
        H = G // 4
        hs = np.empty((T, B, H), dtype=xp.dtype)
        act = np.empty((T, B, G), dtype=xp.dtype)  # i, f, g, o after their nonlinearities
        cs = np.empty((T, B, H), dtype=xp.dtype)
        tcs = np.empty((T, B, H), dtype=xp.dtype)
        h, c = state[:, :H], state[:, H:]
        for t in range(T):
            a = np.matmul(h, Whh, out=act[t])
            a += xp[t]
            sigmoid(a[:, : 2 * H], out=a[:, : 2 * H])
            np.tanh(a[:, 2 * H : 3 * H], out=a[:, 2 * H : 3 * H])
            sigmoid(a[:, 3 * H :], out=a[:, 3 * H :])
            np.multiply(a[:, H : 2 * H], c, out=cs[t])
            cs[t] += a[:, :H] * a[:, 2 * H : 3 * H]
            c = cs[t]
            np.tanh(c, out=tcs[t])
            h = np.multiply(a[:, 3 * H :], tcs[t], out=hs[t])
        final = np.concatenate([h, c], axis=1)
        return final, LayerCache(h0=state, hs=hs, gates={"act": act, "cs": cs, "tcs": tcs})

    def backward_preacts(
        self, cache: LayerCache, dhs: np.ndarray, Whh: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        T, B, H = cache.hs.shape
        act, cs, tcs = cache.gates["act"], cache.gates["cs"], cache.gates["tcs"]
        i, f, g, o = act[:, :, :H], act[:, :, H : 2 * H], act[:, :, 2 * H : 3 * H], act[:, :, 3 * H :]
        c_prev = np.concatenate([cache.h0[None, :, H:], cs[:-1]], axis=0)
        # Factors that do not depend on the incoming gradient, for all T at once.
        k_c = o * (1.0 - np.square(tcs))  # dc += dh * k_c
        k_ifg = np.empty((T, B, 3, H), dtype=dhs.dtype)  # da_{i,f,g} = dc * k_ifg
        k_ifg[:, :, 0] = g * i * (1.0 - i)
        k_ifg[:, :, 1] = c_prev * f * (1.0 - f)
        k_ifg[:, :, 2] = i * (1.0 - np.square(g))
        k_o = tcs * o * (1.0 - o)  # da_o = dh * k_o
        da = np.empty_like(act)
        da_ifg = da[:, :, : 3 * H].reshape(T, B, 3, H)
        WhhT = np.ascontiguousarray(Whh.T)
        dh = np.zeros((B, H), dtype=dhs.dtype)
        dc = np.zeros((B, H), dtype=dhs.dtype)
        tmp = np.empty((B, H), dtype=dhs.dtype)
        for t in range(T - 1, -1, -1):
            dh += dhs[t]
            np.multiply(dh, k_c[t], out=tmp)
            dc += tmp
            np.multiply(dc[:, None, :], k_ifg[t], out=da_ifg[t])
            np.multiply(dh, k_o[t], out=da[t, :, 3 * H :])
            dc *= f[t]
            np.matmul(da[t], WhhT, out=dh)
        return da, da
