"""Tuning a model's dynamic evaluation (nextchar.core.adapt) by measurement, at the end of training.

Two things depend on the model: the rms of each adapted weight's segment gradient
(the RMS-normalised rule divides by it) and the learning rate. The rms is measured
on the training text's end, as in the paper (the validation text works too, a
little worse), the rate on the whole validation text, which training never saw;
both are recorded in the model file (``AdaptConfig.to_dict``). The rate is the best
of a few: the best rate differs by text (issue 22: 0.002 in-domain, 0.005 on prose
for plain SGD), so it is measured, not assumed. Each rate costs one adapted pass
over the text (~10-25 s for the default model's 111,000 characters).
"""

from __future__ import annotations

import numpy as np
from nextchar.core import adapt_batch
from nextchar.core.adapt import (
    SEGMENT,
    AdaptConfig,
    Stats,
    adapted_names,
    fresh,
    packed,
    rule,
    score,
)
from nextchar.core.model import CharRNN

LRS = (1e-3, 1.5e-3, 2e-3, 3e-3)
STATS_CHARS = 60_000


def gradient_stats(model: CharRNN, idx: np.ndarray, segment: int = SEGMENT) -> Stats:
    """The root-mean-square of each adapted weight's segment gradient under the shared weights,
    one session's state carried through idx (packed for the model file)."""
    state = model.initial_state(1)
    sums: list[np.ndarray] = []
    windows = max(len(idx) - 1, 0) // segment
    if windows == 0:
        raise ValueError(f"gradient statistics need more than {segment} characters")
    for i in range(windows):
        window = idx[None, i * segment : (i + 1) * segment + 1]
        _, grads, state = adapt_batch.gradients(model, [()], state, window)
        squares = [np.square(g[0], dtype=np.float64) for g in grads]
        sums = squares if not sums else [s + q for s, q in zip(sums, squares, strict=True)]
    stats: Stats = {}
    for name, total in zip(adapted_names(model), sums, strict=True):
        stats[name] = packed(np.sqrt(total / windows))
    return stats


def bits_per_char(model: CharRNN, config: AdaptConfig, idx: np.ndarray) -> float:
    """Adapted bits/char over idx's completed windows, from a fresh session."""
    nats = score(model, rule(model, config), fresh(model), idx)[1]
    return float(nats.sum() / (len(nats) * config.segment) / np.log(2))


def tune(
    model: CharRNN,
    text: str,
    stats_text: str | None = None,
    lrs: tuple[float, ...] = LRS,
    chars: int | None = None,
) -> AdaptConfig:
    """The AdaptConfig for model: the rate that adapts best on text (its first chars, if given), with the gradient
    statistics of stats_text's last STATS_CHARS characters (else text's first).

    A trainer passes its training text as stats_text, as the paper measures the statistics on
    training data: on the shipped model, statistics from the training text's end took the
    validation text to 2.153 bits/char (rate 0.001), from the validation text itself 2.158
    (rate 0.0015; bench/results/adapt-*.json)."""
    idx = model.vocab.encode(text)
    source = idx[:STATS_CHARS] if stats_text is None else model.vocab.encode(stats_text[-STATS_CHARS:])
    stats = gradient_stats(model, source)
    return min(
        (AdaptConfig(lr=lr, stats=stats) for lr in lrs),
        key=lambda config: bits_per_char(model, config, idx[:chars]),
    )
