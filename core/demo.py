"""The notebook, done right: train the notebook's RNN on its text and predict each next character.

Run: ``make demo`` (or ``python -m nextchar.core.demo --out DIR``). It prints what the
notebook printed — the loss every 20 epochs and, for each character, the predicted
and actual next character — with two columns of predictions: one hidden state
carried through the whole text (what nextchar serves), and the state reset before
every character (what the notebook did, which cannot tell the l in "hel" from the
l in "ll" or "ld"). Losses are printed as the plot shows them: bits/char, epochs
from 1. Last, the notebook's own recipe is trained too and shown beside this one
(how well each learnt, how many characters each predicts). The loss curve is saved as a PNG.

The notebook's recipe was a tanh RNN (hidden 50), lr 0.01, elementwise clip 5,
sigmoid outputs with squared error, and hand-derived gradients that were wrong.
The default recipe here keeps the cell, size, lr, clip and epochs, and trains
softmax cross-entropy with Adam; ``--loss sigmoid_mse --optimizer sgd`` runs the
notebook's own recipe with correct gradients, to compare.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from nextchar.core.config import ModelConfig, TrainConfig
from nextchar.core.history import export_history
from nextchar.core.inference import advance, feed, initial_probs
from nextchar.core.model import CharRNN
from nextchar.core.train import train

NOTEBOOK_TEXT = "hello world hello world hello world"
NOTEBOOK_RECIPE = ("sigmoid_mse", "sgd")  # its loss and optimizer (its gradients were wrong; these are not)
LOSS_NAMES = {"ce": "softmax cross-entropy", "sigmoid_mse": "sigmoid + squared error"}


def notebook_configs(
    loss: str = "ce", optimizer: str = "adam", epochs: int = 100, seed: int = 0
) -> tuple[ModelConfig, TrainConfig]:
    """The notebook's setup: rnn H=50, lr 0.01, clip +-5, the whole text as one BPTT window."""
    model = ModelConfig(cell="rnn", hidden=50, layers=1, loss=loss)
    config = TrainConfig(
        seq_len=len(NOTEBOOK_TEXT) - 1,
        batch=1,
        epochs=epochs,
        lr=0.01,
        optimizer=optimizer,
        clip="value",
        clip_value=5.0,
        val_fraction=0.0,
        log_every=1,
        seed=seed,
    )
    return model, config


def stateful_predictions(model: CharRNN, text: str) -> str:
    """The prediction after each character, one hidden state carried through the text."""
    out = feed(model, model.initial_state(1)[0], initial_probs(model), model.vocab.encode(text))
    return model.vocab.decode(out.top_index[:, 0, 0])


def stateless_predictions(model: CharRNN, text: str) -> str:
    """The notebook's demo: every character fed to a fresh zero state, as N one-character sessions."""
    idx = model.vocab.encode(text)
    start = np.tile(initial_probs(model), (len(idx), 1))
    out = advance(model, idx[None, :], [1] * len(idx), model.initial_state(len(idx)), start, 1, False)
    return model.vocab.decode(out.top_index[0, :, 0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="where the loss plot goes")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--loss", choices=["ce", "sigmoid_mse"], default="ce")
    parser.add_argument("--optimizer", choices=["sgd", "adagrad", "adam"], default="adam")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model_config, config = notebook_configs(args.loss, args.optimizer, args.epochs, args.seed)
    print("Training the RNN...")
    print("Original sequence:", NOTEBOOK_TEXT)
    print("\nTraining Progress:")

    def report(record: dict[str, object]) -> None:
        epoch = int(record["epoch"])  # type: ignore[call-overload]
        if record["kind"] == "epoch" and (epoch == 1 or epoch % 20 == 0 or epoch == config.epochs):
            print(
                f"Epoch {epoch}: {record['train_bpc']:.3f} bits/char (training loss {record['train_loss']:.4f})"
            )

    result = train(NOTEBOOK_TEXT, model_config, config, on_progress=report)
    model = result.model
    stateful = stateful_predictions(model, NOTEBOOK_TEXT)
    stateless = stateless_predictions(model, NOTEBOOK_TEXT)

    print(
        "\nPredicting each next character (stateful: one hidden state carried; stateless: reset each time):"
    )
    hits = np.zeros(2, dtype=int)
    for i in range(len(NOTEBOOK_TEXT) - 1):
        actual = NOTEBOOK_TEXT[i + 1]
        marks = [("ok" if p == actual else "WRONG") for p in (stateful[i], stateless[i])]
        hits += [stateful[i] == actual, stateless[i] == actual]
        print(
            f"Input: {NOTEBOOK_TEXT[i]!r} -> stateful: {stateful[i]!r} {marks[0]:5}  "
            f"stateless: {stateless[i]!r} {marks[1]:5}  (Actual: {actual!r})"
        )
    n = len(NOTEBOOK_TEXT) - 1
    print(f"\nCorrect: stateful {hits[0]}/{n}, stateless {hits[1]}/{n}")

    print("\nThe notebook's recipe beside this one (same cell, size, lr, clip, epochs and seed):")
    chosen = (args.loss, args.optimizer)
    for loss, optimizer in (NOTEBOOK_RECIPE, chosen if chosen != NOTEBOOK_RECIPE else ("ce", "adam")):
        ran = (
            result
            if (loss, optimizer) == chosen
            else train(NOTEBOOK_TEXT, *notebook_configs(loss, optimizer, args.epochs, args.seed))
        )
        guesses = stateful_predictions(ran.model, NOTEBOOK_TEXT)[:-1]  # the last one has nothing to match
        right = sum(p == a for p, a in zip(guesses, NOTEBOOK_TEXT[1:], strict=True))
        name = "the notebook's" if (loss, optimizer) == NOTEBOOK_RECIPE else "the demo's"
        print(
            f"  {name:<15} {LOSS_NAMES[loss]}, {optimizer}: {ran.history[-1]['train_bpc']:.3f} bits/char "
            f"after {args.epochs} epochs, {right}/{n} next characters right"
        )

    png = args.out / "loss.png"
    export_history(result.history, "png", png, title="The notebook model: bits/char per epoch")
    print(f"Loss curve saved to {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
