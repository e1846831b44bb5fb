"""The GRU, PyTorch's formulation: gates (r, z, n), with the reset gate applied to (h Whh_n + bhn)."""

from __future__ import annotations

import numpy as np
from nextchar.core.cells.base import Cell, LayerCache, sigmoid


class GRU(Cell):
    name = "gru"
    gates = 3
    has_bhn = True

    def step(self, xp: np.ndarray, state: np.ndarray, Whh: np.ndarray, bhn: np.ndarray | None) -> np.ndarray:
        H = Whh.shape[0]
        h = state
        gh = h @ Whh  # (N, 3H)
        rz = sigmoid(xp[:, : 2 * H] + gh[:, : 2 * H])
        r, z = rz[:, :H], rz[:, H:]
        ghn = gh[:, 2 * H :]
        if bhn is not None:
            ghn += bhn
        n = np.tanh(xp[:, 2 * H :] + r * ghn)
        return n + z * (h - n)

    def forward(
        self, xp: np.ndarray, state: np.ndarray, Whh: np.ndarray, bhn: np.ndarray | None
    ) -> tuple[np.ndarray, LayerCache]:
        assert bhn is not None
        T, B, G = xp.shape
        H = G // 3
        hs = np.empty((T, B, H), dtype=xp.dtype)
        rz = np.empty((T, B, 2 * H), dtype=xp.dtype)
        n = np.empty((T, B, H), dtype=xp.dtype)
        ghn = np.empty((T, B, H), dtype=xp.dtype)
        gh = np.empty((B, G), dtype=xp.dtype)
        h = state
        for t in range(T):
            np.matmul(h, Whh, out=gh)
            np.add(xp[t, :, : 2 * H], gh[:, : 2 * H], out=rz[t])
            sigmoid(rz[t], out=rz[t])
            np.add(gh[:, 2 * H :], bhn, out=ghn[t])
            np.multiply(rz[t, :, :H], ghn[t], out=n[t])
            n[t] += xp[t, :, 2 * H :]
            np.tanh(n[t], out=n[t])
            # h' = n + z * (h - n)
            np.subtract(h, n[t], out=hs[t])
            hs[t] *= rz[t, :, H:]
            hs[t] += n[t]
            h = hs[t]
        return h.copy(), LayerCache(h0=state, hs=hs, gates={"rz": rz, "n": n, "ghn": ghn})

    def backward_preacts(
        self, cache: LayerCache, dhs: np.ndarray, Whh: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        T, B, H = cache.hs.shape
        rz, n, ghn = cache.gates["rz"], cache.gates["n"], cache.gates["ghn"]
        r, z = rz[:, :, :H], rz[:, :, H:]
        # Everything that does not depend on dh is computed for all T at once, outside the loop.
        k_n = (1.0 - z) * (1.0 - np.square(n))  # dL/d(n preact) = dh * k_n
        k_r = ghn * r * (1.0 - r)  # dL/d(r preact) = dn_pre * k_r
        k_z = (cache.previous_h() - n) * z * (1.0 - z)  # dL/d(z preact) = dh * k_z
        dxp = np.empty((T, B, 3 * H), dtype=dhs.dtype)
        dgh = np.empty((T, B, 3 * H), dtype=dhs.dtype)
        WhhT = np.ascontiguousarray(Whh.T)
        dh = np.zeros((B, H), dtype=dhs.dtype)
        back = np.empty((B, H), dtype=dhs.dtype)
        for t in range(T - 1, -1, -1):
            dh += dhs[t]
            dan = np.multiply(dh, k_n[t], out=dxp[t, :, 2 * H :])
            np.multiply(dan, r[t], out=dgh[t, :, 2 * H :])
            np.multiply(dan, k_r[t], out=dxp[t, :, :H])
            np.multiply(dh, k_z[t], out=dxp[t, :, H : 2 * H])
            dgh[t, :, : 2 * H] = dxp[t, :, : 2 * H]
            np.matmul(dgh[t], WhhT, out=back)
            dh *= z[t]
            dh += back
        return dxp, dgh
