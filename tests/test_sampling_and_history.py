from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nextchar.core.config import ModelConfig, Sampling
from nextchar.core.history import export_history
from nextchar.core.inference import feed, generate, initial_probs, sample
from nextchar.core.model import CharRNN
from nextchar.core.vocab import UNK, Vocab

PROBS = np.array([0.3, 0.4, 0.2, 0.1])  # index 0 is the unknown slot


def draws(n: int = 2000, **kwargs: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.array([sample(PROBS, rng, Sampling(**kwargs)) for _ in range(n)])  # type: ignore[arg-type]


def test_unknown_slot_is_never_sampled() -> None:
    assert UNK not in draws()


def test_top_k_and_top_p_restrict_the_support() -> None:
    assert set(draws(top_k=1)) == {1}
    assert set(draws(top_k=2)) == {1, 2}
    # Known mass 0.4, 0.2, 0.1 -> cumulative 0.57, 0.86, 1.0: the nucleus is the shortest prefix reaching p.
    assert set(draws(top_p=0.5)) == {1}
    assert set(draws(top_p=0.8)) == {1, 2}
    assert set(draws(top_p=0.9)) == {1, 2, 3}


def test_low_temperature_is_greedy_and_high_flattens() -> None:
    assert set(draws(temperature=0.01)) == {1}
    counts = np.bincount(draws(temperature=50.0), minlength=4)[1:] / 2000
    assert counts.max() - counts.min() < 0.1


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -0.1}, {"temperature": 101.0}, {"top_k": -1}, {"top_p": -0.1}, {"top_p": 1.5}],
)
def test_bad_sampling_parameters(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Sampling(**kwargs)


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"top_p": 0.0}, {"temperature": 0.0, "top_k": 3}])
def test_temperature_or_top_p_zero_is_greedy_and_draws_nothing(kwargs: dict[str, float]) -> None:
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    assert {sample(PROBS, rng, Sampling(**kwargs)) for _ in range(50)} == {1}  # type: ignore[arg-type]
    assert rng.bit_generator.state == before
    tie = np.array([0.5, 0.25, 0.25])  # the unknown slot's mass is never the answer; ties: lower index
    assert sample(tie, rng, Sampling(temperature=0.0)) == 1


def test_generation_is_seedable() -> None:
    model = CharRNN.create(ModelConfig(cell="gru", hidden=8), Vocab.from_text("abcdefg"), seed=1)
    primed = feed(model, model.initial_state(1)[0], initial_probs(model), model.vocab.encode("abc"))
    state, probs = primed.states[0], primed.last_probs[0]
    a = generate(model, state, probs, 40, np.random.default_rng(3))[0]
    b = generate(model, state, probs, 40, np.random.default_rng(3))[0]
    c = generate(model, state, probs, 40, np.random.default_rng(4))[0]
    assert a == b and len(a) == 40 and a != c
    assert set(a) <= set("abcdefg")


HISTORY = [
    {
        "kind": "step",
        "epoch": 1,
        "step": 10,
        "chars": 100,
        "train_loss": 2.0,
        "train_bpc": 2.9,
        "val_loss": None,
    },
    {
        "kind": "epoch",
        "epoch": 1,
        "step": 12,
        "chars": 120,
        "train_loss": 1.8,
        "train_bpc": 2.6,
        "val_loss": 1.9,
    },
]


def test_history_exports(tmp_path: Path) -> None:
    export_history(HISTORY, "csv", tmp_path / "h.csv")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "h.csv").read_text())))
    assert [r["kind"] for r in rows] == ["step", "epoch"]
    assert rows[0]["val_loss"] == "" and rows[1]["val_loss"] == "1.9"
    export_history(HISTORY, "json", tmp_path / "h.json")
    assert json.loads((tmp_path / "h.json").read_text())[1]["val_loss"] == 1.9
    export_history(HISTORY, "png", tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="format"):
        export_history(HISTORY, "xls", tmp_path / "h.xls")
