"""CharRNN: a stack of recurrent layers over one-hot characters, with a linear read-out.

The model contract is min-char-rnn's: ``loss_and_grads(inputs, targets, state)``
returns ``(loss, grads, state_last)`` for a (T, B) chunk, and the gradients are checked
against finite differences in tests/test_gradients.py. Training may pass dropout
masks (``dropout_masks``): one per layer, on what that layer hands up (to the next
layer's input projection, or to the read-out from the top layer). Evaluation and
serving never pass any. Inference has two shapes:
``step`` advances N independent sessions by one character each, ``forward`` runs a
(T, B) chunk; nextchar.core.inference builds every prediction (server, demo) on them.

Parameters (l = layer, G = gates of the cell):
  l{l}.Wxh (V or H, G*H)  input weights; layer 0 rows are gathered, never multiplied by a one-hot
  l{l}.Whh (H, G*H)       recurrent weights
  l{l}.bh  (G*H,)         bias
  l{l}.bhn (H,)           GRU only: bias inside the reset gate, as in PyTorch
  Why (H, V), by (V,)     read-out
"""

from __future__ import annotations

from typing import Any

import numpy as np
from nextchar.core import losses
from nextchar.core.cells import CELLS, LayerCache, gate_blocks
from nextchar.core.config import ModelConfig
from nextchar.core.vocab import Vocab

Params = dict[str, np.ndarray]


def param_shapes(config: ModelConfig, vocab_size: int) -> dict[str, tuple[int, ...]]:
    cell = CELLS[config.cell]
    H, V, G = config.hidden, vocab_size, cell.gates * config.hidden
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(config.layers):
        shapes[f"l{layer}.Wxh"] = (V if layer == 0 else H, G)
        shapes[f"l{layer}.Whh"] = (H, G)
        shapes[f"l{layer}.bh"] = (G,)
        if cell.has_bhn:
            shapes[f"l{layer}.bhn"] = (H,)
    shapes["Why"] = (H, V)
    shapes["by"] = (V,)
    return shapes


def init_params(config: ModelConfig, vocab_size: int, rng: np.random.Generator) -> Params:
    """Every weight AND bias uniform in (-1/sqrt(H), 1/sqrt(H)), as PyTorch's RNN modules do.

    Random biases matter: with zero biases an exactly-zero starting state is a
    symmetric point the model hardly ever trains from (truncated BPTT resets to it
    once per epoch), and a GRU trained that way was seen to fall into a degenerate
    attractor when a session started cold (18.5 bits/char on validation from a zero
    state vs 3.1 from a warm one). The notebook's 0.01 * randn starts a tanh RNN
    almost linear and learns slowly.
    """
    bound = 1.0 / np.sqrt(config.hidden)
    return {
        name: rng.uniform(-bound, bound, size=shape).astype(config.dtype)
        for name, shape in param_shapes(config, vocab_size).items()
    }


def dropout_masks(
    rng: np.random.Generator, rate: float, shape: tuple[int, ...], layers: int, dtype: np.dtype[Any]
) -> list[np.ndarray]:
    """One inverted-dropout mask per layer, each of shape (T, B, H): 0 with probability rate, else
    1/(1 - rate), so a masked layer's output has the same expectation as at evaluation, where no
    mask is applied and nothing is rescaled."""
    keep = 1.0 - rate
    masks = []
    for _ in range(layers):
        mask = (rng.random(shape, dtype=np.float32) < keep).astype(dtype)  # (T, B, H) 0 or 1
        mask *= 1.0 / keep
        masks.append(mask)
    return masks


class CharRNN:
    """Parameters plus the vocabulary they were trained on; stateless itself (states are passed in)."""

    def __init__(self, config: ModelConfig, vocab: Vocab, params: Params) -> None:
        expected = param_shapes(config, vocab.size)
        if set(params) != set(expected):
            raise ValueError(f"parameter names {sorted(params)} != expected {sorted(expected)}")
        for name, shape in expected.items():
            if params[name].shape != shape:
                raise ValueError(f"{name} has shape {params[name].shape}, expected {shape}")
        self.config = config
        self.cell = CELLS[config.cell]
        self.vocab = vocab
        self.params = {k: np.ascontiguousarray(v, dtype=config.dtype) for k, v in params.items()}

    @classmethod
    def create(cls, config: ModelConfig, vocab: Vocab, seed: int = 0) -> CharRNN:
        return cls(config, vocab, init_params(config, vocab.size, np.random.default_rng(seed)))

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(self.config.dtype)

    @property
    def layer_width(self) -> int:
        return self.cell.state_width * self.config.hidden

    @property
    def state_size(self) -> int:
        """Floats in one session's state: every layer's h (and c for LSTM), concatenated."""
        return self.config.layers * self.layer_width

    def initial_state(self, n: int = 1) -> np.ndarray:
        return np.zeros((n, self.state_size), dtype=self.dtype)

    # ------------------------------------------------------------ training

    def forward(
        self, inputs: np.ndarray, state: np.ndarray, masks: list[np.ndarray] | None = None
    ) -> tuple[list[LayerCache], np.ndarray, np.ndarray]:
        """Run a (T, B) chunk from state (B, S): (layer caches, logits (T*B, V), state after it).

        masks (training only): one (T, B, H) dropout mask per layer, see dropout_masks."""
        cfg, p = self.config, self.params
        T, B = inputs.shape
        W = self.layer_width
        caches: list[LayerCache] = []
        new_state = np.empty_like(state)
        x: np.ndarray | None = None  # (T, B, H) output of the layer below
        for layer in range(cfg.layers):
            xp = self._chunk_projection(layer, inputs, x)
            s0 = state[:, layer * W : (layer + 1) * W]
            s_last, cache = self.cell.forward(xp, s0, p[f"l{layer}.Whh"], p.get(f"l{layer}.bhn"))
            new_state[:, layer * W : (layer + 1) * W] = s_last
            if masks is not None:
                cache.mask = masks[layer]
                cache.out = cache.hs * cache.mask  # (T, B, H)
            caches.append(cache)
            x = cache.output()
        assert x is not None
        logits = x.reshape(T * B, cfg.hidden) @ p["Why"]
        logits += p["by"]
        return caches, logits, new_state

    def loss_and_grads(
        self,
        inputs: np.ndarray,
        targets: np.ndarray,
        state: np.ndarray,
        masks: list[np.ndarray] | None = None,
    ) -> tuple[float, Params, np.ndarray, float]:
        """Loss of a (T, B) chunk from state (B, S); returns (loss, grads, state_last, nats summed).

        masks: the dropout masks of this step (forward's), or None for none."""
        cfg, p = self.config, self.params
        T, B = inputs.shape
        H = cfg.hidden
        caches, logits, new_state = self.forward(inputs, state, masks)
        hs = caches[-1].output().reshape(T * B, H)
        loss, dlogits, nats = losses.LOSSES[cfg.loss](logits, targets.reshape(T * B))

        grads: Params = {"Why": hs.T @ dlogits, "by": dlogits.sum(axis=0)}
        dhs = (dlogits @ p["Why"].T).reshape(T, B, H)  # dL/d(output) of the top layer
        for layer in reversed(range(cfg.layers)):
            cache = caches[layer]
            if cache.mask is not None:
                dhs *= cache.mask  # dL/dhs = dL/d(hs * mask) * mask
            dxp, dWhh, dbhn = self.cell.backward(cache, dhs, p[f"l{layer}.Whh"])
            dxp2 = dxp.reshape(T * B, -1)  # (T*B, G*H)
            grads[f"l{layer}.Whh"] = dWhh
            if dbhn is not None:
                grads[f"l{layer}.bhn"] = dbhn
            if layer == 0:
                dWxh = _scatter_rows(inputs.reshape(T * B), dxp2, p["l0.Wxh"].shape[0])  # (V, G*H)
                grads["l0.Wxh"] = dWxh
                # every character adds its dxp row to exactly one row of dWxh, so dWxh's column
                # sums are dbh: (V, G*H) summed instead of (T*B, G*H)
                grads["l0.bh"] = dWxh.sum(axis=0)
            else:
                grads[f"l{layer}.bh"] = dxp2.sum(axis=0)
                below = caches[layer - 1].output().reshape(T * B, H)
                grads[f"l{layer}.Wxh"] = below.T @ dxp2
                dhs = (dxp2 @ p[f"l{layer}.Wxh"].T).reshape(T, B, H)
        return loss, grads, new_state, nats

    def input_projection(self, layer: int, inputs: np.ndarray, below: np.ndarray | None) -> np.ndarray:
        """xp = x @ Wxh + bh (N, G*H) for a step of N sessions: a row gather at layer 0, the bias
        added to whichever is smaller, the gathered rows or Wxh ((V, G*H): once per character of
        the vocabulary, not per character of a long input). Both give the same bits."""
        Wxh, bh = self.params[f"l{layer}.Wxh"], self.params[f"l{layer}.bh"]
        if below is None:
            if inputs.size < Wxh.shape[0]:  # a step of a few sessions (a ping-pong stream: one)
                xp = Wxh[inputs]
                xp += bh
                return xp
            return (Wxh + bh)[inputs]  # (N, G*H)
        xp = below @ Wxh
        xp += bh
        return xp

    def _chunk_projection(self, layer: int, inputs: np.ndarray, below: np.ndarray | None) -> np.ndarray:
        """xp of a (T, B) chunk, gate-major as the cells' forward takes it: (T, G, B, H), a view of
        a (G, T, B, H) array, so each step's gate block is contiguous (cells/base.py). Layer 0
        gathers from a gate-major copy of Wxh + bh (same bits as the row gather); a layer above
        takes one product per gate, below (T*B, H) @ Wxh's gate block (H, H)."""
        Wxh, bh = self.params[f"l{layer}.Wxh"], self.params[f"l{layer}.bh"]
        G, H = self.cell.gates, self.config.hidden
        if below is None:
            xp = np.take(gate_blocks(Wxh + bh, G), inputs, axis=1)  # (G, V, H) gathered: (G, T, B, H)
        else:
            T, B = inputs.shape
            xp = np.matmul(below.reshape(T * B, H), gate_blocks(Wxh, G))  # (G, T*B, H)
            xp += bh.reshape(G, 1, H)
            xp = xp.reshape(G, T, B, H)
        return xp.transpose(1, 0, 2, 3)

    # ------------------------------------------------------------ inference

    def step(self, state: np.ndarray, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Advance N sessions by one character each: (N, S), (N,) -> (new states, probs (N, V))."""
        cfg, p = self.config, self.params
        W = self.layer_width
        layers: list[np.ndarray] = []
        x: np.ndarray | None = None
        for layer in range(cfg.layers):
            xp = self.input_projection(layer, inputs, x)
            s = self.cell.step(
                xp,
                state[:, layer * W : (layer + 1) * W],
                p[f"l{layer}.Whh"],
                p.get(f"l{layer}.bhn"),
            )
            layers.append(s)
            x = s[:, : cfg.hidden]
        assert x is not None
        # one layer (the common case): its new state is already a fresh array
        new_state = layers[0] if len(layers) == 1 else np.concatenate(layers, axis=1)
        return new_state, self.probabilities(x)

    def reachable(self, state: np.ndarray, offset: int) -> bool:
        """Whether state (S,) is one a run of this network can be in after offset characters:
        finite, every h within [-1, 1] (tanh's range, for every cell), and an LSTM's c within
        +-offset (|c| grows by less than 1 a step: f, i in (0, 1), g in [-1, 1])."""
        if not np.all(np.isfinite(state)):
            return False
        layers = state.reshape(self.config.layers, self.cell.state_width, self.config.hidden)
        if np.abs(layers[:, 0]).max(initial=0.0) > 1.0:
            return False
        return self.cell.state_width == 1 or np.abs(layers[:, 1:]).max(initial=0.0) <= offset

    def predict_from(self, state: np.ndarray) -> np.ndarray:
        """The next-character distribution (N, V) that states (N, S) imply: the top layer's h, read out."""
        start = (self.config.layers - 1) * self.layer_width
        return self.probabilities(state[:, start : start + self.config.hidden])

    def probabilities(self, h: np.ndarray) -> np.ndarray:
        """Next-character distribution (N, V) from the top layer's hidden state (N, H)."""
        logits = h @ self.params["Why"]
        logits += self.params["by"]
        return losses.probabilities(self.config.loss, logits)


def _scatter_rows(indices: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """sum of rows grouped by index, (n, G): the gradient of a row gather, without np.add.at's slowness."""
    onehot = np.zeros((n, indices.shape[0]), dtype=rows.dtype)
    onehot[indices, np.arange(indices.shape[0])] = 1.0
    return onehot @ rows
