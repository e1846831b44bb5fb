"""A session's state as bytes and back: one codec for ExportSession/ImportSession and the Redis store.

Arrays travel as raw little-endian bytes of the model's dtype. Decoding checks
everything a foreign copy can get wrong (the dtype, both sizes, finiteness) and
raises SnapshotMismatch saying which; each caller maps that to its own status.
A rewind trail (nextchar.server.sessions.trail) travels as one blob: a header
(marks, characters), the marks' offsets (uint64), each mark's state and probs,
then the characters (uint16 indices).
"""

from __future__ import annotations

import struct

import numpy as np
from nextchar.core.model import CharRNN
from nextchar.server.errors import shown
from nextchar.server.registry import ModelVersion
from nextchar.server.sessions.trail import Mark, Trail


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


def encode_trail(trail: Trail) -> bytes:
    marks = trail.marks
    head = struct.pack(f"<II{len(marks)}Q", len(marks), len(trail.text), *(m.offset for m in marks))
    arrays = b"".join(encode_array(a) for m in marks for a in (m.state, m.probs))
    return head + arrays + trail.text.astype("<u2", copy=False).tobytes()


def decode_trail(net: CharRNN, keep: int, blob: bytes, offset: int) -> Trail:
    """The trail encode_trail wrote for a session now at offset; SnapshotMismatch when it does not fit."""
    S, V = net.state_size, net.vocab.size
    wire = net.dtype.newbyteorder("<")
    try:
        n, n_text = struct.unpack_from("<II", blob)
        offsets = struct.unpack_from(f"<{n}Q", blob, 8)
    except struct.error:
        raise SnapshotMismatch("trail is truncated") from None
    at, mark_bytes = 8 + 8 * n, (S + V) * wire.itemsize
    if len(blob) != at + n * mark_bytes + 2 * n_text:
        raise SnapshotMismatch("trail size does not match the model")
    if n and (list(offsets) != sorted(offsets) or offsets[0] + n_text != offset or offsets[-1] > offset):
        raise SnapshotMismatch("trail does not lead to the session's offset")
    marks: list[Mark] = []
    for mark_offset in offsets:
        values = np.frombuffer(blob, wire, S + V, at).astype(net.dtype)
        if not np.all(np.isfinite(values)):
            raise SnapshotMismatch("trail contains NaN or infinite values")
        marks.append(Mark(mark_offset, values[:S], values[S:]))
        at += mark_bytes
    text = np.frombuffer(blob, "<u2", n_text, at).astype(np.uint16)
    if n_text and int(text.max()) >= V:
        raise SnapshotMismatch("trail holds characters outside the model's vocabulary")
    return Trail(keep, tuple(marks), text)
