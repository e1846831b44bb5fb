"""Checkpoints: everything a training run needs to go on exactly where it stopped.

A checkpoint is taken between two steps. It holds the weights, the optimizer's
moments and step count, the dropout generator's state, the hidden states carried
into the next window, where the run is (epoch, window, step, characters), its
meters and history, and the best validation so far with its weights. Nothing a run
depends on lives outside it, so a run resumed from a checkpoint ends with weights
bit-identical to a run never interrupted (same machine and BLAS kernel; a wall-clock
budget, ``max_seconds``, is the one thing a pause can move).

One ``.npz`` file: the arrays under prefixed names (``p.`` weights, ``m.``/``v.``
optimizer moments, ``best.`` best weights, ``state``) and the rest as JSON in
``meta``; written atomically, never pickled.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from nextchar.core.atomic import atomic_write

FORMAT = 1


@dataclass
class Checkpoint:
    arrays: dict[str, np.ndarray]  # "p.<param>", "m.<param>", "v.<param>", "best.<param>", "state"
    meta: dict[str, Any]  # JSON: position, meters, history, generator state, configs

    def group(self, prefix: str) -> dict[str, np.ndarray]:
        """The arrays saved under prefix ("p." -> the weights by name)."""
        return {k[len(prefix) :]: v for k, v in self.arrays.items() if k.startswith(prefix)}

    @property
    def position(self) -> str:
        """Where the run stands, for logs: "epoch 3, step 1200"."""
        return f"epoch {self.meta['epoch']}, step {self.meta['step']}"


def save(path: str | os.PathLike[str], checkpoint: Checkpoint) -> None:
    meta = json.dumps({"format": FORMAT, **checkpoint.meta})
    buf = io.BytesIO()
    named: dict[str, Any] = {"meta": np.frombuffer(meta.encode(), dtype=np.uint8), **checkpoint.arrays}
    np.savez(buf, **named)
    with atomic_write(path) as f:
        f.write(buf.getvalue())


def meta_of(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint's meta alone (its arrays stay on disk): where the run stood."""
    with np.load(path, allow_pickle=False) as data:
        return dict(json.loads(data["meta"].tobytes().decode()))


def load(path: str | os.PathLike[str]) -> Checkpoint:
    """The checkpoint save wrote; ValueError when the file is not one."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: not a checkpoint ({exc})") from None
    meta = json.loads(arrays.pop("meta").tobytes().decode()) if "meta" in arrays else {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')!r}, this trainer reads {FORMAT}")
    return Checkpoint(arrays, meta)
