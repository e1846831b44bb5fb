"""Tuning a model's dynamic evaluation (nextchar.core.adapt) by measurement, at the end of training.

Two things depend on the model: the rms of each adapted weight's segment gradient
(the RMS-normalised rule divides by it) and the learning rate. The rms is measured
on the training text's end, as in the paper (the validation text works too, a
little worse), the rate on the whole validation text, which training never saw;
both are recorded in the model file (``AdaptConfig.to_dict``). The rate is the best
of a few: the best rate differs by text (issue 22: 0.002 in-domain, 0.005 on prose
for plain SGD), so it is measured, not assumed. Each rate costs one adapted pass
over the text (~10-25 s for the default model's 111,000 characters).

Every training run that produces a model tunes it so (``at_end_of_training``, called
by nextchar.core.train.train; the shipped default model is tuned by the same call),
at a bounded cost: the rate is measured on at most ``TUNE_CHARS`` validation
characters and the statistics on the training text's last ``STATS_CHARS``, so tuning
costs at most ``len(LRS)`` adapted passes over 120,000 characters plus one gradient
pass over 200,000, whatever the corpus (~1 minute for the default model's GRU-256 on
one core of an AMD EPYC, a few seconds for a small model). A validation text of fewer than
``MIN_WINDOWS`` whole windows (or a training text of less than one) is too short to
measure anything on: the run records the defaults (``AdaptConfig()``, plain SGD) and
says so in its summary. Tuning is a pure function of the weights and the texts, so a
seeded run stays bit-reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
from nextchar.core.evaluate import evaluate_indices
from nextchar.core.model import CharRNN

LRS = (1e-3, 1.2e-3, 1.5e-3, 2e-3, 3e-3)
STATS_CHARS = 200_000  # of the training text's end (the shipped model: 60,000 gave 0.002 bits/char more)
TUNE_CHARS = (
    120_000  # validation characters a training run measures its rates on: tinyshakespeare's 10% whole
)
FIRST = 1_000  # side_by_side's head: what a new session sees first (issue 22: already better than static)
MIN_WINDOWS = 5  # fewer whole windows of validation text than this: too few to tell rates apart

MeasuredFn = Callable[[AdaptConfig, float], None]


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
        _, grads, state, _ = adapt_batch.gradients(model, [()], state, window)
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


def side_by_side(
    model: CharRNN, config: AdaptConfig, idx: np.ndarray, first: int = FIRST
) -> dict[str, float]:
    """Static and adapted bits/char from a fresh session over idx's whole windows (the characters both
    score: a tail shorter than a window is left out), and over the first ``first`` characters of them
    (rounded down to whole windows; absent when idx holds no more). bench/adapt_bench.py reports
    these (``nextchar eval --adapt`` measures the same on a server, through two sessions)."""
    segment = config.segment
    windows = max(len(idx) - 1, 0) // segment
    if windows == 0:
        raise ValueError(f"adapted scoring needs more than {segment} characters (one window and its target)")
    nats = score(model, rule(model, config), fresh(model), idx[: windows * segment + 1])[1]
    out = {
        "chars": float(windows * segment),
        "static_bpc": evaluate_indices(model, idx[: windows * segment + 1])["bits_per_char"],
        "adapted_bpc": float(nats.sum() / (windows * segment) / np.log(2)),
    }
    head = first // segment
    if 0 < head < windows:
        out["first_chars"] = float(head * segment)
        out["first_static_bpc"] = evaluate_indices(model, idx[: head * segment + 1])["bits_per_char"]
        out["first_adapted_bpc"] = float(nats[:head].sum() / (head * segment) / np.log(2))
    return out


def tune(
    model: CharRNN,
    text: str,
    stats_text: str | None = None,
    lrs: tuple[float, ...] = LRS,
    chars: int | None = None,
    on_measured: MeasuredFn | None = None,
) -> AdaptConfig:
    """The AdaptConfig for model: the rate that adapts best on text (its first chars, if given), with the
    gradient statistics of stats_text's last STATS_CHARS characters (else text's first). on_measured
    hears each config tried and its bits/char (the first of equals wins).

    A trainer passes its training text as stats_text, as the paper measures the statistics on
    training data: on the shipped model, statistics from the training text's last 60,000
    characters took the validation text to 2.153 bits/char (rate 0.001), from the validation
    text itself 2.158 (rate 0.0015; bench/results/adapt-*.json); from its last 200,000 (or all
    of it), 2.1501 (rate 0.0012). The floor stays adapt.FLOOR: 0.1 measured 2.1491 in-domain but
    3.45 bits/char instead of 2.99 on this repository's code (0.15: 2.1495 and 3.10)."""
    idx = model.vocab.encode(text)[:chars]
    source = idx[:STATS_CHARS] if stats_text is None else model.vocab.encode(stats_text[-STATS_CHARS:])
    stats = gradient_stats(model, source)
    best, best_bpc = None, math.inf
    for lr in lrs:
        config = AdaptConfig(lr=lr, stats=stats)
        bpc = bits_per_char(model, config, idx)
        if on_measured is not None:
            on_measured(config, bpc)
        if bpc < best_bpc or best is None:
            best, best_bpc = config, bpc
    if best is None:
        raise ValueError("tune needs one rate at least")
    return best


@dataclass(frozen=True)
class Tuned:
    """What a training run records: the config (``ModelFile.adapt``) and how it was chosen (its summary's
    ``adapt``: the characters measured on, 0 when too few, and static vs adapted bits/char there)."""

    config: AdaptConfig
    note: dict[str, Any]


def at_end_of_training(
    model: CharRNN,
    train_text: str,
    val_text: str,
    on_start: Callable[[], None] | None = None,
    on_measured: MeasuredFn | None = None,
) -> Tuned:
    """Tune model's adaptation as every training run does at its end: the rate on val_text's first
    TUNE_CHARS characters, the statistics on train_text's last STATS_CHARS; the defaults when either
    is too short (module docstring). on_start is called when tuning starts (not when it is skipped),
    on_measured after each config measured."""
    val = min(len(val_text), TUNE_CHARS)
    windows = max(val - 1, 0) // SEGMENT
    if windows < MIN_WINDOWS or len(train_text) <= SEGMENT:
        why = (
            f"validation text of {len(val_text)} characters: fewer than {MIN_WINDOWS} windows of {SEGMENT}"
            if windows < MIN_WINDOWS
            else f"training text of {len(train_text)} characters: not one window of {SEGMENT}"
        )
        defaults = AdaptConfig()
        return Tuned(defaults, {"chars": 0, "lr": defaults.lr, "untuned": why})
    if on_start is not None:
        on_start()
    text = val_text[: windows * SEGMENT + 1]  # whole windows: adapted and static score the same characters
    measured: list[tuple[AdaptConfig, float]] = []

    def heard(config: AdaptConfig, bpc: float) -> None:
        measured.append((config, bpc))
        if on_measured is not None:
            on_measured(config, bpc)

    config = tune(model, text, stats_text=train_text, on_measured=heard)
    return Tuned(
        config,
        {
            "chars": windows * SEGMENT,
            "lr": config.lr,
            "static_bpc": evaluate_indices(model, model.vocab.encode(text))["bits_per_char"],
            "adapted_bpc": next(bpc for tried, bpc in measured if tried is config),
        },
    )
