"""Dynamic evaluation (nextchar.core.adapt): rate 0 as the static model, bit-exact
replays for rewinds, hostile texts, the session's memory, and the tuned config's round trip
(its gradients, and many sessions at once: tests/test_adapt_batch.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from nextchar.core import adapt, inference
from nextchar.core.adapt import AdaptConfig, Adapter
from nextchar.core.adapt_tune import bits_per_char, gradient_stats, tune
from nextchar.core.config import ModelConfig
from nextchar.core.default_model import load_default_model
from nextchar.core.model import CharRNN
from nextchar.core.modelfile import META_KEY, PARAM_PREFIX, ModelFileError, load_model, save_model, write_npz
from nextchar.core.vocab import UNK, Vocab

SESSION_BUDGET = 512 * 1024  # an adaptive session of the default model, everything included


@pytest.fixture(scope="module")
def shipped() -> CharRNN:
    return load_default_model().model


def identical(a: Adapter, b: Adapter) -> bool:
    """Bit for bit: every delta, the window and its start state, the counters."""
    return (
        len(a.deltas) == len(b.deltas)
        and all(x.tobytes() == y.tobytes() for x, y in zip(a.deltas, b.deltas, strict=True))
        and a.start.tobytes() == b.start.tobytes()
        and a.window.tobytes() == b.window.tobytes()
        and (a.steps, a.resets) == (b.steps, b.resets)
    )


def random_adapter(model: CharRNN, rng: np.random.Generator) -> Adapter:
    deltas = tuple(rng.normal(0, 0.3, shape) for shape in adapt.delta_shapes(model))
    return Adapter(deltas, rng.normal(0, 0.5, model.state_size), adapt.NO_TEXT)


def test_rate_zero_is_the_static_model_bit_for_bit(shipped: CharRNN) -> None:
    """Rate 0: the same states and predictions as a static session, bit for bit, fed the same
    pieces (one character at a time, as a ping-pong stream; and a whole chunk, across windows),
    and the weights are the shared ones throughout."""
    rule = adapt.rule(shipped, AdaptConfig(lr=0.0))
    idx = shipped.vocab.encode("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 2)
    state, probs = shipped.initial_state(1)[0], inference.initial_probs(shipped)
    adapter, static_state, static_probs = adapt.fresh(shipped), state, probs
    for c in idx:
        adapter, out = adapt.feed(shipped, rule, adapter, state, probs, np.array([c]), k=5, full=True)
        ref = inference.feed(shipped, static_state, static_probs, np.array([c]), k=5)
        for got, want in zip(
            (out.top_index, out.top_prob, out.surprisal, out.probs_seq, out.states),
            (ref.top_index, ref.top_prob, ref.surprisal, ref.probs_seq, ref.states),
            strict=True,
        ):
            assert got is not None and want is not None and got.tobytes() == want.tobytes()
        state, probs = out.states[0], out.last_probs[0]
        static_state, static_probs = ref.states[0], ref.last_probs[0]
    assert adapter.deltas == () and adapter.steps == (len(idx) - 1) // rule.config.segment
    assert adapt.adapted(shipped, adapter) is shipped

    adapter, out = adapt.feed(shipped, rule, adapt.fresh(shipped), shipped.initial_state(1)[0], probs, idx)
    whole = inference.feed(shipped, shipped.initial_state(1)[0], probs, idx)
    assert adapter.steps == (len(idx) - 1) // rule.config.segment
    for got, want in zip(
        (out.surprisal, out.top_index, out.states),
        (whole.surprisal, whole.top_index, whole.states),
        strict=True,
    ):
        assert got.tobytes() == want.tobytes()  # no step changes a weight, so the chunk is not cut


def test_replays_reproduce_the_adapter_bit_for_bit(shipped: CharRNN) -> None:
    """A rewind restores the value kept at a mark and feeds the text from there: whatever the
    chunks, from whichever earlier value, the adapter is the one the session had, bit for bit."""
    rule = adapt.rule(shipped, AdaptConfig(lr=0.05))
    rng = np.random.default_rng(11)
    text = shipped.vocab.encode(
        "O Romeo, Romeo! wherefore art thou Romeo? Deny thy father and refuse thy name; "
        "or, if thou wilt not, be but sworn my love, and I'll no longer be a Capulet. " * 2
    )
    state, probs = shipped.initial_state(1)[0], inference.initial_probs(shipped)
    adapter = adapt.fresh(shipped)
    at: dict[int, tuple[Adapter, np.ndarray, np.ndarray]] = {0: (adapter, state, probs)}
    pos = 0
    while pos < len(text):
        n = int(rng.integers(1, 30))
        adapter, out = adapt.feed(shipped, rule, adapter, state, probs, text[pos : pos + n])
        state, probs = out.states[0], out.last_probs[0]
        pos = min(pos + n, len(text))
        at[pos] = (adapter, state, probs)
    assert adapter.deltas and adapter.steps == (len(text) - 1) // rule.config.segment
    assert adapt.replay(shipped, rule, adapt.fresh(shipped), text).__class__ is Adapter
    assert identical(adapt.replay(shipped, rule, adapt.fresh(shipped), text), adapter)
    offsets = sorted(at)
    for _ in range(12):
        mark, target = sorted(rng.choice(offsets, 2, replace=False))
        kept, state, probs = at[mark]
        assert identical(adapt.replay(shipped, rule, kept, text[mark:target]), at[target][0])
        pos = mark
        while pos < target:  # fed again in other chunks, one character at a time at most
            n = min(int(rng.integers(1, 8)), target - pos)
            kept, out = adapt.feed(shipped, rule, kept, state, probs, text[pos : pos + n])
            state, probs = out.states[0], out.last_probs[0]
            pos += n
        assert identical(kept, at[target][0])
        assert state.tobytes() == at[target][1].tobytes()


HOSTILE = ("one character 100,000 times", "random bytes", "unknown characters only")


def hostile(name: str, vocab: Vocab) -> np.ndarray:
    if name == HOSTILE[0]:
        return np.full(100_000, vocab.encode("e")[0])
    if name == HOSTILE[1]:
        noise = np.random.default_rng(5).integers(0, 256, 10_000, dtype=np.uint8)
        return vocab.encode(noise.tobytes().decode("latin-1"))
    idx = vocab.encode("\u4e00\u4e01\u4e02" * 3_400)
    assert np.all(idx == UNK)
    return idx


@pytest.mark.timeout(1200)  # 5,000 steps: ~30 s alone, several minutes on a loaded machine
@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_texts_keep_predictions_finite(shipped: CharRNN, name: str) -> None:
    """Every window's score and every prediction stays finite, the deltas stay bounded and the
    adapter's memory does not grow, at a usual rate over the whole text and at 100 times it over
    its first 10,000 characters."""
    idx = hostile(name, shipped.vocab)
    for lr, chars in ((3e-3, len(idx)), (0.3, 10_000)):
        rule = adapt.rule(shipped, AdaptConfig(lr=lr))
        adapter, nats = adapt.score(shipped, rule, adapt.fresh(shipped), idx[:chars])
        assert np.all(np.isfinite(nats))
        assert all(np.abs(d).max() <= adapt.LIMIT for d in adapter.deltas)
        assert adapter.nbytes <= adapt.adapter_bytes(shipped) + adapter.start.nbytes + adapter.window.nbytes
        probs = adapt.adapted(shipped, adapter).predict_from(adapter.start[None, :])
        assert np.all(np.isfinite(probs))


def test_a_diverging_adapter_is_reset_and_counted(shipped: CharRNN) -> None:
    """A rate far past any sane one drives the deltas out of bounds: the adapter goes back to the
    shared weights (deltas ()) and counts the reset, and its next predictions are finite."""
    rule = adapt.rule(shipped, AdaptConfig(lr=1e4))
    idx = shipped.vocab.encode("abcabcabc zzz " * 20)
    adapter, nats = adapt.score(shipped, rule, adapt.fresh(shipped), idx)
    assert adapter.resets > 0 and np.all(np.isfinite(nats))
    assert all(np.abs(d).max() <= adapt.LIMIT for d in adapter.deltas)
    assert np.all(np.isfinite(adapt.adapted(shipped, adapter).predict_from(adapter.start[None, :])))


def test_an_adaptive_session_of_the_default_model_fits_in_512_kb(shipped: CharRNN) -> None:
    """What a session holds for adaptation: its adapter and the one kept at the oldest rewind mark
    (the trail's marks and text are a static session's already), measured on real values."""
    rule = adapt.rule(shipped, AdaptConfig(lr=3e-3))
    idx = shipped.vocab.encode("Now is the winter of our discontent made glorious summer. " * 10)
    kept = adapt.replay(shipped, rule, adapt.fresh(shipped), idx[:300])
    current = adapt.replay(shipped, rule, kept, idx[300:])
    assert kept.deltas and current.deltas
    assert adapt.adapter_bytes(shipped) == sum(d.nbytes for d in current.deltas) == 139_528
    assert kept.nbytes + current.nbytes <= SESSION_BUDGET


def test_tuned_config_round_trips_through_json() -> None:
    """tune measures the statistics and picks a rate; the config survives the model file's JSON
    (the same update arrays after the round trip), and a file without one gets plain SGD."""
    vocab = Vocab.from_text("abcdefgh \n")
    model = CharRNN.create(ModelConfig(cell="gru", hidden=8), vocab, seed=1)
    text = "abc defg\nhabc fed\n" * 40
    config = tune(model, text, lrs=(1e-3, 1e-2), chars=400)
    assert config.lr in (1e-3, 1e-2) and config.stats is not None
    assert config.lr == min(
        (1e-3, 1e-2),
        key=lambda lr: bits_per_char(model, AdaptConfig(lr=lr, stats=config.stats), vocab.encode(text)[:400]),
    )
    back = AdaptConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config and back.stats == config.stats
    a, b = adapt.rule(model, config), adapt.rule(model, back)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a.rate + a.keep, b.rate + b.keep, strict=True))
    assert AdaptConfig.from_dict(None) == AdaptConfig() and AdaptConfig().stats is None
    stats = gradient_stats(model, vocab.encode(text))
    training = "hgf edcba\n" * 30  # the statistics from the training text, as a trainer passes it
    assert tune(model, text, stats_text=training, lrs=(1e-3,), chars=100).stats == gradient_stats(
        model, vocab.encode(training)
    )
    assert adapt.unpacked(stats["Why"], (8, vocab.size)).shape == model.params["Why"].shape
    with pytest.raises(ValueError, match="adapt stats"):
        adapt.rule(model, AdaptConfig(stats={**stats, "by": stats["Why"]}))


def test_the_model_file_records_the_tuned_config(tmp_path: Path) -> None:
    """save_model(adapt=...) records the config and load_model checks it; a file saved without
    one (every file before adaptation) gets the defaults and is the same bytes as before."""
    vocab = Vocab.from_text("abcdefgh \n")
    model = CharRNN.create(ModelConfig(cell="gru", hidden=8), vocab, seed=1)
    text = "abc defg\nhabc fed\n" * 20
    config = AdaptConfig(lr=2e-3, stats=gradient_stats(model, vocab.encode(text)))
    save_model(tmp_path / "tuned.npz", model, adapt=config)
    assert load_model(tmp_path / "tuned.npz").adapt == config
    save_model(tmp_path / "old.npz", model)
    assert load_model(tmp_path / "old.npz").adapt == AdaptConfig()
    meta = dict(load_model(tmp_path / "old.npz").meta)
    assert "adapt" not in meta
    bad = {**config.to_dict(), "stats": {**config.to_dict()["stats"], "Why": "AAAA"}}
    arrays = {PARAM_PREFIX + k: v for k, v in model.params.items()}
    arrays[META_KEY] = np.frombuffer(json.dumps({**meta, "adapt": bad}).encode(), dtype=np.uint8)
    with open(tmp_path / "bad.npz", "wb") as f:
        write_npz(f, arrays)
    with pytest.raises(ModelFileError, match="invalid adaptation config"):
        load_model(tmp_path / "bad.npz")
