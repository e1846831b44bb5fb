"""PyTorch reference trainer for bench/train_bench.py: the yardstick nextchar is measured against.

It is deliberately the plain, stock-PyTorch way to train a char-RNN (one-hot input,
one ``nn.RNN``/``nn.GRU``/``nn.LSTM`` layer, ``nn.Linear`` read-out, default
initialisation, Adam, ``clip_grad_norm_``; optionally nextchar's dropout), because the question the benchmark asks is
"is nextchar at least as good as what anyone would write with PyTorch?", not "can
PyTorch be tuned to win?".

The data layout mirrors ``nextchar.core.train.Trainer`` step for step, so both sides see
the same characters in the same order and the bits/char are comparable:

* the training indices are cut into B contiguous streams of L = (n - 1) // B characters;
* each step trains on the next T characters of every stream (the last window of an epoch
  may be shorter), starting from the detached hidden state the previous step ended in;
* the state is reset at each epoch start (the streams wrap to their beginnings);
* training stops after the first step that reaches the character budget.

Dropout (``dropout`` > 0) is nextchar's: inverted dropout (``F.dropout``) on what the
recurrent layer hands to the read-out, drawn afresh each step, training only; the carried
state is never masked. With one layer that is the whole of nextchar's rule (a mask on
each layer's output, the top one's before the read-out).

Validation feeds every validation character once through one stream with the hidden
state carried, and reports nats / ln 2 per predicted character.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LN2 = math.log(2)
EVAL_CHUNK = 2048  # validation characters per forward call; the state is carried between calls
CELLS: dict[str, type[nn.Module]] = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}

Hidden = Any  # a (1, B, H) tensor, or an (h, c) pair of them for LSTM; None = zeros
ProgressFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class RefConfig:
    """The settings the reference shares with the nextchar run it is compared to."""

    cell: str = "rnn"
    hidden: int = 256
    batch: int = 64  # B parallel streams
    seq_len: int = 64  # T: truncated-BPTT window
    max_chars: int = 5_000_000  # stop after the first step that reaches this many characters
    lr: float = 2e-3
    clip: float = 5.0  # global gradient-norm limit
    seed: int = 0
    threads: int = 2
    log_every: int = 100  # steps between progress records
    dropout: float = 0.0  # inverted dropout on the layer's output before the read-out, training only

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {self.cell!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class CharModel:
    """One-hot characters -> one recurrent layer -> linear read-out to V logits.

    A plain holder of two modules rather than an nn.Module subclass, so the file
    type-checks the same whether or not torch (with its inline types) is installed.
    """

    def __init__(self, cell: str, vocab_size: int, hidden: int) -> None:
        self.vocab_size = vocab_size
        self.rnn = CELLS[cell](vocab_size, hidden)  # nn.RNN's default nonlinearity is tanh
        self.out = nn.Linear(hidden, vocab_size)

    def parameters(self) -> list[torch.Tensor]:
        return [*self.rnn.parameters(), *self.out.parameters()]

    def __call__(self, x: torch.Tensor, h: Hidden, dropout: float = 0.0) -> tuple[torch.Tensor, Hidden]:
        """(T, B) indices from state h -> (logits (T*B, V), state after the last character).

        dropout (training only): inverted dropout on the outputs the read-out sees, not on h."""
        onehot = F.one_hot(x, self.vocab_size).to(torch.float32)
        ys, h = self.rnn(onehot, h)  # (T, B, H)
        if dropout:
            ys = F.dropout(ys, p=dropout, training=True)
        return self.out(ys.reshape(-1, ys.shape[-1])), h


def detach(h: Hidden) -> Hidden:
    """Cut the graph at a window boundary (truncated BPTT) but keep the state's values."""
    if isinstance(h, tuple):
        return tuple(t.detach() for t in h)
    return h.detach()


def stream_windows(
    train_idx: np.ndarray, batch: int, seq_len: int, max_chars: int
) -> Iterator[tuple[bool, torch.Tensor, torch.Tensor]]:
    """Yield (epoch_start, x, y) windows in nextchar's order until the budget is reached."""
    L = (len(train_idx) - 1) // batch
    if L < 1:
        raise ValueError(f"{len(train_idx)} training characters cannot fill {batch} streams")
    X = torch.from_numpy(np.ascontiguousarray(train_idx[: batch * L].reshape(batch, L).T))
    Y = torch.from_numpy(np.ascontiguousarray(train_idx[1 : batch * L + 1].reshape(batch, L).T))
    chars = 0
    while True:
        for s in range(0, L, seq_len):
            x, y = X[s : s + seq_len], Y[s : s + seq_len]
            yield s == 0, x, y
            chars += x.numel()
            if chars >= max_chars:
                return


def train_reference(
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    vocab_size: int,
    config: RefConfig,
    on_progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Train the reference on int64 index arrays; returns throughput and validation figures."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model = CharModel(config.cell, vocab_size, config.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    report = on_progress or (lambda record: None)
    steps = chars = 0
    seconds = 0.0
    window_nats = 0.0
    window_chars = 0
    h: Hidden = None
    for epoch_start, x, y in stream_windows(train_idx, config.batch, config.seq_len, config.max_chars):
        if epoch_start:
            h = None
        t0 = time.perf_counter()
        loss, h = _train_step(model, optimizer, x, y, h, config.clip, config.dropout)
        seconds += time.perf_counter() - t0
        steps += 1
        chars += x.numel()
        window_nats += loss * x.numel()
        window_chars += x.numel()
        if steps % config.log_every == 0:
            report(_progress(steps, chars, seconds, config.max_chars, window_nats / window_chars))
            window_nats, window_chars = 0.0, 0
    t0 = time.perf_counter()
    val = evaluate_reference(model, val_idx)
    return {
        "impl": "torch",
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "train_chars": chars,
        "train_seconds": seconds,
        "chars_per_sec": chars / max(seconds, 1e-9),
        "val_bpc": val["bits_per_char"],
        "val_accuracy": val["accuracy"],
        "val_chars": val["chars"],
        "eval_seconds": time.perf_counter() - t0,
        "config": asdict(config),
    }


def _train_step(
    model: CharModel,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    h: Hidden,
    clip: float,
    dropout: float,
) -> tuple[float, Hidden]:
    """One update on a (T, B) window; returns (mean loss in nats, detached state to carry)."""
    logits, h = model(x, h, dropout)
    loss = F.cross_entropy(logits, y.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    # cast: Tensor.backward is untyped in torch 2.13, and mypy must pass with or without torch
    cast(Any, loss).backward()
    nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    value = float(loss.item())
    if not math.isfinite(value):
        raise RuntimeError(f"reference loss became {value}; the run diverged")
    return value, detach(h)


def _progress(steps: int, chars: int, seconds: float, total: int, nats: float) -> dict[str, Any]:
    return {
        "step": steps,
        "chars": chars,
        "total_chars": total,
        "train_bpc": nats / LN2,
        "chars_per_sec": chars / max(seconds, 1e-9),
    }


def evaluate_reference(model: CharModel, idx: np.ndarray) -> dict[str, float]:
    """Score every next character of idx once, one stream, state carried (as a session would)."""
    if len(idx) < 2:
        raise ValueError("evaluation needs at least two characters")
    data = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
    n = len(idx) - 1
    h: Hidden = None
    nats = 0.0
    correct = 0
    with torch.no_grad():
        for s in range(0, n, EVAL_CHUNK):
            e = min(s + EVAL_CHUNK, n)
            logits, h = model(data[s:e].reshape(-1, 1), h)
            targets = data[s + 1 : e + 1]
            nats += float(F.cross_entropy(logits, targets, reduction="sum").item())
            correct += int((logits.argmax(dim=1) == targets).sum().item())
    return {"chars": float(n), "bits_per_char": nats / n / LN2, "accuracy": correct / n}
