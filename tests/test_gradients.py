"""Finite-difference checks of every analytic gradient: each cell, 1-3 layers, both losses (float64),
and with dropout (a fixed mask, so the loss is a deterministic function of the weights)."""

from __future__ import annotations

import numpy as np
import pytest
from nextchar.core.config import ModelConfig
from nextchar.core.model import CharRNN, dropout_masks
from nextchar.core.vocab import Vocab

EPS = 1e-6
TOLERANCE = 1e-6


def relative_error(numeric: np.ndarray, analytic: np.ndarray) -> float:
    scale = np.abs(numeric).max() + np.abs(analytic).max()
    return float(np.abs(numeric - analytic).max() / max(scale, 1e-12))


def check_gradients(cell: str, layers: int, loss: str, dropout: float = 0.0) -> None:
    vocab = Vocab.from_text("abcdef")
    model = CharRNN.create(ModelConfig(cell=cell, hidden=5, layers=layers, loss=loss, dtype="float64"), vocab)
    rng = np.random.default_rng(7)
    for p in model.params.values():  # move off the zero-bias init so every term is exercised
        p += rng.normal(0, 0.3, p.shape)
    T, B = 4, 3
    x = rng.integers(0, vocab.size, (T, B))
    y = rng.integers(0, vocab.size, (T, B))
    state = rng.normal(0, 0.5, (B, model.state_size))  # a carried state, as in truncated BPTT
    masks = dropout_masks(rng, dropout, (T, B, 5), layers, model.dtype) if dropout else None
    if masks is not None:  # the masks really drop something, and rescale the rest
        assert all(0 < np.count_nonzero(m) < m.size for m in masks)
        assert set(np.unique(np.concatenate(masks, axis=None))) == {0.0, 1 / (1 - dropout)}
    _, grads, _, _ = model.loss_and_grads(x, y, state, masks)

    for name, param in model.params.items():
        numeric = np.zeros_like(param)
        for i in np.ndindex(param.shape):
            old = param[i]
            param[i] = old + EPS
            plus = model.loss_and_grads(x, y, state, masks)[0]
            param[i] = old - EPS
            minus = model.loss_and_grads(x, y, state, masks)[0]
            param[i] = old
            numeric[i] = (plus - minus) / (2 * EPS)
        assert relative_error(numeric, grads[name]) < TOLERANCE, f"{cell}/{layers}/{loss}/{dropout}: {name}"


@pytest.mark.parametrize("loss", ["ce", "sigmoid_mse"])
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_gradients_match_finite_differences(cell: str, layers: int, loss: str) -> None:
    check_gradients(cell, layers, loss)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_gradients_with_dropout_match_finite_differences(cell: str, layers: int) -> None:
    """Dropout between the layers and before the read-out, one fixed mask per layer."""
    check_gradients(cell, layers, "ce", dropout=0.4)


def test_float32_gradients_agree_with_float64() -> None:
    """The fast path (float32) computes the same gradients as the checked float64 one."""
    vocab = Vocab.from_text("abcdef")
    m64 = CharRNN.create(ModelConfig(cell="lstm", hidden=8, layers=2, dtype="float64"), vocab)
    m32 = CharRNN(ModelConfig(cell="lstm", hidden=8, layers=2, dtype="float32"), vocab, m64.params)
    rng = np.random.default_rng(1)
    x = rng.integers(0, vocab.size, (6, 3))
    y = rng.integers(0, vocab.size, (6, 3))
    _, g64, _, _ = m64.loss_and_grads(x, y, m64.initial_state(3))
    _, g32, _, _ = m32.loss_and_grads(x, y, m32.initial_state(3))
    for name in g64:
        assert g32[name].dtype == np.float32
        np.testing.assert_allclose(g32[name], g64[name], rtol=1e-3, atol=1e-5)
