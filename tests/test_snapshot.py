"""The session snapshot codec: what a shared store writes (the deltas apart) reads back whole.

``stored`` must give back the value ``encode`` wrote: state, prediction, offset, trail and both
adapters (the current one and the one at the trail's oldest mark), bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from nextchar.core import adapt
from nextchar.core.model import CharRNN
from nextchar.server.registry import ModelVersion
from nextchar.server.sessions import snapshot
from nextchar.server.sessions.session import start_value
from nextchar.server.sessions.value import SessionValue
from server_harness import train_notebook_model

TEXT = "hello world hello word held a world " * 4  # 144 characters: windows step, marks drop
KEEP = 16


@pytest.fixture(scope="module")
def model() -> tuple[ModelVersion, CharRNN]:
    net = train_notebook_model(epochs=20)[0]
    return ModelVersion.from_model("default", 3, Path("unused.npz"), net, [], {}, {"checksum": "c0ffee"}), net


def fed(mv: ModelVersion, net: CharRNN, adaptive: bool) -> SessionValue:
    """A value fed TEXT in chunks of 7, the way the session manager builds one."""
    rule = mv.adapt_rule(net)
    value = start_value(mv, net, KEEP, adaptive)
    idx = net.vocab.encode(TEXT)
    for at in range(0, len(idx), 7):
        chunk = idx[at : at + 7]
        if value.adapter is None:
            state, probs = net.step(value.state[None], chunk[:1])  # any state will do for the codec
            value = value.advanced(chunk, state[0], probs[0])
            continue
        base, replay = value.base_source(len(chunk))
        adapter, out = adapt.feed(net, rule, value.adapter, value.state, value.probs, chunk)
        moved = adapt.replay(net, rule, base, replay) if base is not None and len(replay) else base
        value = value.advanced(chunk, out.states[0], out.last_probs[0], adapter, moved)
    return value


def test_a_stored_value_reads_back_whole(model: tuple[ModelVersion, CharRNN]) -> None:
    mv, net = model
    value = fed(mv, net, adaptive=True)
    assert value.adapter is not None and value.adapter.deltas and value.base is not None
    parsed = snapshot.parse(snapshot.encode(mv, value, deltas_apart=True))
    back = snapshot.stored(
        net,
        mv.adapt_rule(net),
        parsed,
        KEEP,
        snapshot.encode_deltas(value.adapter),
        snapshot.encode_deltas(value.base),
    )
    assert back.offset == value.offset == len(TEXT)
    np.testing.assert_array_equal(back.state, value.state)
    np.testing.assert_array_equal(back.probs, value.probs)
    assert [m.offset for m in back.trail.marks] == [m.offset for m in value.trail.marks]
    np.testing.assert_array_equal(back.trail.text, value.trail.text)
    for got, want in ((back.adapter, value.adapter), (back.base, value.base)):
        assert got is not None and want is not None
        assert snapshot.encode_adapter(got) == snapshot.encode_adapter(want)


def test_a_trail_written_after_every_message_reads_back_as_written(
    model: tuple[ModelVersion, CharRNN],
) -> None:
    """A trail keeps its marks' bytes once written and carries them while its marks stay the same
    (a Redis store writes a session after every message): after each message of every length,
    as marks are added and dropped, the trail written is the one a fresh encoding gives, and it
    reads back to the same marks and text."""
    mv, net = model
    value = start_value(mv, net, KEEP, adaptive=False)
    idx = net.vocab.encode(TEXT * 2)
    rng = np.random.default_rng(0)
    at = 0
    while at < len(idx):
        chunk = idx[at : at + int(rng.integers(1, 12))]
        state, probs = net.step(value.state[None], chunk[:1])
        value = value.advanced(chunk, state[0], probs[0])
        at += len(chunk)
        trail = value.trail
        written = snapshot.encode_trail(trail)
        assert trail.marks_bytes is not None
        assert written == snapshot.encode_trail(type(trail)(trail.keep, trail.marks, trail.text))
        back = snapshot.decode_trail(net, KEEP, written, value.offset)
        assert [m.offset for m in back.marks] == [m.offset for m in trail.marks]
        for got, want in zip(back.marks, trail.marks, strict=True):
            np.testing.assert_array_equal(got.state, want.state)
            np.testing.assert_array_equal(got.probs, want.probs)
        np.testing.assert_array_equal(back.text, trail.text)
