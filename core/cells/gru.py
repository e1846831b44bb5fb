"""The GRU, PyTorch's formulation: gates (r, z, n), with the reset gate applied to (h Whh_n + bhn)."""

from __future__ import annotations

import numpy as np
from nextchar.core.cells.base import Cell, LayerCache, Product, gate_blocks, hidden_buffer, sigmoid, together


class GRU(Cell):
    name = "gru"
    gates = 3
    has_bhn = True
    candidate = 2  # n

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
        self,
        xp: np.ndarray,
        state: np.ndarray,
        Whh: np.ndarray,
        bhn: np.ndarray | None,
        product: Product = together,
    ) -> tuple[np.ndarray, LayerCache]:
        """T steps, each step's gates gate-major, (3, B, H), so every gate is one contiguous block
        (as in lstm.py). What the backward needs is computed here, per step, while it is in
        cache: the gates r, z (T, 2, B, H); k_rz (T, 2, B, H), which turns dn_pre (r) or dh (z)
        into the gate's pre-activation gradient; k_n (T, B, H), which turns dh into dn_pre."""
        assert bhn is not None
        T, _, B, H = xp.shape
        Whh3 = gate_blocks(Whh, 3)  # (3, H, H)
        h = hidden_buffer(state, xp, H)  # (T+1, B, H)
        rz = np.empty((T, 2, B, H), dtype=xp.dtype)
        k_rz = np.empty((T, 2, B, H), dtype=xp.dtype)
        k_n = np.empty((T, B, H), dtype=xp.dtype)
        gh = np.empty((3, B, H), dtype=xp.dtype)  # h @ Whh, gate-major
        ghn = gh[2]
        n = np.empty((B, H), dtype=xp.dtype)
        diff = np.empty((B, H), dtype=xp.dtype)
        for t in range(T):
            product(h[t], Whh3, gh)
            a = np.add(xp[t, :2], gh[:2], out=rz[t])  # (2, B, H)
            a *= 0.5  # sigmoid(x) = 0.5 * tanh(0.5 * x) + 0.5, as base.sigmoid
            np.tanh(a, out=a)
            a *= 0.5
            np.multiply(a, a, out=k_rz[t])  # sigmoid' = 0.25 - (0.5 * tanh(0.5 * x))^2
            np.subtract(0.25, k_rz[t], out=k_rz[t])
            a += 0.5
            r, z = a
            ghn += bhn
            np.multiply(r, ghn, out=n)  # n = tanh(xp_n + r * (h Whh_n + bhn))
            n += xp[t, 2]
            np.tanh(n, out=n)
            np.subtract(h[t], n, out=diff)  # h' = n + z * (h - n)
            np.multiply(z, diff, out=h[t + 1])
            h[t + 1] += n
            k_rz[t, 0] *= ghn  # d n_pre / d a_r
            k_rz[t, 1] *= diff  # d h' / d a_z
            np.multiply(n, n, out=k_n[t])  # d h' / d n_pre = (1 - z) * (1 - n^2)
            np.subtract(1.0, k_n[t], out=k_n[t])
            np.subtract(1.0, z, out=diff)
            k_n[t] *= diff
        return h[T].copy(), LayerCache(h0=state, h=h, gates={"rz": rz, "k_rz": k_rz, "k_n": k_n})

    def backward_preacts(
        self, cache: LayerCache, dhs: np.ndarray, Whh: np.ndarray, product: Product = together
    ) -> tuple[np.ndarray, np.ndarray]:
        T, B, H = cache.hs.shape
        rz, k_rz, k_n = cache.gates["rz"], cache.gates["k_rz"], cache.gates["k_n"]
        dxp = np.empty((T, B, 3 * H), dtype=dhs.dtype)  # PyTorch's row layout, as xp
        dgh = np.empty((T, B, 3 * H), dtype=dhs.dtype)  # dL/d(h @ Whh): dxp, but dn_pre * r for n
        # gate-major views of both (written into): dxp's are dr_pre, dz_pre, dn_pre
        dxp3 = dxp.reshape(T, B, 3, H).transpose(0, 2, 1, 3)
        dgh3 = dgh.reshape(T, B, 3, H).transpose(0, 2, 1, 3)
        WhhT = np.ascontiguousarray(Whh.T)
        dh = np.zeros((B, H), dtype=dhs.dtype)
        back = np.empty((B, H), dtype=dhs.dtype)
        for t in range(T - 1, -1, -1):
            dh += dhs[t]
            d = dxp3[t]
            np.multiply(dh, k_n[t], out=d[2])
            np.multiply(d[2], k_rz[t, 0], out=d[0])
            np.multiply(dh, k_rz[t, 1], out=d[1])
            np.copyto(dgh3[t, :2], d[:2])
            np.multiply(d[2], rz[t, 0], out=dgh3[t, 2])
            product(dgh[t], WhhT, back)
            dh *= rz[t, 1]
            dh += back
        return dxp, dgh
