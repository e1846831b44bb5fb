"""What every cell shares: the state layout, the BPTT cache, and the gradient of the recurrent weights.

Conventions: batch-major rows, h is (B, H); the input projection ``xp`` of every
step is computed by the caller for the whole (T, B) chunk at once (a gather for
one-hot inputs, one matrix product otherwise), so only the recurrent product
h @ Whh stays inside the time loop. A chunk's xp comes gate-major, (T, G, B, H), with
every (B, H) gate block contiguous: the time loops work gate by gate, and adding a step's
gates from a strided view of the (T, B, G*H) row layout cost an LSTM-256 step of 64
2.6x as much (31 vs 12 us). A step's xp (``step``) is in the row layout, (N, G*H).
Gates are fused along the last axis in PyTorch's order, so weights and results compare
directly with torch.nn.

A cell's state is one array per sample, ``state_width`` * H wide: h for rnn and
gru, [h, c] for lstm.

Speed (training is bound by the recurrent products, (B, H) @ (H, G*H), that must run one
step after another): inside the time loops every operation writes into preallocated
memory (``out=``, in-place), and whatever the backward needs that does not depend on the
incoming gradient (the gates' derivatives) is computed in the forward loop, on the step's
small arrays while they are still in cache, rather than in passes over whole (T, B, G*H)
arrays afterwards. What needs no loop runs once per window: the input projection (by the
caller) and the weight gradient dWhh, one (H, T*B) @ (T*B, G*H) product.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# out = a @ b for a (B, K) and b (K, N) or gate blocks (G, K, N): out (B, N) or (G, B, N)
Product = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def sigmoid(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Logistic function via tanh: exact, and never overflows exp for large |x|."""
    out = np.multiply(x, 0.5, out=out)
    np.tanh(out, out=out)
    out += 1.0
    out *= 0.5
    return out


@dataclass
class LayerCache:
    """What BPTT needs from the forward pass of one layer over one chunk."""

    h0: np.ndarray  # (B, W*H) state entering the chunk
    h: np.ndarray  # (T+1, B, H): h[0] the h entering the chunk, h[t+1] step t's output (hidden_buffer)
    gates: dict[str, np.ndarray] = field(default_factory=dict)  # (T, B, ...) per-cell factors
    # Training with dropout only (set by the model, not the cell): the (T, B, H) inverted-dropout
    # mask on hs, and out = hs * mask, what the layer above or the read-out received.
    mask: np.ndarray | None = None
    out: np.ndarray | None = None

    @property
    def hs(self) -> np.ndarray:
        """(T, B, H) hidden outputs, a view."""
        return self.h[1:]

    def output(self) -> np.ndarray:
        """(T, B, H): what the layer above (or the read-out) received from this layer."""
        return self.hs if self.out is None else self.out

    def previous_h(self) -> np.ndarray:
        """h entering each step, (T, B, H): the input of every recurrent product (a view, no copy)."""
        return self.h[:-1]


def together(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """a @ b, all of a's rows in one BLAS call (gemm): the fast product, whose rows' bits may
    depend on how many rows there are."""
    return np.matmul(a, b, out=out)


def rowwise(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """a @ b, each row of a alone: a stacked matmul whose slices are (1, K) @ (K, N), so NumPy
    calls BLAS once per row (gemv) with the same shapes and strides whatever the number of rows,
    and a row's bits are those it has alone (nextchar.core.adapt_batch)."""
    np.matmul(a[:, None, :], b if b.ndim == 2 else b[:, None], out=out[..., None, :])
    return out


def gate_blocks(W: np.ndarray, gates: int) -> np.ndarray:
    """A (K, G*H) weight (gates fused along its last axis) as G contiguous (K, H) blocks,
    (G, K, H): one batched product then writes each gate's block of a gate-major result."""
    K, GH = W.shape
    return np.ascontiguousarray(W.reshape(K, gates, GH // gates).transpose(1, 0, 2))


def hidden_buffer(state: np.ndarray, xp: np.ndarray, H: int) -> np.ndarray:
    """(T+1, B, H) for the h of a forward over xp (T, G, B, H): row 0 the h in state (B, W*H),
    rows 1..T for the steps to fill, so the inputs of all the window's recurrent products are
    one contiguous view (LayerCache.previous_h)."""
    T, _, B, _ = xp.shape
    h = np.empty((T + 1, B, H), dtype=xp.dtype)
    h[0] = state[:, :H]
    return h


class Cell(ABC):
    """One recurrent cell; subclasses define the arithmetic, this class the shared parts."""

    name: str
    gates: int  # G: the input projection is G*H wide
    state_width: int = 1  # W: a sample's state is W*H wide
    has_bhn: bool = False  # a bias inside the reset gate (GRU, as in PyTorch)
    candidate: int = 0  # the gate proposing the new content (tanh's): nextchar.core.adapt adapts its inputs

    @abstractmethod
    def step(self, xp: np.ndarray, state: np.ndarray, Whh: np.ndarray, bhn: np.ndarray | None) -> np.ndarray:
        """Advance N states (N, W*H) by one input projection xp (N, G*H); returns the new states."""

    @abstractmethod
    def forward(
        self,
        xp: np.ndarray,
        state: np.ndarray,
        Whh: np.ndarray,
        bhn: np.ndarray | None,
        product: Product = together,
    ) -> tuple[np.ndarray, LayerCache]:
        """Run T steps from state (B, W*H) on xp (T, G, B, H) (gate-major); returns (final state, cache).

        product computes the recurrent products (``rowwise``: each row's bits independent of B);
        bhn may be one row per sample, (B, H)."""

    @abstractmethod
    def backward_preacts(
        self, cache: LayerCache, dhs: np.ndarray, Whh: np.ndarray, product: Product = together
    ) -> tuple[np.ndarray, np.ndarray]:
        """dL/dxp (T, B, G*H), and dL/d(h @ Whh) (T, B, G*H), which differ only where a gate
        multiplies the recurrent product (the GRU's reset gate)."""

    def backward(
        self, cache: LayerCache, dhs: np.ndarray, Whh: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Gradients of one layer given dL/dh_t (T, B, H) from above: (dxp, dWhh, dbhn or None).

        Truncated BPTT: no gradient flows into the state that entered the chunk.
        """
        dxp, drec = self.backward_preacts(cache, dhs, Whh)
        T, B, H = cache.hs.shape
        # dWhh = sum over t of h_{t-1}^T drec_t: one (H, T*B) @ (T*B, G*H) product for the window
        dWhh = cache.previous_h().reshape(T * B, H).T @ drec.reshape(T * B, -1)
        dbhn = drec[:, :, 2 * H :].sum(axis=(0, 1)) if self.has_bhn else None
        return dxp, dWhh, dbhn
