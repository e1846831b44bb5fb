"""Adaptive sessions many at once (nextchar.core.adapt_batch, adapt.advance_many): the gradients
against finite differences, every session's bits alone or in any batch, predictions against each
session alone, and rate 0 as the static path."""

from __future__ import annotations

import numpy as np
import pytest
from nextchar.core import adapt, adapt_batch, inference
from nextchar.core.adapt import AdaptConfig, Adapter
from nextchar.core.config import ModelConfig
from nextchar.core.default_model import load_default_model
from nextchar.core.model import CharRNN
from nextchar.core.vocab import Vocab
from test_adapt import identical, random_adapter
from test_gradients import EPS, TOLERANCE, relative_error

SIZES = (1, 2, 7, 100)


@pytest.fixture(scope="module")
def shipped() -> CharRNN:
    return load_default_model().model


@pytest.mark.parametrize("loss", ["ce", "sigmoid_mse"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_batched_gradients_match_finite_differences(cell: str, layers: int, loss: str) -> None:
    """Three sessions in one batch, two with deltas and one fresh: each one's gradients are those
    of its own adapted model's loss (adapt.adapted, a whole CharRNN), differenced in its deltas."""
    vocab = Vocab.from_text("abcdef")
    config = ModelConfig(cell=cell, hidden=5, layers=layers, loss=loss, dtype="float64")
    model = CharRNN.create(config, vocab)
    rng = np.random.default_rng(3)
    for p in model.params.values():
        p += rng.normal(0, 0.3, p.shape)
    adapters = [random_adapter(model, rng), adapt.fresh(model, rng.normal(0, 0.5, model.state_size))]
    adapters.insert(1, random_adapter(model, rng))
    segments = rng.integers(0, vocab.size, (3, 7))
    starts = np.stack([a.start for a in adapters])
    nats, grads, states, _ = adapt_batch.gradients(model, [a.deltas for a in adapters], starts, segments)
    zeros = tuple(np.zeros(shape) for shape in adapt.delta_shapes(model))
    for n, adapter in enumerate(adapters):
        x, y = segments[n, :-1].reshape(-1, 1), segments[n, 1:].reshape(-1, 1)

        def loss_at(
            deltas: tuple[np.ndarray, ...],
            x: np.ndarray = x,
            y: np.ndarray = y,
            start: np.ndarray = adapter.start,
        ) -> float:
            moved = Adapter(deltas, start, adapt.NO_TEXT)
            return adapt.adapted(model, moved).loss_and_grads(x, y, start[None, :])[0]

        _, _, state, want_nats = adapt.adapted(model, adapter).loss_and_grads(x, y, adapter.start[None, :])
        assert nats[n] == pytest.approx(want_nats) and np.allclose(states[n], state[0])
        base = adapter.deltas or zeros
        for i, delta in enumerate(base):
            numeric = np.zeros_like(delta)
            for j in np.ndindex(delta.shape):
                for sign in (1, -1):
                    moved = [d.copy() for d in base]
                    moved[i][j] += sign * EPS
                    numeric[j] += sign * loss_at(tuple(moved)) / (2 * EPS)
            name = adapt.adapted_names(model)[i]
            assert relative_error(numeric, grads[i][n]) < TOLERANCE, f"{cell}/{layers}/{loss}: {name} of {n}"


def adapters_of(model: CharRNN, n: int, rng: np.random.Generator) -> list[Adapter]:
    """n adapters as a server holds them: a third fresh, the rest with small deltas, all float32."""
    out = []
    for i in range(n):
        start = rng.uniform(-0.9, 0.9, model.state_size).astype(model.dtype)
        if i % 3 == 0:
            out.append(adapt.fresh(model, start))
        else:
            deltas = tuple(rng.normal(0, 0.05, s).astype(model.dtype) for s in adapt.delta_shapes(model))
            out.append(Adapter(deltas, start, adapt.NO_TEXT))
    return out


@pytest.mark.parametrize("lr", [3e-3, 10.0])  # a usual rate, and one that diverges (some reset)
def test_a_session_learns_the_same_bits_in_any_batch(shipped: CharRNN, lr: float) -> None:
    """learn_many over batches of 1, 2, 7 and 100 sessions of the shipped model (float32): each
    session's new adapter and score are the ones it gets alone, bit for bit."""
    rule = adapt.rule(shipped, AdaptConfig(lr=lr))
    rng = np.random.default_rng(1)
    adapters = adapters_of(shipped, max(SIZES), rng)
    segments = rng.integers(0, shipped.vocab.size, (max(SIZES), rule.config.segment + 1))
    alone = [adapt.learn(shipped, rule, a, s) for a, s in zip(adapters, segments, strict=True)]
    if lr > 1:  # a tenth of the sessions
        assert any(a.resets for a, _ in alone) and not all(a.resets for a, _ in alone)
    for size in SIZES:
        at = rng.choice(max(SIZES), size, replace=False)
        batch = adapt.learn_many(shipped, rule, [adapters[i] for i in at], segments[at])
        for i, (adapter, nats) in zip(at, batch, strict=True):
            assert identical(adapter, alone[i][0]) and nats == alone[i][1], (
                f"session {i} in a batch of {size}"
            )


def test_advance_many_adapts_each_column_as_alone(shipped: CharRNN) -> None:
    """Sessions fed in batches of mixed chunk lengths (packed as the server packs them) end with
    the adapter each gets alone from its text, bit for bit; their predictions are each alone's."""
    rule = adapt.rule(shipped, AdaptConfig(lr=3e-3))
    rng = np.random.default_rng(2)
    corpus = shipped.vocab.encode(
        "To be, or not to be, that is the question: whether 'tis nobler in the mind " * 6
    )
    N = 7
    texts = [np.roll(corpus, 17 * n)[: 150 + 11 * n] for n in range(N)]
    adapters = [adapt.fresh(shipped) for _ in range(N)]
    states = shipped.initial_state(N)
    probs = np.tile(inference.initial_probs(shipped), (N, 1))
    pos = [0] * N
    while any(p < len(t) for p, t in zip(pos, texts, strict=True)):
        live = [n for n in range(N) if pos[n] < len(texts[n])]
        chunks = [texts[n][pos[n] : pos[n] + int(rng.integers(1, 45))] for n in live]
        order, lens, idx = inference.pack_chunks(chunks)
        cols = [live[i] for i in order]
        out, new = adapt.advance_many(
            shipped, rule, [adapters[n] for n in cols], idx, lens, states[cols], probs[cols], 3, False
        )
        for c, n in enumerate(cols):
            adapters[n], states[n], probs[n] = new[c], out.states[c], out.last_probs[c]
            pos[n] += lens[c]
    for n in range(N):
        alone, out = adapt.feed(
            shipped,
            rule,
            adapt.fresh(shipped),
            shipped.initial_state(1)[0],
            inference.initial_probs(shipped),
            texts[n],
            3,
        )
        assert identical(adapters[n], alone) and alone.steps == (len(texts[n]) - 1) // rule.config.segment
        assert identical(adapt.replay(shipped, rule, adapt.fresh(shipped), texts[n]), alone)
        np.testing.assert_allclose(probs[n], out.last_probs[0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(states[n], out.states[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("T", [1, 12])
def test_adapted_columns_predict_as_their_adapted_model(shipped: CharRNN, T: int) -> None:
    """Within a window, a batch of 100 columns (a third without deltas) predicts what each column's
    whole adapted model (adapt.adapted) predicts alone: top k, surprisal, states, distributions;
    one character each (a step) or up to 12 (a packed forward)."""
    rule = adapt.rule(shipped, AdaptConfig(lr=3e-3))
    rng = np.random.default_rng(4)
    N = 100
    adapters = adapters_of(shipped, N, rng)
    states = np.stack([a.start for a in adapters])
    probs = np.stack([adapt.adapted(shipped, a).predict_from(a.start[None, :])[0] for a in adapters])
    lens = sorted(rng.integers(1, T + 1, N).tolist(), reverse=True)
    idx = rng.integers(0, shipped.vocab.size, (lens[0], N)) * (np.arange(lens[0])[:, None] < np.array(lens))
    out, _ = adapt.advance_many(shipped, rule, adapters, idx, lens, states, probs, 3, True)
    assert out.probs_seq is not None
    for n, adapter in enumerate(adapters):
        ref = inference.feed(adapt.adapted(shipped, adapter), states[n], probs[n], idx[: lens[n], n], 3)
        assert ref.probs_seq is not None
        np.testing.assert_allclose(out.probs_seq[: lens[n] + 1, n], ref.probs_seq[:, 0], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(out.surprisal[: lens[n], n], ref.surprisal[:, 0], rtol=1e-5)
        np.testing.assert_allclose(out.states[n], ref.states[0], rtol=1e-5, atol=1e-5)
        assert np.array_equal(out.top_index[: lens[n], n, 0], ref.top_index[:, 0, 0])


@pytest.mark.parametrize("T", [1, 64])
def test_rate_zero_batches_are_the_static_batches_bit_for_bit(shipped: CharRNN, T: int) -> None:
    """Rate 0 over 100 columns of mixed lengths, windows completing mid-chunk: inference.advance's
    outputs, bit for bit, and each adapter's window and start as alone."""
    rule = adapt.rule(shipped, AdaptConfig(lr=0.0))
    rng = np.random.default_rng(5)
    N = 100
    adapters = [
        replace_window(adapt.fresh(shipped), rng.integers(0, shipped.vocab.size, int(rng.integers(0, 21))))
        for _ in range(N)
    ]
    states = rng.uniform(-0.9, 0.9, (N, shipped.state_size)).astype(shipped.dtype)
    probs = shipped.predict_from(states)
    lens = sorted(rng.integers(1, T + 1, N).tolist(), reverse=True)
    idx = rng.integers(0, shipped.vocab.size, (T, N)) * (np.arange(T)[:, None] < np.array(lens))
    out, new = adapt.advance_many(shipped, rule, adapters, idx, lens, states, probs, 3, True)
    want = inference.advance(shipped, idx, lens, states, probs, 3, True)
    assert out.probs_seq is not None and want.probs_seq is not None
    for n, length in enumerate(lens):  # rows past a chunk's end are padding, never read
        for got, expected in (
            (out.top_index, want.top_index),
            (out.top_prob, want.top_prob),
            (out.surprisal, want.surprisal),
            (out.probs_seq[1:], want.probs_seq[1:]),
        ):
            assert got[:length, n].tobytes() == expected[:length, n].tobytes()
    assert out.states.tobytes() == want.states.tobytes()
    assert out.last_probs.tobytes() == want.last_probs.tobytes()
    for n in range(N):
        assert identical(new[n], adapt.replay(shipped, rule, adapters[n], idx[: lens[n], n]))


def replace_window(adapter: Adapter, window: np.ndarray) -> Adapter:
    window.flags.writeable = False
    return Adapter(adapter.deltas, adapter.start, window, adapter.steps, adapter.resets)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_predictions_across_steps_are_each_adapter_in_force(cell: str, layers: int) -> None:
    """Columns whose windows complete mid-chunk, at staggered offsets (several steps each, tails of
    every length): the prediction after each character is that of the column's own adapted model
    (adapt.adapted) with the adapter in force at that character, stepped one character at a time."""
    vocab = Vocab.from_text("abcdefgh ")
    model = CharRNN.create(ModelConfig(cell=cell, hidden=8, layers=layers, dtype="float64"), vocab, seed=2)
    rule = adapt.rule(model, AdaptConfig(lr=0.5, segment=5))
    rng = np.random.default_rng(6)
    N, T = 9, 23
    adapters, states = [], np.empty((N, model.state_size))
    for n, adapter in enumerate(adapters_of(model, N, rng)):  # each session's state: its window's end
        adapters.append(replace_window(adapter, rng.integers(0, vocab.size, n % 6)))
        states[n] = adapt.adapted(model, adapter).forward(
            adapters[-1].window[:, None], adapter.start[None, :]
        )[2][0]
    probs = np.stack(
        [adapt.adapted(model, a).predict_from(s[None, :])[0] for a, s in zip(adapters, states, strict=True)]
    )
    lens = sorted(rng.integers(1, T + 1, N).tolist(), reverse=True)
    lens[0] = T
    idx = rng.integers(0, vocab.size, (T, N)) * (np.arange(T)[:, None] < np.array(lens))
    out, new = adapt.advance_many(model, rule, adapters, idx, lens, states, probs, 2, True)
    assert out.probs_seq is not None
    assert sum(a.steps for a in new) >= 2 * N
    for n, adapter in enumerate(adapters):
        state = states[n : n + 1]
        for t in range(lens[n]):
            in_force = adapt.replay(model, rule, adapter, idx[: t + 1, n])  # a step at t is in force at t
            state, want = adapt.adapted(model, in_force).step(state, idx[t : t + 1, n])
            np.testing.assert_allclose(out.probs_seq[t + 1, n], want[0], rtol=1e-9, err_msg=f"{n} at {t}")
        np.testing.assert_allclose(out.states[n], state[0], rtol=1e-9, atol=1e-12)
        assert identical(new[n], adapt.replay(model, rule, adapter, idx[: lens[n], n]))
