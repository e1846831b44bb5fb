"""A session's value as bytes and back: one codec for ExportSession/ImportSession and the Redis store.

The bytes are a ``nextchar.v1.SessionSnapshot`` (the API's documented blob): the
model version and its checksum, the offset, and the arrays as raw little-endian
bytes of the model's dtype; the rewind trail travels in ``trail`` as one blob: a
header (marks, characters), the marks' offsets (uint64), each mark's state and
probs, then the characters (uint16 indices).

Decoding checks everything a foreign copy can get wrong (the dtype, both sizes,
finiteness, a state no model run could reach) and raises SnapshotMismatch saying
which; each caller maps that to its own status. A blob from a client is not
trusted (``imported``): its prediction is computed again from its state and its
trail is not taken. The store's own copies are (``stored``).
"""

from __future__ import annotations

import contextlib
import struct

import numpy as np
from google.protobuf.message import DecodeError
from nextchar.core.model import CharRNN
from nextchar.proto import nextchar_pb2 as pb
from nextchar.server.errors import shown
from nextchar.server.registry import ModelVersion
from nextchar.server.sessions.trail import Mark, Trail
from nextchar.server.sessions.value import SessionValue

FORMAT = 1  # SessionSnapshot.format_version this server writes and reads
MAX_OFFSET = 2**63 - 1  # an imported offset leaves room for ~9e18 more characters


class SnapshotMismatch(ValueError):
    """Stored state that does not fit the model it names."""


def encode_array(a: np.ndarray) -> bytes:
    return a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


def same_model(mv: ModelVersion, checksum: str) -> bool:
    """False when both sides know the parameters' checksum and they differ (an empty one matches)."""
    return not (checksum and mv.checksum and checksum != mv.checksum)


def encode(model: ModelVersion, value: SessionValue, session_id: str = "", *, trail: bool = True) -> bytes:
    """value as a SessionSnapshot's bytes (trail=False: without the rewind trail, as Export gives it)."""
    return pb.SessionSnapshot(
        format_version=FORMAT,
        model=pb.ModelRef(name=model.name, version=model.version),
        model_checksum=model.checksum,
        offset=value.offset,
        dtype=str(value.state.dtype),
        state=encode_array(value.state),
        probs=encode_array(value.probs),
        session_id=session_id,
        trail=encode_trail(value.trail) if trail and value.trail.marks else b"",
    ).SerializeToString()


def parse(blob: bytes) -> pb.SessionSnapshot:
    """The snapshot in blob, before anything is checked against a model."""
    snapshot = pb.SessionSnapshot()
    try:
        snapshot.ParseFromString(blob)
    except DecodeError:
        raise SnapshotMismatch("not a SessionSnapshot from ExportSession") from None
    if snapshot.format_version != FORMAT:
        raise SnapshotMismatch(
            f"format version {snapshot.format_version} is not supported (this server reads {FORMAT})"
        )
    if not snapshot.model.name or not snapshot.model.version:
        raise SnapshotMismatch("names no model version")
    return snapshot


def stored(net: CharRNN, snapshot: pb.SessionSnapshot, keep: int) -> SessionValue:
    """The value a store wrote: its prediction and trail as written (an unusable trail costs the
    rewinds, not the session)."""
    state, probs = decode_state(net, snapshot.dtype, snapshot.state, snapshot.probs)
    trail = Trail(keep)
    if keep and snapshot.trail:
        with contextlib.suppress(SnapshotMismatch):
            trail = decode_trail(net, keep, snapshot.trail, snapshot.offset)
    return SessionValue(state, probs, snapshot.offset, trail)


def imported(net: CharRNN, snapshot: pb.SessionSnapshot, keep: int) -> SessionValue:
    """The value of a client's blob: a state the model could have reached, its prediction computed
    here (a blob's own could say anything), rewinds reaching back to the import."""
    state, _ = decode_state(net, snapshot.dtype, snapshot.state, snapshot.probs)
    if snapshot.offset > MAX_OFFSET:  # else the next chunk overflows uint64 offsets in every reply
        raise SnapshotMismatch(f"offset {snapshot.offset} is above {MAX_OFFSET}")
    if not net.reachable(state, snapshot.offset):
        raise SnapshotMismatch(
            f"state is outside what model runs reach after {snapshot.offset} characters "
            "(a hidden unit beyond [-1, 1], or an LSTM cell beyond the offset)"
        )
    probs = net.predict_from(state[None, :])[0]
    return SessionValue(state, probs, snapshot.offset, Trail(keep))


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
