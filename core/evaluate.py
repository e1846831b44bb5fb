"""Score a model on a text the way a session sees it: one hidden state carried through every character."""

from __future__ import annotations

import math

import numpy as np
from nextchar.core import losses
from nextchar.core.model import CharRNN

CHUNK = 2048  # characters per forward call: long enough to batch the read-out, short enough for memory


def evaluate(model: CharRNN, text: str) -> dict[str, float]:
    """bits/char, nats/char, the model's own loss and top-1 accuracy of predicting each next character."""
    return evaluate_indices(model, model.vocab.encode(text))


def evaluate_indices(model: CharRNN, idx: np.ndarray) -> dict[str, float]:
    if len(idx) < 2:
        raise ValueError("evaluation needs at least two characters")
    state = model.initial_state(1)
    loss_sum = nats = 0.0
    correct = 0
    n = len(idx) - 1
    for s in range(0, n, CHUNK):
        x = idx[s : min(s + CHUNK, n)].reshape(-1, 1)
        y = idx[s + 1 : min(s + CHUNK, n) + 1]
        _, logits, state = model.forward(x, state)
        correct += int((logits.argmax(axis=1) == y).sum())
        loss, _, chunk_nats = losses.LOSSES[model.config.loss](logits, y)
        loss_sum += loss * len(y)
        nats += chunk_nats
    return {
        "chars": float(n),
        "loss": loss_sum / n,
        "nats_per_char": nats / n,
        "bits_per_char": nats / n / math.log(2),
        "accuracy": correct / n,
    }
