"""Inference paths agree with each other and with training's forward pass."""

from __future__ import annotations

import numpy as np
import pytest
from nextchar.core.config import ModelConfig
from nextchar.core.inference import feed, initial_probs
from nextchar.core.model import CharRNN
from nextchar.core.vocab import UNK, Vocab


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_step_and_forward_agree(cell: str) -> None:
    """One step per character against one forward call over the chunk (inference.feed)."""
    vocab = Vocab.from_text("hello world")
    model = CharRNN.create(ModelConfig(cell=cell, hidden=16, layers=2), vocab, seed=3)
    idx = vocab.encode("hello world hello")
    chunk = feed(model, model.initial_state(1)[0], initial_probs(model), idx)
    assert chunk.probs_seq is not None
    state_run, probs_run = chunk.states[0], chunk.probs_seq[1:, 0]

    state = model.initial_state(1)
    for t, i in enumerate(idx):
        state, probs = model.step(state, np.array([i]))
        np.testing.assert_allclose(probs[0], probs_run[t], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state[0], state_run, rtol=1e-5, atol=1e-6)


def test_batched_step_equals_sessions_stepped_alone() -> None:
    """N sessions in one product give each the result it would get alone (no state leaks across rows)."""
    vocab = Vocab.from_text("abcdefgh")
    model = CharRNN.create(ModelConfig(cell="gru", hidden=12), vocab, seed=1)
    rng = np.random.default_rng(0)
    states = rng.normal(0, 0.5, (5, model.state_size)).astype(np.float32)
    idx = rng.integers(1, vocab.size, 5)
    batched_states, batched_probs = model.step(states, idx)
    for n in range(5):
        alone_state, alone_probs = model.step(states[n : n + 1], idx[n : n + 1])
        np.testing.assert_allclose(batched_states[n], alone_state[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batched_probs[n], alone_probs[0], rtol=1e-5, atol=1e-6)


def test_probabilities_are_distributions_for_both_losses() -> None:
    vocab = Vocab.from_text("abc")
    for loss in ("ce", "sigmoid_mse"):
        model = CharRNN.create(ModelConfig(hidden=4, loss=loss), vocab)
        _, probs = model.step(model.initial_state(2), np.array([1, UNK]))
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        assert (probs >= 0).all()


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("cell", {"cell": "transformer"}),
        ("hidden", {"hidden": 0}),
        ("layers", {"layers": 4}),
        ("loss", {"loss": "l1"}),
    ],
)
def test_bad_config_names_the_field(field: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)  # type: ignore[arg-type]


def test_constructor_rejects_mismatched_parameters() -> None:
    vocab = Vocab.from_text("abc")
    model = CharRNN.create(ModelConfig(hidden=4), vocab)
    params = dict(model.params)
    params["l0.Whh"] = np.zeros((5, 5), dtype=np.float32)
    with pytest.raises(ValueError, match=r"l0\.Whh"):
        CharRNN(model.config, vocab, params)
