"""Checkpoints: a run paused anywhere and resumed from its checkpoint ends bit-identical to one never paused.

Pauses land mid-epoch and at epoch ends, with dropout (a generator to carry), Adam
and Adagrad moments, validation and early-stopping state; the resumed run's weights,
history and summary must equal the uninterrupted run's, not merely be close.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from nextchar.core import checkpoint as ck
from nextchar.core.config import ModelConfig, TrainConfig
from nextchar.core.model import CharRNN
from nextchar.core.train import TrainingPaused, train
from nextchar.core.vocab import Vocab

TEXT = (
    "the quick brown fox jumps over the lazy dog. " * 12 + "pack my box with five dozen liquor jugs! "
) * 6


def digest(model: CharRNN) -> str:
    return hashlib.sha256(b"".join(model.params[k].tobytes() for k in sorted(model.params))).hexdigest()


def run_with_pause(mc: ModelConfig, tc: TrainConfig, pause_at: int, path: Path) -> tuple[str, list[str]]:
    """Train until the pause_at-th window, checkpointing to path; returns the reason and positions."""
    calls, positions = [0], []

    def pause() -> bool:
        calls[0] += 1
        return calls[0] == 2 * pause_at  # should_pause is asked twice per window it pauses at

    def keep(checkpoint: ck.Checkpoint) -> None:
        ck.save(path, checkpoint)
        positions.append(checkpoint.position)

    with pytest.raises(TrainingPaused) as paused:
        train(TEXT, mc, tc, should_pause=pause, on_checkpoint=keep)
    return str(paused.value), positions


@pytest.mark.parametrize(
    ("cell", "optimizer", "pause_at"),
    [("rnn", "adam", 7), ("gru", "adagrad", 30), ("lstm", "adam", 41)],
)
def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(
    tmp_path: Path, cell: str, optimizer: str, pause_at: int
) -> None:
    mc = ModelConfig(cell=cell, hidden=16, layers=2)
    tc = TrainConfig(
        seq_len=16, batch=4, epochs=4, optimizer=optimizer, dropout=0.2, patience=3, log_every=5, seed=5
    )
    whole = train(TEXT, mc, tc)
    reason, positions = run_with_pause(mc, tc, pause_at, tmp_path / "c.npz")
    assert "paused" in reason and positions  # epoch-end checkpoints, then the pause's own
    resumed = train(TEXT, mc, tc, resume=ck.load(tmp_path / "c.npz"))
    assert digest(resumed.model) == digest(whole.model)
    strip = [
        {k: v for k, v in r.items() if k not in ("chars_per_sec", "elapsed", "wall_seconds", "eta_seconds")}
        for r in whole.history
    ]
    assert [
        {k: v for k, v in r.items() if k not in ("chars_per_sec", "elapsed", "wall_seconds", "eta_seconds")}
        for r in resumed.history
    ] == strip
    assert resumed.summary["val_bpc"] == whole.summary["val_bpc"]


def test_checkpoints_are_taken_every_epoch_and_on_a_timer(tmp_path: Path) -> None:
    mc, tc = ModelConfig(cell="rnn", hidden=8), TrainConfig(seq_len=8, batch=4, epochs=3, log_every=50)
    taken: list[str] = []
    train(TEXT, mc, tc, on_checkpoint=lambda c: taken.append(c.position))
    assert [p.split(",")[0] for p in taken] == ["epoch 2", "epoch 3"]  # the last epoch's end is the result
    timed: list[str] = []
    train(TEXT, mc, tc, on_checkpoint=lambda c: timed.append(c.position), checkpoint_seconds=1e-9)
    assert len(timed) > 10  # every window, with a timer that always fires


def test_a_checkpoint_of_another_config_or_model_is_refused(tmp_path: Path) -> None:
    mc, tc = ModelConfig(cell="rnn", hidden=8), TrainConfig(seq_len=8, batch=4, epochs=2)
    run_with_pause(mc, tc, 3, tmp_path / "c.npz")
    saved = ck.load(tmp_path / "c.npz")
    with pytest.raises(ValueError, match="another training configuration"):
        train(TEXT, mc, TrainConfig(seq_len=8, batch=4, epochs=3), resume=saved)
    with pytest.raises(ValueError, match="do not fit"):
        train(TEXT, ModelConfig(cell="gru", hidden=8), tc, resume=saved)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a checkpoint"):
        ck.load(tmp_path / "junk.npz")
    assert Vocab.from_text(TEXT).size == CharRNN.create(mc, Vocab.from_text(TEXT)).vocab.size
