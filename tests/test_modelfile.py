"""Model files: save -> load gives identical predictions; damaged files give a clear, named error."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from nextchar.core.config import ModelConfig
from nextchar.core.model import CharRNN
from nextchar.core.modelfile import META_KEY, ModelFileError, load_model, save_model
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

    monkeypatch.setattr(np, "savez", explode)
    with pytest.raises(OSError, match="disk full"):
        save_model(path, model)
    assert path.read_bytes() == before
    assert not list(path.parent.glob(".*.tmp"))
