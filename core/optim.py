"""Optimizers and gradient clipping, updating parameters in place.

Plain functions over the parameter dict plus a small state object per optimizer,
so a training step reads as: clip(grads); optimizer.update(params, grads).
"""

from __future__ import annotations

import numpy as np
from nextchar.core.config import OPTIMIZERS

Params = dict[str, np.ndarray]


def clip_grads(grads: Params, mode: str, limit: float) -> float:
    """Clip in place and return the global norm before clipping (worth logging either way).

    "value" is the notebook's elementwise clip to [-limit, limit]; "norm" rescales all
    gradients together when their global L2 norm exceeds limit (PyTorch's clip_grad_norm_).
    """
    norm = float(np.sqrt(sum(float(np.vdot(g, g)) for g in grads.values())))
    if mode == "value":
        for g in grads.values():
            np.clip(g, -limit, limit, out=g)
    elif mode == "norm" and norm > limit:
        scale = limit / (norm + 1e-6)
        for g in grads.values():
            g *= scale
    return norm


class Optimizer:
    """SGD, Adagrad or Adam (with bias correction); moment buffers are allocated once."""

    def __init__(self, kind: str, lr: float, params: Params) -> None:
        if kind not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")
        self.kind, self.lr, self.t = kind, lr, 0
        self.beta1, self.beta2, self.eps = 0.9, 0.999, 1e-8
        self.m = {k: np.zeros_like(v) for k, v in params.items()} if kind != "sgd" else {}
        self.v = {k: np.zeros_like(v) for k, v in params.items()} if kind == "adam" else {}

    def update(self, params: Params, grads: Params) -> None:
        self.t += 1
        if self.kind == "sgd":
            for k, p in params.items():
                p -= self.lr * grads[k]
        elif self.kind == "adagrad":
            for k, p in params.items():
                g, mem = grads[k], self.m[k]
                mem += g * g
                p -= self.lr * g / (np.sqrt(mem) + self.eps)
        else:
            # PyTorch's exact formula (eps added after bias correction), so runs compare step for step.
            b1, b2 = self.beta1, self.beta2
            step = self.lr / (1 - b1**self.t)
            root_bc2 = np.sqrt(1 - b2**self.t)
            for k, p in params.items():
                g, m, v = grads[k], self.m[k], self.v[k]
                m *= b1
                m += (1 - b1) * g
                v *= b2
                v += (1 - b2) * (g * g)
                denom = np.sqrt(v)
                denom /= root_bc2
                denom += self.eps
                p -= step * m / denom
