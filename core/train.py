"""Truncated-BPTT training over a corpus of any size, with B parallel streams.

The training text is cut into B contiguous streams; each step trains on the next T
characters of every stream, starting from the hidden state the previous step ended
in (reset at each epoch). Validation streams the held-out tail through one carried
state, so its bits/char is what a session on the server would see.

Regularisation and schedule (all off by default): dropout masks drawn each step
from the trainer's own seeded generator, decoupled weight decay in the optimizer,
and the learning rate of nextchar.core.optim.learning_rate (warm-up, then constant
or cosine over the character budget).

Run: ``nextchar train --local FILE`` (or through the service: ``nextchar train FILE``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nextchar.core.config import ModelConfig, TrainConfig, check_text, split_text
from nextchar.core.evaluate import evaluate_indices
from nextchar.core.memory import keep_freed_memory
from nextchar.core.model import CharRNN, dropout_masks
from nextchar.core.optim import Optimizer, clip_grads, learning_rate
from nextchar.core.vocab import Vocab

ProgressFn = Callable[[dict[str, Any]], None]
StopFn = Callable[[], bool]
LN2 = math.log(2)
# A step loss this many times the first step's means the run blew up: tanh and softmax
# keep the loss finite long after the weights have gone (lr 10 with Adam: 4.2 -> 75 nats).
DIVERGED = 4.0
DROPOUT_STREAM = 1  # the dropout generator's seed is (seed, this): a stream apart from the initialisation's


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing from the run should be kept."""


class TrainingCancelled(RuntimeError):
    """should_stop() asked the run to end; nothing from the run should be kept."""


@dataclass
class TrainResult:
    model: CharRNN
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def train(
    text: str,
    model_config: ModelConfig,
    config: TrainConfig,
    *,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> TrainResult:
    """Train a new model on text; the best-validation weights are returned (the last, if no validation).

    Same seed, data and machine give bit-identical weights: the only randomness is
    the seeded initialisation and, with dropout, the masks, drawn from a generator
    seeded with the same seed.
    """
    check_text(text, config)
    train_text, val_text = split_text(text, config.val_fraction)
    model = CharRNN.create(model_config, Vocab.from_text(text), seed=config.seed)
    return Trainer(model, config, on_progress, should_stop).run(
        model.vocab.encode(train_text), model.vocab.encode(val_text)
    )


class Trainer:
    """One training run: owns the optimizer, the carried states and the history."""

    def __init__(
        self,
        model: CharRNN,
        config: TrainConfig,
        on_progress: ProgressFn | None,
        should_stop: StopFn | None,
    ) -> None:
        keep_freed_memory()
        self.model, self.config = model, config
        self.on_progress = on_progress or (lambda record: None)
        self.should_stop = should_stop or (lambda: False)
        self.optimizer = Optimizer(config.optimizer, config.lr, model.params, config.weight_decay)
        self.dropout_rng = np.random.default_rng([config.seed, DROPOUT_STREAM])
        self.lr = learning_rate(config, 1, 0.0)
        self.history: list[dict[str, Any]] = []
        self.step = self.chars = 0
        self.first_loss = 0.0
        self.train_seconds = 0.0
        self.start = time.perf_counter()  # run() restarts it
        self.total_chars = 0

    def run(self, train_idx: np.ndarray, val_idx: np.ndarray) -> TrainResult:
        cfg, model = self.config, self.model
        B, T = cfg.batch, cfg.seq_len
        L = (len(train_idx) - 1) // B  # characters per stream
        X = train_idx[: B * L].reshape(B, L).T  # (L, B) inputs; column b is stream b
        Y = train_idx[1 : B * L + 1].reshape(B, L).T  # (L, B) targets
        budget = cfg.max_chars or cfg.epochs * B * L
        self.total_chars = min(budget, cfg.epochs * B * L)
        best_val, best_params, stale = math.inf, None, 0
        start = self.start = time.perf_counter()
        for epoch in range(1, cfg.epochs + 1):
            state = model.initial_state(B)
            window, whole_epoch = Running(), Running()
            for s in range(0, L, T):
                if self.should_stop():
                    raise TrainingCancelled("training cancelled")
                x, y = X[s : s + T], Y[s : s + T]
                state = self._step(epoch, x, y, state, (window, whole_epoch))
                if self.step % cfg.log_every == 0:
                    self._record("step", epoch, window)
                    window = Running()
                if self.chars >= budget or self._out_of_time(start):
                    break
            val = evaluate_indices(model, val_idx) if len(val_idx) > 1 else None
            self._record("epoch", epoch, whole_epoch, val)
            if val is not None and val["nats_per_char"] < best_val:
                best_val, stale = val["nats_per_char"], 0
                best_params = {k: v.copy() for k, v in model.params.items()}
            else:
                stale += 1
            if (cfg.patience and stale >= cfg.patience) or self.chars >= budget or self._out_of_time(start):
                break
        if best_params is not None:
            model.params = best_params
        last = self.history[-1]
        summary = {
            "epochs": last["epoch"],
            "steps": self.step,
            "train_chars": self.chars,
            "train_seconds": self.train_seconds,
            "chars_per_sec": self.chars / max(self.train_seconds, 1e-9),
            "wall_seconds": time.perf_counter() - start,
            "train_loss": last["train_loss"],
            "train_bpc": last["train_bpc"],
            "val_bpc": best_val / LN2 if best_params is not None else None,
            "config": cfg.to_dict(),
        }
        return TrainResult(model, self.history, summary)

    def _step(
        self,
        epoch: int,
        x: np.ndarray,
        y: np.ndarray,
        state: np.ndarray,
        meters: tuple[Running, ...],
    ) -> np.ndarray:
        """One update on a (T, B) chunk; returns the state to carry into the next chunk."""
        t0 = time.perf_counter()
        cfg, model = self.config, self.model
        masks = None
        if cfg.dropout:
            shape = (*x.shape, model.config.hidden)  # (T, B, H)
            masks = dropout_masks(self.dropout_rng, cfg.dropout, shape, model.config.layers, model.dtype)
        loss, grads, state, nats = model.loss_and_grads(x, y, state, masks)
        grad_norm = clip_grads(grads, self.config.clip, self.config.clip_value)
        self.first_loss = self.first_loss or loss
        if not (math.isfinite(loss) and math.isfinite(grad_norm)) or loss > DIVERGED * self.first_loss:
            raise TrainingDiverged(
                f"loss became {loss:.4g} (first step {self.first_loss:.4g}, gradient norm {grad_norm:.4g}) "
                f"at epoch {epoch}, step {self.step + 1}; lower the learning rate or clip harder"
            )
        self.lr = learning_rate(cfg, self.step + 1, self.chars / self.total_chars)
        self.optimizer.update(model.params, grads, self.lr)
        self.train_seconds += time.perf_counter() - t0
        self.step += 1
        self.chars += x.size
        for meter in meters:
            meter.add(loss, nats, x.size)
        return state

    def _out_of_time(self, start: float) -> bool:
        return bool(self.config.max_seconds) and time.perf_counter() - start >= self.config.max_seconds

    def _record(self, kind: str, epoch: int, meter: Running, val: dict[str, float] | None = None) -> None:
        rate = self.chars / max(self.train_seconds, 1e-9)
        record: dict[str, Any] = {
            "kind": kind,
            "epoch": epoch,
            "step": self.step,
            "chars": self.chars,
            "total_chars": self.total_chars,
            "train_loss": meter.loss,
            "train_bpc": meter.bits_per_char,
            "val_loss": None if val is None else val["loss"],
            "val_bpc": None if val is None else val["bits_per_char"],
            "chars_per_sec": rate,
            "elapsed": self.train_seconds,
            "wall_seconds": time.perf_counter() - self.start,  # evaluations included
            "lr": self.lr,
            "eta_seconds": max(self.total_chars - self.chars, 0) / rate if rate > 0 else None,
        }
        self.history.append(record)
        self.on_progress(record)


class Running:
    """Mean training loss and bits/char over the steps added since it was made."""

    def __init__(self) -> None:
        self.loss_sum = self.nats = 0.0
        self.steps = self.chars = 0

    def add(self, loss: float, nats: float, chars: int) -> None:
        self.loss_sum += loss
        self.nats += nats
        self.steps += 1
        self.chars += chars

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)

    @property
    def bits_per_char(self) -> float:
        return self.nats / max(self.chars, 1) / LN2
