"""The model nextchar ships: a GRU trained by nextchar's own trainer on the bundled tinyshakespeare.

A server that starts on an empty registry serves this file at once (no training at
start), so the first thing a new user streams is predicted by a model that knows
English text. The corpus (tinyshakespeare: Karpathy's 1 MB of Shakespeare plays,
public domain) and the model are package data, in ``core/data/``.

Rebuild it: ``make default-model`` (python -m nextchar.core.default_model --out
core/data/default-model.npz). The config, the seed and the character budget are
fixed, there is no wall-clock budget, one BLAS thread sums every product in one
order, and a model file holds no save time (nextchar.core.modelfile) nor the
build's timings (dropped below): the rebuilt file has the recorded SHA256, on the
same BLAS kernel. Another kernel (another CPU, another OpenBLAS, or this machine
without its OPENBLAS_CORETYPE pin) rounds differently; its model is as good but
not the same bytes, and the build says so and fails.

Like every training run, the build ends by tuning the model's adaptation
(nextchar.core.adapt_tune.at_end_of_training, inside train()) and records it in the
file. ``--tune-only`` applies that same step to the shipped file's weights without
retraining (a minute, not several): the weights, history and summary stay, and the
metadata gains the tuned ``adapt`` and the summary its note, as a rebuild records them.
The shipped file was made so, from the weights built before adaptation existed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from contextlib import AbstractContextManager
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

from nextchar.core.adapt_tune import at_end_of_training
from nextchar.core.config import ModelConfig, TrainConfig, split_text
from nextchar.core.evaluate import evaluate
from nextchar.core.modelfile import ModelFile, load_model, save_model
from nextchar.core.train import train

CORPUS = "tinyshakespeare.txt"
MODEL = "default-model.npz"
MODEL_CONFIG = ModelConfig(cell="gru", hidden=256)
# 8M characters (8 epochs) with light dropout and a cosine decay: a few minutes of training.
TRAIN_CONFIG = TrainConfig(
    seq_len=64,
    batch=64,
    epochs=8,
    lr=3e-3,
    dropout=0.1,
    schedule="cosine",
    warmup_steps=50,
    min_lr=0.05,
    seed=0,
    log_every=100,
)
# a line of the validation split (the corpus's last 10%), which training never sees
PROBE_LINE = "You have taken it wiselier than I meant you should."
# of the file make default-model writes, on this machine's (pinned) OpenBLAS kernel; the shipped
# file is that build, and tests/test_default_model.py checks it
SHA256 = "029326be724031e51042de7ee558127fdb6f8f4ded23400ce6b0915e3e10b0c8"
# what differs from one build to the next: throughput and timings, kept out of the file
TIMINGS = ("chars_per_sec", "elapsed", "wall_seconds", "eta_seconds", "train_seconds")
SHIPPED_KEYS = ("corpus", "probe")  # what build() adds to the summary, after train()'s keys


def data_file(name: str) -> AbstractContextManager[Path]:
    """A path to one of the package's data files (a context: the package may be zipped)."""
    return as_file(files("nextchar.core").joinpath("data", name))


def load_default_model() -> ModelFile:
    """The shipped model, checked like every model file (nextchar.core.modelfile)."""
    with data_file(MODEL) as path:
        return load_model(path)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def corpus() -> tuple[str, str, str]:
    """The bundled corpus, and its training and validation splits as the build cuts them."""
    with data_file(CORPUS) as path:
        text = path.read_text(encoding="utf-8")
    train_text, val_text = split_text(text, TRAIN_CONFIG.val_fraction)
    if PROBE_LINE not in val_text or PROBE_LINE in train_text:
        raise ValueError(f"the probe line must be in the validation split only: {PROBE_LINE!r}")
    return text, train_text, val_text


def build(out: Path) -> str:
    """Train the default model from the bundled corpus, write it to out; returns the file's SHA-256."""
    text = corpus()[0]
    result = train(text, MODEL_CONFIG, TRAIN_CONFIG, on_progress=_show)
    summary: dict[str, Any] = {k: v for k, v in result.summary.items() if k not in TIMINGS}
    summary["corpus"] = f"{CORPUS} ({len(text):,} characters, public domain; bundled in nextchar.core)"
    summary["probe"] = {
        "text": PROBE_LINE,
        "bits_per_char": evaluate(result.model, PROBE_LINE)["bits_per_char"],
    }
    history = [{k: v for k, v in record.items() if k not in TIMINGS} for record in result.history]
    save_model(out, result.model, history=history, summary=summary, adapt=result.adapt)
    return file_sha256(out)


def tune_only(out: Path) -> str:
    """The shipped file with its adaptation tuned as train() tunes at its end, written to out
    (weights and history untouched); returns the file's SHA-256."""
    shipped = load_default_model()
    _, train_text, val_text = corpus()
    print("tuning the shipped model's adaptation on its validation split", flush=True)
    tuned = at_end_of_training(shipped.model, train_text, val_text)
    # the summary's keys in build()'s order: train()'s (its "adapt" last), then SHIPPED_KEYS
    summary = {k: v for k, v in shipped.summary.items() if k not in SHIPPED_KEYS}
    summary["adapt"] = tuned.note
    summary |= {k: shipped.summary[k] for k in SHIPPED_KEYS}
    save_model(out, shipped.model, history=shipped.history, summary=summary, adapt=tuned.config)
    return file_sha256(out)


def _show(record: dict[str, Any]) -> None:
    if record["kind"] == "epoch":
        print(
            f"epoch {record['epoch']}: train {record['train_bpc']:.3f}, validation {record['val_bpc']:.4f} "
            f"bits/char ({record['wall_seconds']:.0f} s)",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the model file")
    parser.add_argument(
        "--tune-only",
        action="store_true",
        help="do not retrain: tune the shipped weights' adaptation as a build does at its end",
    )
    args = parser.parse_args(argv)
    if os.environ.get("OPENBLAS_NUM_THREADS") != "1":
        print("warning: OPENBLAS_NUM_THREADS is not 1; the build may not be bit-identical", file=sys.stderr)
    digest = tune_only(args.out) if args.tune_only else build(args.out)
    if digest == SHA256:
        print(f"{args.out}: sha256 {digest}, bit-identical to the recorded build")
        return 0
    print(
        f"{args.out}: sha256 {digest} differs from the recorded {SHA256 or '(none)'}: another BLAS kernel "
        "or a changed trainer. To ship this build, set SHA256 in nextchar/core/default_model.py; "
        "otherwise restore the shipped file (git checkout core/data/).",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
