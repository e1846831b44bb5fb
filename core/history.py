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
from typing import TYPE_CHECKING, Any

from nextchar.core.atomic import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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


def plot_png(history: list[dict[str, Any]], title: str = "Training") -> bytes:
    """Train and validation bits/char against epochs, as PNG bytes (loss_figure's)."""
    import matplotlib.pyplot as plt

    fig = loss_figure(history, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def loss_figure(history: list[dict[str, Any]], title: str = "Training") -> Figure:
    """Train and validation bits/char against epochs.

    One point per epoch, marked, so a short run reads as its few epochs rather than a
    straight line between two step records; the step records (every log_every steps)
    are drawn faintly between them at their fraction of an epoch, when any falls between
    two epochs' ends (a line hidden under the epochs' would only be a legend entry).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    epochs = [r for r in history if r["kind"] == "epoch"]
    steps = [r for r in history if r["kind"] == "step"]
    per_epoch = epochs[0]["chars"] / epochs[0]["epoch"] if epochs and epochs[0]["chars"] else 0
    ends = {r["step"] for r in epochs}
    if any(r["step"] not in ends for r in steps) and per_epoch:
        xs = [r["chars"] / per_epoch for r in steps]
        ax.plot(xs, [r["train_bpc"] for r in steps], color="tab:blue", alpha=0.35, label="train (steps)")
    if epochs:
        x = [r["epoch"] for r in epochs]
        ax.plot(x, [r["train_bpc"] for r in epochs], "o-", color="tab:blue", label="train (epoch mean)")
    elif steps:  # no epoch finished: the step records are all there is
        ax.plot([r["step"] for r in steps], [r["train_bpc"] for r in steps], "o-", label="train")
    val = [r for r in epochs if r.get("val_bpc") is not None]
    if val:
        ax.plot(
            [r["epoch"] for r in val],
            [r["val_bpc"] for r in val],
            "s-",
            color="tab:orange",
            label="validation",
        )
    ax.set_title(title)
    ax.set_xlabel("epoch" if epochs else "step")
    ax.set_ylabel("bits per character")
    ax.grid(True)
    ax.legend()
    return fig


def export_history(
    history: list[dict[str, Any]],
    fmt: str,
    path: str | os.PathLike[str],
    title: str = "Training",
) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "png":
        data = plot_png(history, title)
    else:
        data = (to_csv(history) if fmt == "csv" else to_json(history)).encode()
    with atomic_write(path) as f:
        f.write(data)
