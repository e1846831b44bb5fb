"""A session's state as bytes and back: one codec for ExportSession/ImportSession and the Redis store.

Arrays travel as raw little-endian bytes of the model's dtype. Decoding checks
everything a foreign copy can get wrong (the dtype, both sizes, finiteness) and
raises SnapshotMismatch saying which; each caller maps that to its own status.
"""

from __future__ import annotations

import numpy as np
from nextchar.core.model import CharRNN
from nextchar.server.errors import shown
from nextchar.server.registry import ModelVersion


class SnapshotMismatch(ValueError):
    """Stored state that does not fit the model it names."""


def encode_array(a: np.ndarray) -> bytes:
    return a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


def same_model(mv: ModelVersion, checksum: str) -> bool:
    """False when both sides know the parameters' checksum and they differ (an empty one matches)."""
    return not (checksum and mv.checksum and checksum != mv.checksum)


def decode_state(net: CharRNN, dtype: str, state: bytes, probs: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(state (S,), probs (V,)) in the model's dtype, from the bytes encode_array wrote."""
    if dtype != str(net.dtype):
        raise SnapshotMismatch(f"dtype {shown(dtype)} does not match the model's {net.dtype}")
    wire = net.dtype.newbyteorder("<")
    # sizes first: frombuffer raises ValueError on a length that is not a multiple of the item size
    if (len(state), len(probs)) != (net.state_size * wire.itemsize, net.vocab.size * wire.itemsize):
        raise SnapshotMismatch("state or probs size does not match the model")
    s = np.frombuffer(state, dtype=wire).astype(net.dtype)
    p = np.frombuffer(probs, dtype=wire).astype(net.dtype)
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(p))):
        raise SnapshotMismatch("state contains NaN or infinite values")
    return s, p
