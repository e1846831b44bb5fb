"""Model files: one .npz (no pickle) holding the parameters and a JSON metadata record.

The metadata carries everything needed to rebuild and trust the model: format
version, config, vocabulary, training summary (with the whole TrainConfig the run
used: ``ModelFile.train_config``), loss history, and a SHA-256 over the parameters.
Writes go to a temporary file in the same directory and are renamed into place, so
a crash mid-save never leaves a half-written model under the real name. The same
model and metadata always give the same bytes (the archive's timestamps are fixed),
so a file can be rebuilt bit for bit and compared by its hash. Loading checks
everything and raises ModelFileError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from nextchar.core.adapt import AdaptConfig, rule
from nextchar.core.atomic import atomic_write
from nextchar.core.config import ModelConfig, TrainConfig, from_record
from nextchar.core.model import CharRNN, Params, param_shapes
from nextchar.core.vocab import Vocab

FORMAT = "nextchar.model"
FORMAT_VERSION = 1
META_KEY = "__meta__"
PARAM_PREFIX = "param:"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest a zip entry can say: no build time in the file


class ModelFileError(Exception):
    """A model file is missing, unreadable, corrupt or inconsistent; the message says which and why."""


@dataclass
class ModelFile:
    model: CharRNN
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def train_config(self) -> TrainConfig | None:
        """The TrainConfig the model was trained with, or None when the file does not say.

        A file written before a setting existed lacks its key; it was trained with what
        is that setting's default now (every new setting defaults to "off")."""
        recorded = self.summary.get("config")
        return from_record(TrainConfig, recorded) if isinstance(recorded, dict) else None

    @property
    def adapt(self) -> AdaptConfig:
        """How sessions of this model adapt: the recorded, tuned config (checked at load), or the
        defaults (plain SGD) for a file written before adaptation existed."""
        return AdaptConfig.from_dict(self.meta.get("adapt"))


@dataclass(frozen=True)
class ModelPayload:
    """A model as plain data: its config and vocabulary as a model file's metadata records them,
    and its parameters. The one codec between a CharRNN and what leaves the process (a model
    file here, a trainer's pipe to its pool), so every way a model travels rebuilds it alike;
    plain dicts, a str and arrays pickle without any class of ours."""

    config: dict[str, Any]
    vocab: str
    params: Params

    @classmethod
    def of(cls, model: CharRNN) -> ModelPayload:
        return cls(model.config.to_dict(), model.vocab.chars, model.params)

    def header(self) -> tuple[ModelConfig, Vocab]:
        """The config and vocabulary; TypeError, ValueError or KeyError when they are not valid."""
        return ModelConfig(**self.config), Vocab(self.vocab)

    def model(self) -> CharRNN:
        config, vocab = self.header()
        return CharRNN(config, vocab, {k: np.asarray(v) for k, v in self.params.items()})


def checksum(params: Params) -> str:
    digest = hashlib.sha256()
    for name in sorted(params):
        array = np.ascontiguousarray(params[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def save_model(
    path: str | os.PathLike[str],
    model: CharRNN,
    *,
    history: list[dict[str, Any]] | None = None,
    summary: dict[str, Any] | None = None,
    adapt: AdaptConfig | None = None,
) -> None:
    """Write model atomically (see nextchar.core.atomic): a crash mid-save leaves the old file.

    adapt: its tuned adaptation (nextchar.core.adapt_tune); without one the metadata has no
    such key, so a file saved as before is the same bytes as before."""
    payload = ModelPayload.of(model)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": payload.config,
        "vocab": payload.vocab,
        "summary": summary or {},
        "history": history or [],
        "checksum": checksum(model.params),
    }
    if adapt is not None:
        meta["adapt"] = adapt.to_dict()
    arrays: dict[str, np.ndarray] = {PARAM_PREFIX + k: v for k, v in model.params.items()}
    arrays[META_KEY] = np.frombuffer(json.dumps(meta, allow_nan=True).encode(), dtype=np.uint8)
    with atomic_write(path) as f:
        write_npz(f, arrays)


def write_npz(f: IO[bytes], arrays: dict[str, np.ndarray]) -> None:
    """np.savez's archive (np.load reads it), but deterministic: np.savez stamps each entry
    with the current time, so saving the same model twice gave two different files."""
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_DATE)
            with archive.open(info, "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, np.asanyarray(array), allow_pickle=False)


def load_model(path: str | os.PathLike[str]) -> ModelFile:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as exc:
        raise ModelFileError(f"{path}: not a readable model file (truncated or corrupted?): {exc}") from exc
    meta = _read_meta(path, arrays.pop(META_KEY, None))
    params = {k.removeprefix(PARAM_PREFIX): v for k, v in arrays.items() if k.startswith(PARAM_PREFIX)}
    try:
        config, vocab = ModelPayload(meta["config"], meta["vocab"], params).header()
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelFileError(f"{path}: invalid config or vocab in metadata: {exc}") from exc
    _check_params(path, config, vocab, params)
    if checksum(params) != meta.get("checksum"):
        raise ModelFileError(f"{path}: checksum mismatch: the parameters were modified or corrupted")
    model = CharRNN(config, vocab, params)
    try:
        rule(model, AdaptConfig.from_dict(meta.get("adapt")))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModelFileError(f"{path}: invalid adaptation config in metadata: {exc}") from exc
    return ModelFile(model, meta.get("history", []), meta.get("summary", {}), meta)


def _read_meta(path: Path, raw: np.ndarray | None) -> dict[str, Any]:
    if raw is None:
        raise ModelFileError(f"{path}: no metadata record; not a nextchar model file")
    try:
        meta = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: metadata is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a nextchar model file (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: format version {meta.get('format_version')!r} is not supported "
            f"(this nextchar reads version {FORMAT_VERSION})"
        )
    return meta


def _check_params(path: Path, config: ModelConfig, vocab: Vocab, params: Params) -> None:
    expected = param_shapes(config, vocab.size)
    missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
    if missing or extra:
        raise ModelFileError(
            f"{path}: parameters do not match the config: missing {missing}, unexpected {extra}"
        )
    for name, shape in expected.items():
        array = params[name]
        if array.shape != shape:
            raise ModelFileError(f"{path}: {name} has shape {array.shape}, config implies {shape}")
        if array.dtype != np.dtype(config.dtype):
            raise ModelFileError(f"{path}: {name} has dtype {array.dtype}, config says {config.dtype}")
        if not np.all(np.isfinite(array)):
            raise ModelFileError(f"{path}: {name} contains NaN or infinite values")
