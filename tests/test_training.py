"""Training: the notebook done right, reproducibility, divergence, cancellation, early stopping, budgets."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from nextchar.core.config import ModelConfig, TrainConfig, check_text
from nextchar.core.demo import (
    NOTEBOOK_TEXT,
    notebook_configs,
    stateful_predictions,
    stateless_predictions,
)
from nextchar.core.evaluate import evaluate
from nextchar.core.model import CharRNN
from nextchar.core.optim import Optimizer, learning_rate
from nextchar.core.train import Trainer, TrainingCancelled, TrainingDiverged, train
from nextchar.core.vocab import Vocab


def test_notebook_text_is_predicted_with_one_carried_state() -> None:
    model_config, config = notebook_configs()
    model = train(NOTEBOOK_TEXT, model_config, config).model
    predicted = stateful_predictions(model, NOTEBOOK_TEXT)[:-1]
    actual = NOTEBOOK_TEXT[1:]
    start = len("hello w")
    assert predicted[start:] == actual[start:]
    # The notebook's stateless demo cannot: after "l" comes "l", "o" or "d".
    stateless = stateless_predictions(model, NOTEBOOK_TEXT)[:-1]
    assert stateless[start:] != actual[start:]


def test_notebook_recipe_with_correct_gradients_lowers_its_loss() -> None:
    """sigmoid + MSE, SGD lr 0.01, clip 5: the notebook's own setup, now with the true gradient."""
    model_config, config = notebook_configs(loss="sigmoid_mse", optimizer="sgd", epochs=30)
    history = train(NOTEBOOK_TEXT, model_config, config).history
    epochs = [r for r in history if r["kind"] == "epoch"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_same_seed_gives_bit_identical_weights(cell: str) -> None:
    text = "the quick brown fox jumps over the lazy dog. " * 20
    config = TrainConfig(seq_len=16, batch=4, epochs=2, val_fraction=0.1, seed=5)
    a = train(text, ModelConfig(cell=cell, hidden=16, layers=2), config).model
    b = train(text, ModelConfig(cell=cell, hidden=16, layers=2), config).model
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), name
    c = train(
        text,
        ModelConfig(cell=cell, hidden=16, layers=2),
        TrainConfig(**{**config.to_dict(), "seed": 6}),
    ).model
    assert not np.array_equal(a.params["Why"], c.params["Why"])


def test_divergence_stops_with_a_clear_error() -> None:
    """Weights at the edge of float32 overflow the logits to inf - inf = NaN on the first step."""
    model = CharRNN.create(ModelConfig(hidden=8), Vocab.from_text("abcd"))
    model.params["Why"][:] = 3e38
    config = TrainConfig(seq_len=8, batch=2, epochs=5, val_fraction=0)
    idx = model.vocab.encode("abcdabcd" * 10)
    with (
        np.errstate(over="ignore", invalid="ignore"),
        pytest.raises(TrainingDiverged, match="lower the learning rate"),
    ):
        Trainer(model, config, None, None).run(idx, idx[:0])


def test_a_loss_that_explodes_but_stays_finite_counts_as_divergence() -> None:
    text = "hello world, this is a test of divergence. " * 30
    config = TrainConfig(
        seq_len=32, batch=4, epochs=30, lr=10.0, optimizer="adam", clip="none", val_fraction=0
    )
    with pytest.raises(TrainingDiverged, match="first step"):
        train(text, ModelConfig(cell="rnn", hidden=64), config)


def test_cancel_hook_stops_the_run() -> None:
    calls = iter(range(1000))
    config = TrainConfig(seq_len=8, batch=2, epochs=100, val_fraction=0)
    with pytest.raises(TrainingCancelled):
        train("abcdefgh" * 40, ModelConfig(hidden=8), config, should_stop=lambda: next(calls) >= 3)


def test_progress_records_and_budget() -> None:
    records: list[dict[str, Any]] = []
    config = TrainConfig(seq_len=10, batch=4, epochs=50, log_every=5, max_chars=400, val_fraction=0.2)
    result = train("0123456789" * 30, ModelConfig(hidden=8), config, on_progress=records.append)
    assert records == result.history
    assert result.summary["train_chars"] >= 400
    assert result.summary["train_chars"] < 400 + 4 * 10
    kinds = {r["kind"] for r in records}
    assert kinds == {"step", "epoch"}
    for r in records:
        if r["kind"] == "epoch":
            assert r["val_bpc"] is not None and r["val_bpc"] > 0
        for key in (
            "epoch",
            "step",
            "chars",
            "train_loss",
            "train_bpc",
            "chars_per_sec",
            "elapsed",
            "eta_seconds",
        ):
            assert r[key] is not None


def test_early_stopping_keeps_the_best_validation_weights() -> None:
    text = "".join(
        np.random.default_rng(0).choice(list("abcdefgh"), 800)
    )  # noise: validation cannot improve long
    config = TrainConfig(seq_len=16, batch=4, epochs=200, lr=0.05, patience=2, val_fraction=0.2)
    result = train(text, ModelConfig(hidden=32), config)
    epochs = [r for r in result.history if r["kind"] == "epoch"]
    assert len(epochs) < 200
    best = min(r["val_bpc"] for r in epochs)
    assert result.summary["val_bpc"] == pytest.approx(best)
    val_text = text[len(text) - int(len(text) * 0.2) :]
    assert evaluate(result.model, val_text)["bits_per_char"] == pytest.approx(best, rel=1e-4)


def test_text_shorter_than_one_step_is_rejected_naming_the_sizes() -> None:
    with pytest.raises(ValueError, match="batch 4 x seq_len 64"):
        check_text("short text", TrainConfig(batch=4, seq_len=64))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.0},
        {"seq_len": 0},
        {"optimizer": "lbfgs"},
        {"clip": "max"},
        {"val_fraction": 0.9},
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"weight_decay": -1e-4},
        {"weight_decay": 1000.0},  # lr * weight_decay >= 1 would flip the weights' sign
        {"schedule": "linear"},
        {"warmup_steps": -1},
        {"min_lr": 1.5},
    ],
)
def test_bad_train_config_names_the_field(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        TrainConfig(**kwargs)  # type: ignore[arg-type]


def test_learns_real_text(shakespeare: str) -> None:
    """A small model beats the unigram entropy of Shakespeare (~4.6 bits/char) quickly."""
    config = TrainConfig(seq_len=32, batch=16, epochs=10, max_chars=150_000, val_fraction=0.1, log_every=50)
    result = train(shakespeare, ModelConfig(cell="gru", hidden=64), config)
    assert result.summary["val_bpc"] < 3.6


# ---------------------------------------------------------------- regularisation and schedule

REGULARISED = TrainConfig(
    seq_len=16,
    batch=4,
    epochs=2,
    val_fraction=0.1,
    seed=5,
    dropout=0.3,
    weight_decay=0.1,
    schedule="cosine",
    warmup_steps=5,
    min_lr=0.1,
)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_dropout_decay_and_schedule_train_bit_identically_with_a_seed(cell: str) -> None:
    text = "the quick brown fox jumps over the lazy dog. " * 20
    mc = ModelConfig(cell=cell, hidden=16, layers=2)
    a, b = train(text, mc, REGULARISED).model, train(text, mc, REGULARISED).model
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), name
    plain = train(text, mc, TrainConfig(**{**REGULARISED.to_dict(), "dropout": 0.0})).model
    assert not np.array_equal(a.params["Why"], plain.params["Why"])  # the masks did something


def test_dropout_is_for_training_only(shakespeare: str) -> None:
    """The validation score is the model's without masks: what evaluate (and a session) sees."""
    config = TrainConfig(seq_len=32, batch=8, epochs=1, max_chars=20_000, dropout=0.5, val_fraction=0.1)
    result = train(shakespeare[:30_000], ModelConfig(cell="gru", hidden=32, layers=2), config)
    val_text = shakespeare[:30_000][-3000:]
    assert evaluate(result.model, val_text)["bits_per_char"] == pytest.approx(result.summary["val_bpc"])


def test_weight_decay_is_decoupled_and_spares_the_biases() -> None:
    """AdamW: with a zero gradient Adam moves nothing, so only the decay acts, lr * decay per step."""
    rng = np.random.default_rng(0)
    params = {"W": rng.normal(size=(3, 4)), "b": rng.normal(size=4)}
    before = {k: v.copy() for k, v in params.items()}
    for kind in ("adam", "adagrad", "sgd"):
        opt = Optimizer(kind, 0.01, params, weight_decay=0.5)
        opt.update(params, {k: np.zeros_like(v) for k, v in params.items()}, lr=0.1)
        np.testing.assert_allclose(params["W"], before["W"] * (1 - 0.1 * 0.5))
        np.testing.assert_array_equal(params["b"], before["b"])
        params["W"][:] = before["W"]


def test_learning_rate_warms_up_then_follows_its_schedule() -> None:
    cosine = TrainConfig(lr=0.01, schedule="cosine", warmup_steps=10, min_lr=0.1)
    assert learning_rate(cosine, 1, 0.0) == pytest.approx(0.001)
    assert learning_rate(cosine, 10, 0.01) == pytest.approx(0.01)
    assert learning_rate(cosine, 11, 0.0) == pytest.approx(0.01)
    assert learning_rate(cosine, 500, 0.5) == pytest.approx(0.001 + 0.009 * 0.5)
    assert learning_rate(cosine, 999, 1.0) == pytest.approx(0.001)
    assert learning_rate(cosine, 999, 1.3) == pytest.approx(0.001)  # past the budget: stays at the floor
    constant = TrainConfig(lr=0.01)
    assert {learning_rate(constant, s, s / 100) for s in range(1, 100)} == {0.01}


def test_records_carry_the_learning_rate_and_the_wall_clock() -> None:
    config = TrainConfig(
        seq_len=10, batch=4, epochs=3, log_every=2, val_fraction=0.2, schedule="cosine", warmup_steps=3
    )
    history = train("0123456789" * 30, ModelConfig(hidden=8), config).history
    lrs = [r["lr"] for r in history if r["kind"] == "step"]
    assert lrs[0] < lrs[1] and lrs[1] > lrs[-1]  # up through the warm-up, then down the cosine
    walls = [r["wall_seconds"] for r in history]
    assert walls == sorted(walls) and all(w >= r["elapsed"] for w, r in zip(walls, history, strict=True))
