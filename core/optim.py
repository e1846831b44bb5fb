"""Optimizers and gradient clipping, updating parameters in place.

Plain functions over the parameter dict plus a small state object per optimizer,
so a training step reads as: clip(grads); optimizer.update(params, grads, lr) with
lr = learning_rate(config, step, progress).
"""

from __future__ import annotations

import math

import numpy as np
from nextchar.core.config import OPTIMIZERS, TrainConfig

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


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """The learning rate of optimizer step ``step`` (1-based), ``progress`` (0..1) through the budget.

    Linear warm-up over the first ``warmup_steps`` steps (Adam's first updates are
    its largest relative to what it knows, so a large lr starts gently), then either
    the constant lr or a half cosine from lr down to ``min_lr * lr`` at the end of the
    character budget. The cosine follows characters, not the clock, so a run is the
    same with or without ``max_seconds`` until the clock stops it (its lr then has not
    reached min_lr yet: give max_chars as the budget it should decay over).
    """
    lr = config.lr
    if step <= config.warmup_steps:
        return lr * step / config.warmup_steps
    if config.schedule == "cosine":
        floor = config.min_lr * lr
        return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return lr


class Optimizer:
    """SGD, Adagrad or Adam (with bias correction), each with optional decoupled weight decay.

    Weight decay is AdamW's (Loshchilov & Hutter): the weights shrink by lr * decay
    each step apart from the gradient step, so it is not an L2 term in the loss that
    Adam's per-weight scaling would weaken where gradients are large. It applies to
    the weight matrices (2-D), never to biases; the same rule holds for sgd and
    adagrad. Moment buffers are allocated once.
    """

    def __init__(self, kind: str, lr: float, params: Params, weight_decay: float = 0.0) -> None:
        if kind not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")
        self.kind, self.lr, self.t = kind, lr, 0
        self.weight_decay = weight_decay
        self.beta1, self.beta2, self.eps = 0.9, 0.999, 1e-8
        self.m = {k: np.zeros_like(v) for k, v in params.items()} if kind != "sgd" else {}
        self.v = {k: np.zeros_like(v) for k, v in params.items()} if kind == "adam" else {}

    def update(self, params: Params, grads: Params, lr: float | None = None) -> None:
        """One step at learning rate lr (the optimizer's own when None)."""
        lr = self.lr if lr is None else lr
        self.t += 1
        if self.weight_decay:
            shrink = 1.0 - lr * self.weight_decay
            for p in params.values():
                if p.ndim == 2:
                    p *= shrink
        if self.kind == "sgd":
            for k, p in params.items():
                p -= lr * grads[k]
        elif self.kind == "adagrad":
            for k, p in params.items():
                g, mem = grads[k], self.m[k]
                mem += g * g
                p -= lr * g / (np.sqrt(mem) + self.eps)
        else:
            # PyTorch's exact formula (eps added after bias correction), so runs compare step for step.
            b1, b2 = self.beta1, self.beta2
            step = lr / (1 - b1**self.t)
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
