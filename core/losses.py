"""Output losses: softmax cross-entropy (the default) and the notebook's sigmoid + mean squared error.

Each takes logits (N, V) and integer targets (N,) and returns (loss, dlogits, nats),
where ``nats`` is the summed negative log-likelihood of the targets under the
model's next-character distribution, so bits/char is comparable across losses.
"""

from __future__ import annotations

import numpy as np
from nextchar.core.cells import sigmoid
from nextchar.core.config import LOSSES as LOSS_NAMES


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def probabilities(loss: str, logits: np.ndarray) -> np.ndarray:
    """The next-character distribution a loss implies: softmax, or normalised sigmoids."""
    if loss == "ce":
        return softmax(logits)
    y = sigmoid(logits)
    y /= y.sum(axis=-1, keepdims=True)
    return y


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray, float]:
    """Mean softmax cross-entropy per character; dlogits = (p - onehot) / N."""
    N = targets.shape[0]
    probs = softmax(logits)  # (N, V)
    rows = np.arange(N)
    nats = float(-np.log(np.maximum(probs[rows, targets], np.finfo(probs.dtype).tiny)).sum())
    probs[rows, targets] -= 1.0
    probs /= N
    return nats / N, probs, nats


def sigmoid_mse(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray, float]:
    """The notebook's loss, mean over all N*V outputs of (sigmoid(logits) - onehot)^2.

    The notebook's gradient dropped the sigmoid's derivative; this one keeps it.
    """
    N, V = logits.shape
    y = sigmoid(logits)
    rows = np.arange(N)
    p_target = y[rows, targets] / y.sum(axis=1)
    nats = float(-np.log(np.maximum(p_target, np.finfo(y.dtype).tiny)).sum())
    err = y.copy()
    err[rows, targets] -= 1.0
    loss = float(np.mean(np.square(err)))
    dlogits = err * y * (1.0 - y) * (2.0 / (N * V))
    return loss, dlogits.astype(logits.dtype, copy=False), nats


LOSSES = {"ce": cross_entropy, "sigmoid_mse": sigmoid_mse}
assert tuple(LOSSES) == LOSS_NAMES, "nextchar.core.config.LOSSES must name exactly the losses defined here"
