"""Model files: save -> load gives identical predictions; damaged files give a clear, named error."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nextchar.core.config import ModelConfig, TrainConfig
from nextchar.core.model import CharRNN
from nextchar.core.modelfile import META_KEY, ModelFileError, checksum, load_model, save_model
from nextchar.core.train import train
from nextchar.core.vocab import Vocab


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, CharRNN]:
    model = CharRNN.create(
        ModelConfig(cell="lstm", hidden=12, layers=2), Vocab.from_text("hello world"), seed=2
    )
    path = tmp_path / "m.npz"
    save_model(path, model, history=[{"kind": "epoch", "train_loss": 1.0}], summary={"val_bpc": 2.0})
    return path, model


def test_roundtrip_gives_identical_predictions(saved: tuple[Path, CharRNN]) -> None:
    path, model = saved
    loaded = load_model(path)
    idx = model.vocab.encode("hello world")
    a = model.forward(idx.reshape(-1, 1), model.initial_state(1))[1]
    b = loaded.model.forward(idx.reshape(-1, 1), loaded.model.initial_state(1))[1]
    assert np.array_equal(a, b)
    assert loaded.model.vocab == model.vocab
    assert loaded.history == [{"kind": "epoch", "train_loss": 1.0}]
    assert loaded.summary == {"val_bpc": 2.0}
    assert not list(path.parent.glob(".*.tmp")), "no temp file left behind"


def _rewrite(path: Path, change: dict[str, np.ndarray]) -> None:
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays.update(change)
    np.savez(path, **arrays)


def test_truncated_file(saved: tuple[Path, CharRNN]) -> None:
    path, _ = saved
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ModelFileError, match=rf"{path.name}: not a readable model file"):
        load_model(path)


def test_corrupted_parameters_fail_the_checksum(saved: tuple[Path, CharRNN]) -> None:
    path, model = saved
    _rewrite(path, {"param:Why": model.params["Why"] + 1e-3})
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        load_model(path)


def test_shape_mismatch_names_the_parameter(saved: tuple[Path, CharRNN]) -> None:
    path, _ = saved
    _rewrite(path, {"param:l1.Whh": np.zeros((3, 3), dtype=np.float32)})
    with pytest.raises(ModelFileError, match=r"l1\.Whh has shape \(3, 3\)"):
        load_model(path)


def test_wrong_format_version(saved: tuple[Path, CharRNN]) -> None:
    path, _ = saved
    with np.load(path) as npz:
        meta = json.loads(npz[META_KEY].tobytes())
    meta["format_version"] = 99
    _rewrite(path, {META_KEY: np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)})
    with pytest.raises(ModelFileError, match="format version 99 is not supported"):
        load_model(path)


def test_not_a_model_and_missing_file(tmp_path: Path) -> None:
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(ModelFileError, match="no metadata"):
        load_model(other)
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model(tmp_path / "absent.npz")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, allow_pickle=True, **{META_KEY: np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ModelFileError):
        load_model(pickled)
    assert zipfile.is_zipfile(pickled)


def test_failed_save_keeps_the_previous_file(
    saved: tuple[Path, CharRNN], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, model = saved
    before = path.read_bytes()

    def explode(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np.lib.format, "write_array", explode)
    with pytest.raises(OSError, match="disk full"):
        save_model(path, model)
    assert path.read_bytes() == before
    assert not list(path.parent.glob(".*.tmp"))


def test_the_same_model_always_gives_the_same_bytes(saved: tuple[Path, CharRNN], tmp_path: Path) -> None:
    """No save time in the archive: a model rebuilt bit for bit has the file's hash too."""
    path, model = saved
    again = tmp_path / "again.npz"
    save_model(again, model, history=[{"kind": "epoch", "train_loss": 1.0}], summary={"val_bpc": 2.0})
    assert again.read_bytes() == path.read_bytes()


def test_the_file_records_the_whole_train_config(tmp_path: Path) -> None:
    config = TrainConfig(
        seq_len=8, batch=2, epochs=1, dropout=0.25, weight_decay=0.01, schedule="cosine", warmup_steps=3
    )
    result = train("abcdefgh" * 20, ModelConfig(cell="gru", hidden=8, layers=2), config)
    save_model(tmp_path / "m.npz", result.model, history=result.history, summary=result.summary)
    assert load_model(tmp_path / "m.npz").train_config == config


def test_a_file_written_before_regularisation_existed_still_loads(tmp_path: Path) -> None:
    """Format 1 as the first nextchar wrote it: np.savez, a summary whose train config has
    no dropout, weight decay or schedule. It loads, and those read as off."""
    model = CharRNN.create(ModelConfig(cell="gru", hidden=6), Vocab.from_text("abc"), seed=1)
    old_train_config = {
        "seq_len": 64, "batch": 64, "epochs": 10, "lr": 0.002, "optimizer": "adam", "clip": "norm",
        "clip_value": 5.0, "val_fraction": 0.1, "patience": 0, "seed": 0, "log_every": 100,
        "max_chars": 0, "max_seconds": 0.0,
    }  # fmt: skip
    meta = {
        "format": "nextchar.model",
        "format_version": 1,
        "config": {"cell": "gru", "hidden": 6, "layers": 1, "loss": "ce", "dtype": "float32"},
        "vocab": model.vocab.chars,
        "summary": {"val_bpc": 2.5, "config": old_train_config},
        "history": [{"kind": "epoch", "epoch": 1, "elapsed": 1.0}],
        "checksum": checksum(model.params),
    }
    arrays: dict[str, Any] = {f"param:{k}": v for k, v in model.params.items()}
    arrays[META_KEY] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(tmp_path / "old.npz", **arrays)
    loaded = load_model(tmp_path / "old.npz")
    for name, value in model.params.items():
        assert np.array_equal(loaded.model.params[name], value)
    assert loaded.train_config == TrainConfig()
    assert loaded.train_config is not None and loaded.train_config.dropout == 0.0
