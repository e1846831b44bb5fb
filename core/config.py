"""The model and training configurations: frozen, validated, and free of NumPy.

These are the settings a client sends and a trainer runs with, so they live apart
from the arithmetic: ``nextchar.client`` imports this module without loading NumPy,
and the command line builds its ``train`` options from these fields (each field's
``help`` metadata is its option's help text). Everything here is plain Python.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

CELLS = ("rnn", "gru", "lstm")  # nextchar.core.cells implements exactly these
LOSSES = ("ce", "sigmoid_mse")  # nextchar.core.losses implements exactly these
OPTIMIZERS = ("sgd", "adagrad", "adam")
CLIPS = ("none", "value", "norm")
DTYPES = ("float32", "float64")
SCHEDULES = ("constant", "cosine")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def require(ok: bool, name: str, rule: str, value: object) -> None:
    """Raise ValueError naming the field, its rule and the value it got."""
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    cell: str = field(default="rnn", metadata=_help("Recurrent cell: rnn (tanh), gru or lstm."))
    hidden: int = field(default=256, metadata=_help("Hidden units per layer, 1..4096."))
    layers: int = field(default=1, metadata=_help("Stacked recurrent layers, 1..3."))
    loss: str = field(
        default="ce", metadata=_help("ce (softmax cross-entropy) or sigmoid_mse (the notebook's).")
    )
    # float64 is for gradient checks; serving and training run float32
    dtype: str = field(default="float32", metadata=_help("float32, or float64 for gradient checks."))

    def __post_init__(self) -> None:
        require(self.cell in CELLS, "cell", f"one of {list(CELLS)}", self.cell)
        require(1 <= self.hidden <= 4096, "hidden", "in 1..4096", self.hidden)
        require(1 <= self.layers <= 3, "layers", "in 1..3", self.layers)
        require(self.loss in LOSSES, "loss", f"one of {list(LOSSES)}", self.loss)
        require(self.dtype in DTYPES, "dtype", f"one of {list(DTYPES)}", self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    seq_len: int = field(default=64, metadata=_help("BPTT window T, 1..10000."))
    batch: int = field(default=64, metadata=_help("Parallel streams B; one update per B*T chars."))
    epochs: int = field(default=10, metadata=_help("Passes over the training text."))
    lr: float = field(default=2e-3, metadata=_help("Learning rate, (0, 10]."))
    optimizer: str = field(default="adam", metadata=_help("adam, adagrad or sgd."))
    clip: str = field(
        default="norm", metadata=_help("Gradient clipping: norm (global), value (the notebook's) or none.")
    )
    clip_value: float = field(default=5.0, metadata=_help("Clip threshold, > 0."))
    # the tail of the text, never seen in training
    val_fraction: float = field(default=0.1, metadata=_help("Held-out tail for validation, [0, 0.5)."))
    patience: int = field(
        default=0, metadata=_help("Epochs without a better validation loss before stopping; 0 = off.")
    )
    seed: int = field(default=0, metadata=_help("Seed of the initialisation; same seed, same weights."))
    log_every: int = field(default=100, metadata=_help("Steps between progress records."))
    max_chars: int = field(default=0, metadata=_help("Training-character budget; 0 = epochs decide."))
    max_seconds: float = field(default=0.0, metadata=_help("Wall-clock budget in seconds; 0 = none."))
    # The regularisers and the schedule come last: the wire message's fields follow this order.
    # All off by default, so a config without them trains exactly as before they existed.
    dropout: float = field(
        default=0.0,
        metadata=_help("Dropout on the inputs of upper layers and of the read-out, [0, 1); training only."),
    )
    weight_decay: float = field(
        default=0.0,
        metadata=_help("Decoupled weight decay of the weight matrices per step, times lr (AdamW); >= 0."),
    )
    schedule: str = field(
        default="constant",
        metadata=_help("Learning rate after warm-up: constant, or cosine down to min_lr over the budget."),
    )
    warmup_steps: int = field(
        default=0, metadata=_help("Steps of linear warm-up from lr/warmup_steps to lr.")
    )
    min_lr: float = field(default=0.0, metadata=_help("Where cosine ends, as a fraction of lr, [0, 1]."))

    def __post_init__(self) -> None:
        require(1 <= self.seq_len <= 10_000, "seq_len", "in 1..10000", self.seq_len)
        require(1 <= self.batch <= 4096, "batch", "in 1..4096", self.batch)
        require(1 <= self.epochs <= 1_000_000, "epochs", "in 1..1000000", self.epochs)
        require(0 < self.lr <= 10 and math.isfinite(self.lr), "lr", "in (0, 10]", self.lr)
        require(self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}", self.optimizer)
        require(self.clip in CLIPS, "clip", f"one of {CLIPS}", self.clip)
        require(0 < self.clip_value < math.inf, "clip_value", "positive", self.clip_value)
        require(0 <= self.val_fraction < 0.5, "val_fraction", "in [0, 0.5)", self.val_fraction)
        require(self.patience >= 0, "patience", ">= 0", self.patience)
        require(self.log_every >= 1, "log_every", ">= 1", self.log_every)
        require(self.max_chars >= 0, "max_chars", ">= 0", self.max_chars)
        require(self.max_seconds >= 0, "max_seconds", ">= 0", self.max_seconds)
        require(0 <= self.dropout < 1, "dropout", "in [0, 1)", self.dropout)
        wd = self.weight_decay
        require(0 <= wd < math.inf, "weight_decay", ">= 0 and finite", wd)
        require(self.lr * wd < 1, "weight_decay", f"below 1/lr ({1 / self.lr:g}): lr * weight_decay >= 1", wd)
        require(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}", self.schedule)
        require(self.warmup_steps >= 0, "warmup_steps", ">= 0", self.warmup_steps)
        require(0 <= self.min_lr <= 1, "min_lr", "in [0, 1]", self.min_lr)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Config = TypeVar("Config", ModelConfig, TrainConfig)


def from_record(kind: type[Config], recorded: Mapping[str, Any]) -> Config:
    """The config a stored record (a model file's, a job's) describes. A record written before a
    setting existed lacks its key and gets the default, which is "off" for every setting added
    since; a key this version does not know is passed over. Validated like any other."""
    known = {f.name for f in fields(kind)}
    return kind(**{k: v for k, v in recorded.items() if k in known})


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(training text, validation text): the validation split is the text's tail."""
    n_val = int(len(text) * val_fraction)
    return text[: len(text) - n_val], text[len(text) - n_val :]


def check_text(text: str, config: TrainConfig) -> None:
    """Raise ValueError when the text cannot fill one (T, B) step after the validation split."""
    check_length(len(text), config)


def check_length(chars: int, config: TrainConfig) -> None:
    """check_text for a text of chars characters (one too big to hold in memory to ask)."""
    n_val = int(chars * config.val_fraction)  # as split_text cuts it
    n_train = chars - n_val
    need = config.batch * config.seq_len + 1
    if n_train < need:
        raise ValueError(
            f"text: {n_train} training characters cannot fill one step of "
            f"batch {config.batch} x seq_len {config.seq_len} (needs {need}); "
            "give more text or lower batch/seq_len"
        )
    if config.val_fraction > 0 and n_val < 2:
        raise ValueError("text: too short to hold out a validation split; set val_fraction 0")


@dataclass(frozen=True)
class Sampling:
    """How a generation draws each character (nextchar.core.inference.sample).

    Temperature 0 (or top_p 0: a nucleus of no mass keeps only the likeliest) is greedy
    decoding: the most probable character every time, no randomness.
    """

    temperature: float = 1.0  # p ** (1/temperature), renormalised: below 1 sharper, above flatter
    top_k: int = 0  # draw among the k likeliest; 0 = off
    top_p: float = 1.0  # nucleus: the smallest set holding this much probability; 1 = off

    def __post_init__(self) -> None:
        t = self.temperature
        require(0 <= t <= 100 and math.isfinite(t), "temperature", "in [0, 100] (0 = greedy)", t)
        require(self.top_k >= 0, "top_k", ">= 0 (0 = off)", self.top_k)
        require(0 <= self.top_p <= 1, "top_p", "in [0, 1] (0 = greedy, 1 = off)", self.top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_p == 0
