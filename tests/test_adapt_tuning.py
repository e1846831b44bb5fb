"""Tuned out of the box: every training run tunes its adaptation and its model file records it.

A run with a validation text of a few windows tunes (nextchar.core.adapt_tune.at_end_of_training)
and says so in a "tune" progress record; the config reaches the model file the way each trainer
writes it (``train --local``'s registry, the pool's for a job), loads back, and is the same on a
rerun with the same seed. A run whose validation text is too short records the defaults, and a
file from before adaptation reads as them. ``nextchar eval FILE --adapt`` scores a text on a server's
model through a static and an adaptive session, side by side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from nextchar.cli.app import app
from nextchar.core.adapt import SEGMENT, AdaptConfig
from nextchar.core.adapt_tune import LRS, MIN_WINDOWS, bits_per_char, side_by_side
from nextchar.core.config import ModelConfig, TrainConfig, split_text
from nextchar.core.evaluate import evaluate
from nextchar.core.modelfile import ModelPayload, load_model
from nextchar.core.train import TrainingCancelled, TrainResult, train
from nextchar.server.registry import Registry
from server_harness import start_server
from typer.testing import CliRunner

TEXT = "the quick brown fox jumps over the lazy dog.\nsphinx of black quartz, judge my vow.\n" * 30
MODEL = ModelConfig(cell="gru", hidden=16)
CONFIG = TrainConfig(seq_len=16, batch=4, epochs=2, seed=3, log_every=5)  # val: the last 10%, 246 chars

runner = CliRunner()


@pytest.fixture(scope="module")
def trained() -> tuple[TrainResult, list[dict[str, Any]]]:
    records: list[dict[str, Any]] = []
    return train(TEXT, MODEL, CONFIG, on_progress=records.append), records


def test_a_training_run_tunes_its_adaptation_on_its_validation_text(
    trained: tuple[TrainResult, list[dict[str, Any]]],
) -> None:
    result, records = trained
    config, note = result.adapt, result.summary["adapt"]
    assert config is not None and config.stats is not None  # gradient statistics: the RMS rule
    assert config.lr in LRS and config.floor == AdaptConfig().floor
    val_text = split_text(TEXT, CONFIG.val_fraction)[1]
    windows = (len(val_text) - 1) // SEGMENT
    assert note["chars"] == windows * SEGMENT and note["lr"] == config.lr
    measured = val_text[: windows * SEGMENT + 1]
    assert note["adapted_bpc"] == bits_per_char(result.model, config, result.model.vocab.encode(measured))
    assert note["static_bpc"] == evaluate(result.model, measured)["bits_per_char"]
    # the rate is the best measured: no other rate of the grid does better on that text
    for lr in LRS:
        other = AdaptConfig(lr=lr, stats=config.stats, floor=config.floor)
        assert bits_per_char(result.model, other, result.model.vocab.encode(measured)) >= note["adapted_bpc"]
    # progress said so, after the last epoch; the history a model file keeps has no such record
    assert [r["kind"] for r in records][-2:] == ["epoch", "tune"]
    assert records[-1]["epoch"] == records[-2]["epoch"]
    assert all(r["kind"] != "tune" for r in result.history)


def test_the_same_seed_tunes_the_same_config(trained: tuple[TrainResult, list[dict[str, Any]]]) -> None:
    again = train(TEXT, MODEL, CONFIG)
    assert again.adapt is not None and trained[0].adapt is not None
    assert again.adapt.to_dict() == trained[0].adapt.to_dict()
    assert again.summary["adapt"] == trained[0].summary["adapt"]


def test_a_validation_text_of_few_windows_records_the_defaults(tmp_path: Path) -> None:
    text = "abcdefgh " * 60  # 540 characters: 54 of validation, two windows
    records: list[dict[str, Any]] = []
    result = train(text, MODEL, TrainConfig(seq_len=8, batch=2, epochs=1), on_progress=records.append)
    assert result.adapt == AdaptConfig()
    assert records == result.history  # no "tune" record: nothing was tuned
    assert result.summary["adapt"]["chars"] == 0
    assert f"fewer than {MIN_WINDOWS} windows" in result.summary["adapt"]["untuned"]
    registry = Registry(tmp_path)
    mv = registry.register("short", result.model, history=[], summary=result.summary, adapt=result.adapt)
    recorded = load_model(mv.path)
    assert recorded.meta["adapt"] == AdaptConfig().to_dict()  # recorded as the defaults, explicitly
    assert recorded.adapt == AdaptConfig()


def test_the_registry_records_the_tuned_config_and_old_files_read_as_defaults(
    tmp_path: Path, trained: tuple[TrainResult, list[dict[str, Any]]]
) -> None:
    """Registry._save is where both trainers' model files are written: train --local registers
    through register(), a job through register_as() (the pool, below)."""
    result = trained[0]
    registry = Registry(tmp_path)
    tuned = registry.register(
        "tuned", result.model, history=result.history, summary=result.summary, adapt=result.adapt
    )
    assert load_model(tuned.path).adapt == result.adapt
    assert result.adapt is not None and tuned.meta["adapt"] == result.adapt.to_dict()
    old = registry.register("old", result.model, history=[], summary={})  # as every file before
    assert "adapt" not in load_model(old.path).meta
    assert load_model(old.path).adapt == AdaptConfig()


def test_a_jobs_model_file_records_the_config_its_trainer_tuned(
    tmp_path: Path, trained: tuple[TrainResult, list[dict[str, Any]]]
) -> None:
    from nextchar.server.training.journal import LocalJobStore
    from nextchar.server.training.pipe import Done
    from nextchar.server.training.pool import TrainerPool
    from nextchar.server.training.store import SUCCEEDED, Job

    result = trained[0]
    assert result.adapt is not None
    registry = Registry(tmp_path)
    store = LocalJobStore(tmp_path / "_jobs")
    pool = TrainerPool(store, registry, 1, 0.0, 15.0)
    job = Job(id="c" * 32, model_name="tuned", promote=False, model_config=MODEL, train_config=CONFIG)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    store.add(job, text)
    claim = store.take("test")
    assert claim is not None
    # what run_training sends: the config as plain data
    body = Done(ModelPayload.of(result.model), result.history, result.summary, result.adapt.to_dict())
    assert pool._register(claim, job, body) == (SUCCEEDED, "", ("tuned", 1))
    assert load_model(registry.resolve("tuned", 1).path).adapt == result.adapt


def test_tuning_can_be_cancelled() -> None:
    """should_stop is asked after each rate measured: a cancel during tuning keeps nothing."""
    tuning = False

    def heard(record: dict[str, Any]) -> None:
        nonlocal tuning
        tuning = tuning or record["kind"] == "tune"

    with pytest.raises(TrainingCancelled):
        train(TEXT, MODEL, CONFIG, on_progress=heard, should_stop=lambda: tuning)


def test_side_by_side_scores_whole_windows_and_the_first_characters(
    trained: tuple[TrainResult, list[dict[str, Any]]],
) -> None:
    result = trained[0]
    assert result.adapt is not None
    idx = result.model.vocab.encode(TEXT[:415])  # 20 windows and 14 characters
    scores = side_by_side(result.model, result.adapt, idx, first=110)
    assert scores["chars"] == 400 and scores["first_chars"] == 100
    assert scores["adapted_bpc"] == bits_per_char(result.model, result.adapt, idx)
    assert scores["first_adapted_bpc"] == pytest.approx(bits_per_char(result.model, result.adapt, idx[:101]))
    assert scores["static_bpc"] == evaluate(result.model, TEXT[:401])["bits_per_char"]
    assert "first_chars" not in side_by_side(result.model, result.adapt, idx, first=1000)
    with pytest.raises(ValueError, match="more than 20 characters"):
        side_by_side(result.model, result.adapt, idx[:20])


def test_eval_adapt_scores_a_text_static_and_adapting_side_by_side(
    tmp_path: Path, trained: tuple[TrainResult, list[dict[str, Any]]]
) -> None:
    """nextchar eval FILE --adapt: the text through a static session and an adaptive one of the
    server's model (its recorded config), both figures and the change."""
    result = trained[0]
    registry = Registry(tmp_path / "models")
    registry.load_all()
    registry.register("tuned", result.model, history=[], summary={}, adapt=result.adapt, promote=True)
    text_file = tmp_path / "text.txt"
    text_file.write_text("a quick black fox judges the lazy quartz. " * 30)  # its own text: it learns it
    server = start_server(tmp_path / "models")
    try:
        address = ["--server", f"127.0.0.1:{server.port}"]
        plain = json.loads(runner.invoke(app, ["eval", str(text_file), "--json", *address]).stdout)
        args = ["eval", str(text_file), "--adapt", *address]
        printed = json.loads(runner.invoke(app, [*args, "--json"]).stdout)["summary"]
        static, adapted = printed["static"], printed["adapted"]
        assert static["chars"] == adapted["chars"] == 42 * 30
        assert static["bits_per_char"] == plain["summary"]["bits_per_char"]  # what eval alone says
        assert not static["adaptive"] and adapted["adaptive"]
        assert adapted["bits_per_char"] < 0.95 * static["bits_per_char"]
        assert printed["change"] == pytest.approx(adapted["bits_per_char"] / static["bits_per_char"] - 1)
        shown = runner.invoke(app, args)
        assert shown.exit_code == 0, shown.output
        lines = shown.stdout.splitlines()
        rows = {
            name: next(line for line in lines if f" {name} " in line)
            for name in ("static", "adapted", "change")
        }
        assert f"{static['bits_per_char']:.3f}" in rows["static"]
        assert f"{adapted['bits_per_char']:.3f}" in rows["adapted"]
        assert f"{printed['change']:+.1%}" in rows["change"]
    finally:
        server.close()


def test_a_server_installs_the_shipped_model_with_its_tuned_config(tmp_path: Path) -> None:
    from nextchar.core.default_model import load_default_model
    from nextchar.server.app import install_default_model

    registry = Registry(tmp_path)
    registry.load_all()
    install_default_model(registry)
    assert registry.default is not None
    shipped = load_default_model().adapt
    assert shipped.stats is not None and load_model(registry.default.path).adapt == shipped
