"""Truncated-BPTT training over a corpus of any size, with B parallel streams.

The training text is cut into B contiguous streams; each step trains on the next T
characters of every stream, starting from the hidden state the previous step ended
in (reset at each epoch). Validation streams the held-out tail through one carried
state, so its bits/char is what a session on the server would see.

Regularisation and schedule (all off by default): dropout masks drawn each step
from the trainer's own seeded generator, decoupled weight decay in the optimizer,
and the learning rate of nextchar.core.optim.learning_rate (warm-up, then constant
or cosine over the character budget).

A run can checkpoint itself (nextchar.core.checkpoint) at every epoch's end and
every ``checkpoint_seconds``, pause (checkpoint, then stop), and resume from a
checkpoint to the same weights an uninterrupted run ends with.

At its end a run tunes the model's dynamic evaluation (nextchar.core.adapt_tune,
``at_end_of_training``: a bounded number of adapted passes over the validation
text) and returns the config a model file records (``TrainResult.adapt``, how it
was chosen in the summary's ``adapt``); a progress record of kind ``"tune"`` says
it is tuning (none when the validation text is too short to tune on: the defaults
are recorded then). Tuning can be cancelled, not paused.

Run: ``nextchar train --local FILE`` (or through the service: ``nextchar train FILE``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nextchar.core.adapt import AdaptConfig
from nextchar.core.adapt_tune import at_end_of_training
from nextchar.core.checkpoint import Checkpoint
from nextchar.core.config import ModelConfig, TrainConfig, check_text, split_text
from nextchar.core.evaluate import evaluate_indices
from nextchar.core.memory import keep_freed_memory
from nextchar.core.model import CharRNN, dropout_masks
from nextchar.core.optim import Optimizer, clip_grads, learning_rate
from nextchar.core.vocab import Vocab

ProgressFn = Callable[[dict[str, Any]], None]
StopFn = Callable[[], bool]
CheckpointFn = Callable[[Checkpoint], None]
LN2 = math.log(2)
# A step loss this many times the first step's means the run blew up: tanh and softmax
# keep the loss finite long after the weights have gone (lr 10 with Adam: 4.2 -> 75 nats).
DIVERGED = 4.0
DROPOUT_STREAM = 1  # the dropout generator's seed is (seed, this): a stream apart from the initialisation's


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing from the run should be kept."""


class TrainingCancelled(RuntimeError):
    """should_stop() asked the run to end; nothing from the run should be kept."""


class TrainingPaused(RuntimeError):
    """should_pause() asked the run to stop after a checkpoint; resume from it to go on."""


@dataclass
class TrainResult:
    model: CharRNN
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    adapt: AdaptConfig | None = None  # tuned at the end of train(): what its model file records


def train(
    text: str,
    model_config: ModelConfig,
    config: TrainConfig,
    *,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    should_pause: StopFn | None = None,
    on_checkpoint: CheckpointFn | None = None,
    checkpoint_seconds: float = 0.0,
    resume: Checkpoint | None = None,
) -> TrainResult:
    """Train a new model on text; the best-validation weights are returned (the last, if no validation).

    Same seed, data and machine give bit-identical weights: the only randomness is
    the seeded initialisation and, with dropout, the masks, drawn from a generator
    seeded with the same seed. on_checkpoint gets a checkpoint at every epoch's end,
    every checkpoint_seconds (0: epochs only) and when should_pause() asks the run to
    stop (it then raises TrainingPaused); resume goes on from one.
    """
    check_text(text, config)
    train_text, val_text = split_text(text, config.val_fraction)
    model = CharRNN.create(model_config, Vocab.from_text(text), seed=config.seed)
    trainer = Trainer(model, config, on_progress, should_stop)
    trainer.should_pause = should_pause or (lambda: False)
    trainer.on_checkpoint, trainer.checkpoint_seconds = on_checkpoint, checkpoint_seconds
    if resume is not None:
        trainer.restore(resume)
    result = trainer.run(model.vocab.encode(train_text), model.vocab.encode(val_text))
    tuned = at_end_of_training(
        result.model,
        train_text,
        val_text,
        on_start=trainer.tuning,
        on_measured=lambda *_: trainer.stop_if_asked(),
    )
    result.adapt, result.summary["adapt"] = tuned.config, tuned.note
    return result


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
        # where the run stands between two steps: what a checkpoint holds beside the weights
        self.epoch, self.offset = 1, 0  # the next window: epoch, and its start in each stream
        self.state: np.ndarray | None = None  # (B, S) carried into the next window; None: the epoch's start
        self.window, self.whole_epoch = Running(), Running()
        self.best_val, self.stale = math.inf, 0
        self.best_params: dict[str, np.ndarray] | None = None
        self.wall_before = 0.0  # wall seconds of the runs this one resumes
        self.should_pause: StopFn = lambda: False
        self.on_checkpoint: CheckpointFn | None = None
        self.checkpoint_seconds = 0.0

    def run(self, train_idx: np.ndarray, val_idx: np.ndarray) -> TrainResult:
        cfg, model = self.config, self.model
        B, T = cfg.batch, cfg.seq_len
        L = (len(train_idx) - 1) // B  # characters per stream
        X = train_idx[: B * L].reshape(B, L).T  # (L, B) inputs; column b is stream b
        Y = train_idx[1 : B * L + 1].reshape(B, L).T  # (L, B) targets
        budget = cfg.max_chars or cfg.epochs * B * L
        self.total_chars = min(budget, cfg.epochs * B * L)
        start = self.start = time.perf_counter() - self.wall_before
        last_checkpoint = time.perf_counter()
        while self.epoch <= cfg.epochs:
            epoch = self.epoch
            state = model.initial_state(B) if self.state is None else self.state
            for s in range(self.offset, L, T):
                self.stop_if_asked()
                pause = self.should_pause()
                if pause or (
                    self.checkpoint_seconds
                    and time.perf_counter() - last_checkpoint >= self.checkpoint_seconds
                ):
                    self.offset, self.state = s, state
                    self._checkpoint()
                    last_checkpoint = time.perf_counter()
                    if pause:
                        raise TrainingPaused(f"training paused at epoch {epoch}, step {self.step}")
                x, y = X[s : s + T], Y[s : s + T]
                state = self._step(epoch, x, y, state, (self.window, self.whole_epoch))
                if self.step % cfg.log_every == 0:
                    self._record("step", epoch, self.window)
                    self.window = Running()
                if self.chars >= budget or self._out_of_time(start):
                    break
            val = evaluate_indices(model, val_idx) if len(val_idx) > 1 else None
            self._record("epoch", epoch, self.whole_epoch, val)
            if val is not None and val["nats_per_char"] < self.best_val:
                self.best_val, self.stale = val["nats_per_char"], 0
                self.best_params = {k: v.copy() for k, v in model.params.items()}
            else:
                self.stale += 1
            self.epoch, self.offset, self.state = epoch + 1, 0, None
            self.window, self.whole_epoch = Running(), Running()
            done = (cfg.patience and self.stale >= cfg.patience) or self.chars >= budget
            if done or self._out_of_time(start):
                break
            self._checkpoint()  # every epoch's end (the last one's: the result is kept instead)
            last_checkpoint = time.perf_counter()
        best_val, best_params = self.best_val, self.best_params
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

    def stop_if_asked(self) -> None:
        if self.should_stop():
            raise TrainingCancelled("training cancelled")

    def tuning(self) -> None:
        """Say that the run goes on to tune its adaptation: the last record again, of kind "tune"
        (progress only: the history a model file keeps has no such record)."""
        self.stop_if_asked()
        self.on_progress({**self.history[-1], "kind": "tune"})

    def _checkpoint(self) -> None:
        if self.on_checkpoint is None:
            return
        arrays = {f"p.{k}": v for k, v in self.model.params.items()}
        arrays |= {f"m.{k}": v for k, v in self.optimizer.m.items()}
        arrays |= {f"v.{k}": v for k, v in self.optimizer.v.items()}
        if self.best_params is not None:
            arrays |= {f"best.{k}": v for k, v in self.best_params.items()}
        if self.state is not None:
            arrays["state"] = self.state
        meta = {
            "epoch": self.epoch,
            "offset": self.offset,
            "step": self.step,
            "chars": self.chars,
            "optimizer_t": self.optimizer.t,
            "first_loss": self.first_loss,
            "lr": self.lr,
            "train_seconds": self.train_seconds,
            "wall_seconds": time.perf_counter() - self.start,
            "window": self.window.__dict__,
            "whole_epoch": self.whole_epoch.__dict__,
            "best_val": None if math.isinf(self.best_val) else self.best_val,
            "stale": self.stale,
            "dropout_rng": self.dropout_rng.bit_generator.state,
            "history": self.history,
            "config": self.config.to_dict(),
        }
        self.on_checkpoint(Checkpoint(arrays, meta))

    def restore(self, checkpoint: Checkpoint) -> None:
        """Take up the run a checkpoint recorded (of the same model and config)."""
        meta = checkpoint.meta
        if meta["config"] != self.config.to_dict():
            raise ValueError("the checkpoint was taken with another training configuration")
        params = checkpoint.group("p.")
        if set(params) != set(self.model.params):
            raise ValueError("the checkpoint's weights do not fit the model")
        self.model.params = {k: v.astype(self.model.dtype) for k, v in params.items()}
        self.optimizer.m, self.optimizer.v = checkpoint.group("m."), checkpoint.group("v.")
        self.optimizer.t = meta["optimizer_t"]
        self.best_params = checkpoint.group("best.") or None
        self.state = checkpoint.arrays.get("state")
        self.epoch, self.offset, self.step, self.chars = (
            meta["epoch"],
            meta["offset"],
            meta["step"],
            meta["chars"],
        )
        self.first_loss, self.lr, self.train_seconds = meta["first_loss"], meta["lr"], meta["train_seconds"]
        self.wall_before = meta["wall_seconds"]
        self.window, self.whole_epoch = Running(**meta["window"]), Running(**meta["whole_epoch"])
        self.best_val = math.inf if meta["best_val"] is None else meta["best_val"]
        self.stale = meta["stale"]
        self.dropout_rng.bit_generator.state = meta["dropout_rng"]
        self.history = list(meta["history"])

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

    def __init__(self, loss_sum: float = 0.0, nats: float = 0.0, steps: int = 0, chars: int = 0) -> None:
        self.loss_sum, self.nats = loss_sum, nats
        self.steps, self.chars = steps, chars

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
