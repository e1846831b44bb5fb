"""What a training run is about to cost, said before it starts: ``nextchar train``'s first lines.

A big model (``--hidden 4096``) says nothing for its first progress record, which comes
only after ``log_every`` steps (45 s at that size); a small file with the default
batch 64 x seq 64 makes an epoch of a handful of steps, which learns little. The
parameter count, a memory estimate and the steps an epoch come from the configs and
the text's length alone, so they are known at once.
"""

from __future__ import annotations

import itertools
import math

from nextchar.client.texts import TextFiles
from nextchar.core.config import ModelConfig, TrainConfig, check_length

FEW_STEPS = 30  # an epoch of fewer optimizer steps than this earns a hint
BIG_MODEL = 5_000_000  # parameters from which a step is slow enough to mention when progress comes
SAMPLE_PIECES = 16  # pieces of a file (64 K characters each) its vocabulary is estimated from


def plan(source: str | TextFiles, name: str, model: ModelConfig, config: TrainConfig) -> list[str]:
    """The lines to print before training ``name`` on source (a text or its files); a ValueError
    for a text too short to train on (core's own rule), before anything is said about it."""
    from nextchar.core.cells import CELLS
    from nextchar.core.model import param_shapes

    pieces = [source] if isinstance(source, str) else itertools.islice(source.pieces(), SAMPLE_PIECES)
    vocab = len(set().union(*map(set, pieces))) + 1  # + the unknown-character slot
    chars = len(source) if isinstance(source, str) else source.count()
    check_length(chars, config)
    params = sum(math.prod(shape) for shape in param_shapes(model, vocab).values())
    itemsize = 4 if model.dtype == "float32" else 8
    gates = CELLS[model.cell].gates
    # weights, gradients, Adam's two moments and the best epoch's copy; then one window's
    # activations: every layer's gates and states, and the logits and their gradient
    held = params * 5 + config.seq_len * config.batch * (
        model.layers * (gates + 2) * model.hidden + 2 * vocab
    )
    n_train = chars - int(chars * config.val_fraction)  # as core.config.split_text cuts it
    steps = math.ceil(max((n_train - 1) // config.batch, 0) / config.seq_len)
    lines = [
        f"model {name}: {model.cell} {model.layers}x{model.hidden}, {params:,} parameters, "
        f"about {_size(held * itemsize)} to train; {steps:,} steps an epoch of {n_train:,} characters"
    ]
    if params >= BIG_MODEL:
        lines.append(
            f"a step of a model this size is slow: the first progress (and ETA) comes after "
            f"{config.log_every} steps; --log-every sets how many"
        )
    if 0 < steps < FEW_STEPS:
        lines.append(
            f"hint: an epoch is only {steps} steps (batch {config.batch} x seq-len {config.seq_len} "
            f"over {n_train:,} characters); a smaller --batch or --seq-len makes more updates an epoch"
        )
    return lines


def _size(n_bytes: float) -> str:
    for unit in ("bytes", "KB", "MB"):
        if n_bytes < 1000:
            return f"{n_bytes:.0f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.1f} GB"
