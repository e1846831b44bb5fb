"""Recurrent cells (tanh RNN, GRU, LSTM): one time step, a T-step forward with its cache, and BPTT.

Conventions: batch-major rows, h is (B, H); the input projection ``xp`` of every step
is computed by the caller for the whole (T, B) chunk at once (a gather for one-hot
inputs, one matrix product otherwise), so only the recurrent product h @ Whh stays
inside the time loop. Gates are fused along the last axis: GRU (r, z, n), LSTM
(i, f, g, o), the PyTorch order, so weights and results compare directly.

A cell's state is one array per sample: h for rnn/gru, [h, c] for lstm (2H wide).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Cell = Literal["rnn", "gru", "lstm"]
GATES: dict[str, int] = {"rnn": 1, "gru": 3, "lstm": 4}
STATE_WIDTH: dict[str, int] = {"rnn": 1, "gru": 1, "lstm": 2}


def sigmoid(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Logistic function via tanh: exact, and never overflows exp for large |x|."""
    out = np.multiply(x, 0.5, out=out)
    np.tanh(out, out=out)
    out += 1.0
    out *= 0.5
    return out


@dataclass
class LayerCache:
    """What BPTT needs from the forward pass of one layer over one chunk."""

    h0: np.ndarray  # (B, H) state entering the chunk
    hs: np.ndarray  # (T, B, H) hidden outputs
    gates: dict[str, np.ndarray] = field(default_factory=dict)  # (T, B, ...) per-cell activations


# ---------------------------------------------------------------- one step (inference)


def step(cell: str, xp: np.ndarray, state: np.ndarray, Whh: np.ndarray, bhn: np.ndarray | None) -> np.ndarray:
    """Advance a batch of states (N, W*H) by one input projection xp (N, G*H); returns the new state."""
    H = Whh.shape[0]
    if cell == "rnn":
        a = state @ Whh
        a += xp
        return np.tanh(a, out=a)
    if cell == "gru":
        h = state
        gh = h @ Whh  # (N, 3H)
        rz = sigmoid(xp[:, : 2 * H] + gh[:, : 2 * H])
        r, z = rz[:, :H], rz[:, H:]
        ghn = gh[:, 2 * H :]
        if bhn is not None:
            ghn += bhn
        n = np.tanh(xp[:, 2 * H :] + r * ghn)
        return n + z * (h - n)
    h, c = state[:, :H], state[:, H:]
    a = h @ Whh
    a += xp
    i, f, o = sigmoid(a[:, :H]), sigmoid(a[:, H : 2 * H]), sigmoid(a[:, 3 * H :])
    g = np.tanh(a[:, 2 * H : 3 * H])
    c_new = f * c + i * g
    return np.concatenate([o * np.tanh(c_new), c_new], axis=1)


# ---------------------------------------------------------------- T steps with cache (training)


def forward(
    cell: str, xp: np.ndarray, state: np.ndarray, Whh: np.ndarray, bhn: np.ndarray | None
) -> tuple[np.ndarray, LayerCache]:
    """Run T steps from state (B, W*H) on xp (T, B, G*H); returns (final state, cache)."""
    if cell == "rnn":
        return _rnn_forward(xp, state, Whh)
    if cell == "gru":
        assert bhn is not None
        return _gru_forward(xp, state, Whh, bhn)
    return _lstm_forward(xp, state, Whh)


def _rnn_forward(xp: np.ndarray, h0: np.ndarray, Whh: np.ndarray) -> tuple[np.ndarray, LayerCache]:
    T, B, H = xp.shape
    hs = np.empty((T, B, H), dtype=xp.dtype)
    h = h0
    for t in range(T):
        a = np.matmul(h, Whh, out=hs[t])
        a += xp[t]
        h = np.tanh(a, out=a)
    return h.copy(), LayerCache(h0=h0, hs=hs)


def _gru_forward(
    xp: np.ndarray, h0: np.ndarray, Whh: np.ndarray, bhn: np.ndarray
) -> tuple[np.ndarray, LayerCache]:
    T, B, G = xp.shape
    H = G // 3
    hs = np.empty((T, B, H), dtype=xp.dtype)
    rz = np.empty((T, B, 2 * H), dtype=xp.dtype)
    n = np.empty((T, B, H), dtype=xp.dtype)
    ghn = np.empty((T, B, H), dtype=xp.dtype)
    gh = np.empty((B, G), dtype=xp.dtype)
    h = h0
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
    return h.copy(), LayerCache(h0=h0, hs=hs, gates={"rz": rz, "n": n, "ghn": ghn})


def _lstm_forward(xp: np.ndarray, state: np.ndarray, Whh: np.ndarray) -> tuple[np.ndarray, LayerCache]:
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


# ---------------------------------------------------------------- BPTT


def backward(
    cell: str, cache: LayerCache, dhs: np.ndarray, Whh: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Gradients of one layer given dL/dh_t (T, B, H) from above.

    Returns (dxp (T, B, G*H), dWhh, dbhn or None). Truncated BPTT: no gradient flows
    into the state that entered the chunk.
    """
    if cell == "rnn":
        dxp, dgh = _rnn_backward(cache, dhs, Whh), None
    elif cell == "gru":
        dxp, dgh = _gru_backward(cache, dhs, Whh)
    else:
        dxp, dgh = _lstm_backward(cache, dhs, Whh), None
    T, B, H = cache.hs.shape
    hprev = _previous_h(cache)  # (T, B, H)
    drec = dxp if dgh is None else dgh
    dWhh = hprev.reshape(T * B, H).T @ drec.reshape(T * B, -1)
    dbhn = None if dgh is None else dgh[:, :, 2 * H :].sum(axis=(0, 1))
    return dxp, dWhh, dbhn


def _previous_h(cache: LayerCache) -> np.ndarray:
    H = cache.hs.shape[2]
    return np.concatenate([cache.h0[None, :, :H], cache.hs[:-1]], axis=0)


def _rnn_backward(cache: LayerCache, dhs: np.ndarray, Whh: np.ndarray) -> np.ndarray:
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
    return da


def _gru_backward(cache: LayerCache, dhs: np.ndarray, Whh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    T, B, H = cache.hs.shape
    rz, n, ghn = cache.gates["rz"], cache.gates["n"], cache.gates["ghn"]
    r, z = rz[:, :, :H], rz[:, :, H:]
    # Everything that does not depend on dh is computed for all T at once, outside the loop.
    k_n = (1.0 - z) * (1.0 - np.square(n))  # dL/d(n preact) = dh * k_n
    k_r = ghn * r * (1.0 - r)  # dL/d(r preact) = dn_pre * k_r
    k_z = (_previous_h(cache) - n) * z * (1.0 - z)  # dL/d(z preact) = dh * k_z
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


def _lstm_backward(cache: LayerCache, dhs: np.ndarray, Whh: np.ndarray) -> np.ndarray:
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
    return da
