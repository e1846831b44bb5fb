"""Loss-history export: CSV, JSON and a labelled PNG plot, each written atomically.

A history is the list of progress records a training run produced (see
nextchar.core.train): per-epoch records carry validation loss, per-step records
only training loss. The plot is the notebook's figure, with validation added.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

from nextchar.core.atomic import atomic_write

COLUMNS = (
    "kind",
    "epoch",
    "step",
    "chars",
    "train_loss",
    "train_bpc",
    "val_loss",
    "val_bpc",
    "chars_per_sec",
    "elapsed",
    "wall_seconds",
    "lr",
)
FORMATS = ("csv", "json", "png")


def to_csv(history: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in history:
        writer.writerow({k: "" if record.get(k) is None else record.get(k) for k in COLUMNS})
    return buf.getvalue()


def to_json(history: list[dict[str, Any]]) -> str:
    return json.dumps([{k: record.get(k) for k in COLUMNS} for record in history], indent=1)


def plot_png(history: list[dict[str, Any]], title: str = "Training loss") -> bytes:
    """Train and validation loss against training step, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    steps = [r for r in history if r["kind"] == "step"]
    epochs = [r for r in history if r["kind"] == "epoch"]
    train = steps or epochs
    ax.plot([r["step"] for r in train], [r["train_loss"] for r in train], label="train loss")
    val = [r for r in epochs if r.get("val_loss") is not None]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_title(title)
    ax.set_xlabel("step (one update per batch x seq_len characters)")
    ax.set_ylabel("loss")
    ax.grid(True)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def export_history(
    history: list[dict[str, Any]],
    fmt: str,
    path: str | os.PathLike[str],
    title: str = "Training loss",
) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "png":
        data = plot_png(history, title)
    else:
        data = (to_csv(history) if fmt == "csv" else to_json(history)).encode()
    with atomic_write(path) as f:
        f.write(data)
