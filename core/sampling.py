"""Sampling the next character: temperature, top-k and nucleus (top-p), all seedable.

Temperature rescales log-probabilities (p ** (1/T), renormalised), so it works the
same for softmax and sigmoid models without needing their logits.
"""

from __future__ import annotations

import numpy as np
from nextchar.core.model import CharRNN
from nextchar.core.vocab import UNK


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not (0 < temperature <= 100 and np.isfinite(temperature)):
        raise ValueError(f"temperature must be in (0, 100], got {temperature!r}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def sample(
    probs: np.ndarray,
    rng: np.random.Generator,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> int:
    """Draw one index from probs (V,); the unknown slot is never drawn."""
    p = np.asarray(probs, dtype=np.float64).copy()
    p[UNK] = 0.0
    if temperature != 1.0:
        with np.errstate(divide="ignore"):
            logp = np.log(p) / temperature
        p = np.exp(logp - logp.max())
    order = np.argsort(-p, kind="stable")
    keep = len(p) if top_k <= 0 else min(top_k, len(p))
    if top_p < 1.0:
        cumulative = np.cumsum(p[order]) / p.sum()
        keep = min(keep, int(np.searchsorted(cumulative, top_p)) + 1)
    kept = order[:keep]
    weights = p[kept] / p[kept].sum()
    return int(kept[rng.choice(keep, p=weights)])


def generate(
    model: CharRNN,
    state: np.ndarray,
    probs: np.ndarray,
    length: int,
    rng: np.random.Generator,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[str, np.ndarray, np.ndarray]:
    """Sample length characters, feeding each back in; returns (text, state after it, probs after it).

    probs is the distribution after the last character the state consumed.
    """
    check_sampling(temperature, top_k, top_p)
    out: list[int] = []
    state = state[None, :]
    for _ in range(length):
        idx = sample(probs, rng, temperature, top_k, top_p)
        out.append(idx)
        state, batch_probs = model.step(state, np.array([idx]))
        probs = batch_probs[0]
    return model.vocab.decode(out), state[0], probs
