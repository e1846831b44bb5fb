"""A session's value as bytes and back: one codec for ExportSession/ImportSession and the Redis store.

The bytes are a ``nextchar.v1.SessionSnapshot`` (the API's documented blob): the
model version and its checksum, the offset, and the arrays as raw little-endian
bytes of the model's dtype; the rewind trail travels in ``trail`` as one blob: a
header (marks, characters), the marks' offsets (uint64), each mark's state and
probs, then the characters (uint16 indices). An adaptive session's adapter travels
in ``adapter`` (and the one at the trail's oldest mark in ``trail_adapter``): a
header (deltas, window length, steps, resets), the window's start state, the
window (uint16), then the deltas in nextchar.core.adapt's order. A shared store may
keep the deltas apart (they change once a segment, the rest every message):
``DELTAS_APART`` in the header says so, and the caller hands them to the decoder.

Decoding checks everything a foreign copy can get wrong (the dtype, both sizes,
finiteness, a state no model run could reach) and raises SnapshotMismatch saying
which; each caller maps that to its own status. A blob from a client is not
trusted (``imported``): its prediction is computed again from its state and its
trail is not taken. The store's own copies are (``stored``).
"""

from __future__ import annotations

import contextlib
import struct
import sys
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from nextchar.core import adapt
from nextchar.core.adapt import Adapter, Rule
from nextchar.core.model import CharRNN
from nextchar.proto import nextchar_pb2 as pb
from nextchar.server.errors import shown
from nextchar.server.registry import ModelVersion
from nextchar.server.sessions.trail import Mark, Trail
from nextchar.server.sessions.value import SessionValue

FORMAT = 1  # SessionSnapshot.format_version this server writes and reads
MAX_OFFSET = 2**63 - 1  # an imported offset leaves room for ~9e18 more characters
DELTAS_APART = 0xFFFFFFFF  # an adapter header's delta count when the deltas are stored elsewhere
ADAPTER_HEAD = struct.Struct("<IIQQ")  # deltas (0: none yet), window length, steps, resets
TRAIL_HEAD = struct.Struct("<II")  # marks, characters (then the marks' offsets, arrays, characters)
LITTLE_ENDIAN = sys.byteorder == "little"  # the wire's byte order is this machine's
_DTYPE_NAMES: dict[np.dtype[Any], str] = {}


class SnapshotMismatch(ValueError):
    """Stored state that does not fit the model it names."""


def encode_array(a: np.ndarray) -> bytes:
    if LITTLE_ENDIAN and a.dtype.isnative:
        return a.tobytes()  # the same bytes, without astype's ~0.4 us (a snapshot has a dozen arrays)
    return a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


def dtype_name(dtype: np.dtype[Any]) -> str:
    """str(dtype), remembered: numpy takes ~6 us to spell one, once per snapshot written."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype)
    return name


def same_model(mv: ModelVersion, checksum: str) -> bool:
    """False when both sides know the parameters' checksum and they differ (an empty one matches)."""
    return not (checksum and mv.checksum and checksum != mv.checksum)


def encode(
    model: ModelVersion,
    value: SessionValue,
    session_id: str = "",
    *,
    trail: bool = True,
    deltas_apart: bool = False,
) -> bytes:
    """value as a SessionSnapshot's bytes (trail=False: without the rewind trail and its adapter, as
    Export gives it; deltas_apart: the adapters' deltas left out, for a store that keeps them
    apart with ``encode_deltas``)."""
    with_trail = trail and bool(value.trail.marks)
    return pb.SessionSnapshot(
        format_version=FORMAT,
        model=pb.ModelRef(name=model.name, version=model.version),
        model_checksum=model.checksum,
        offset=value.offset,
        dtype=dtype_name(value.state.dtype),
        state=encode_array(value.state),
        probs=encode_array(value.probs),
        session_id=session_id,
        trail=encode_trail(value.trail) if with_trail else b"",
        adapter=encode_adapter(value.adapter, deltas_apart) if value.adapter is not None else b"",
        trail_adapter=(
            encode_adapter(value.base, deltas_apart) if with_trail and value.base is not None else b""
        ),
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


def stored(
    net: CharRNN,
    rule: Rule,
    snapshot: pb.SessionSnapshot,
    keep: int,
    deltas: bytes | None = None,
    base_deltas: bytes | None = None,
) -> SessionValue:
    """The value a store wrote: its prediction, trail and adapters as written (an unusable trail
    costs the rewinds, not the session). deltas, base_deltas: the adapters' deltas where the store
    kept them apart."""
    state, probs = decode_state(net, snapshot.dtype, snapshot.state, snapshot.probs)
    adapter = decode_adapter(net, rule, snapshot.adapter, deltas) if snapshot.adapter else None
    trail, base = Trail(keep), None
    if keep and snapshot.trail:
        with contextlib.suppress(SnapshotMismatch):
            if adapter is not None:  # an adaptive trail is usable only with the adapter at its start
                base = decode_adapter(net, rule, snapshot.trail_adapter, base_deltas)
            trail = decode_trail(net, keep, snapshot.trail, snapshot.offset)
    return SessionValue(state, probs, snapshot.offset, trail, adapter, base if trail.marks else None)


def imported(net: CharRNN, rule: Rule, snapshot: pb.SessionSnapshot, keep: int) -> SessionValue:
    """The value of a client's blob: a state the model could have reached, its prediction computed
    here (a blob's own could say anything), rewinds reaching back to the import; adaptive when the
    blob carries an adapter (a writer's profile), checked like the state."""
    state, _ = decode_state(net, snapshot.dtype, snapshot.state, snapshot.probs)
    if snapshot.offset > MAX_OFFSET:  # else the next chunk overflows uint64 offsets in every reply
        raise SnapshotMismatch(f"offset {snapshot.offset} is above {MAX_OFFSET}")
    if not net.reachable(state, snapshot.offset):
        raise SnapshotMismatch(
            f"state is outside what model runs reach after {snapshot.offset} characters "
            "(a hidden unit beyond [-1, 1], or an LSTM cell beyond the offset)"
        )
    adapter = None
    if snapshot.adapter:
        adapter = decode_adapter(net, rule, snapshot.adapter)
        if not net.reachable(adapter.start, snapshot.offset):
            raise SnapshotMismatch("adapter: its window's start state is outside what model runs reach")
    probs = (net if adapter is None else adapt.adapted(net, adapter)).predict_from(state[None, :])[0]
    return SessionValue(state, probs, snapshot.offset, Trail(keep), adapter)


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
    if trail.marks_bytes is None:  # the marks' offsets, then their arrays: kept with the trail
        offsets = struct.pack(f"<{len(marks)}Q", *(m.offset for m in marks))
        trail.marks_bytes = offsets + b"".join(encode_array(a) for m in marks for a in (m.state, m.probs))
    head = TRAIL_HEAD.pack(len(marks), len(trail.text))
    return head + trail.marks_bytes + trail.text.astype("<u2", copy=False).tobytes()


def decode_trail(net: CharRNN, keep: int, blob: bytes, offset: int) -> Trail:
    """The trail encode_trail wrote for a session now at offset; SnapshotMismatch when it does not fit."""
    S, V = net.state_size, net.vocab.size
    wire = net.dtype.newbyteorder("<")
    try:
        n, n_text = TRAIL_HEAD.unpack_from(blob)
        offsets = struct.unpack_from(f"<{n}Q", blob, TRAIL_HEAD.size)
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


def encode_adapter(adapter: Adapter, deltas_apart: bool = False) -> bytes:
    count = DELTAS_APART if deltas_apart else len(adapter.deltas)
    head = ADAPTER_HEAD.pack(count, len(adapter.window), adapter.steps, adapter.resets)
    window = adapter.window.astype("<u2").tobytes()  # indices < max_vocab
    return head + encode_array(adapter.start) + window + (b"" if deltas_apart else encode_deltas(adapter))


def encode_deltas(adapter: Adapter) -> bytes:
    """An adapter's deltas alone (nothing for one still on the shared weights)."""
    return b"".join(encode_array(d) for d in adapter.deltas)


def decode_adapter(net: CharRNN, rule: Rule, blob: bytes, deltas: bytes | None = None) -> Adapter:
    """The adapter encode_adapter wrote, checked against the model and its rule: sizes, a window no
    longer than a segment of known characters, finite values, deltas within adapt.LIMIT (what a
    diverging adapter is reset beyond). deltas: the deltas when they were kept apart."""
    wire = net.dtype.newbyteorder("<")
    try:
        count, n_window, steps, resets = ADAPTER_HEAD.unpack_from(blob)
    except struct.error:
        raise SnapshotMismatch("adapter is truncated") from None
    at = ADAPTER_HEAD.size + net.state_size * wire.itemsize
    if len(blob) < at + 2 * n_window or n_window > rule.config.segment:
        raise SnapshotMismatch("adapter size does not match the model")
    start = np.frombuffer(blob, wire, net.state_size, ADAPTER_HEAD.size).astype(net.dtype)
    window = np.frombuffer(blob, "<u2", n_window, at).astype(np.int64)
    rest = blob[at + 2 * n_window :]
    if count == DELTAS_APART:
        if rest or deltas is None:
            raise SnapshotMismatch("adapter's deltas are missing")
        rest = deltas
        shapes = adapt.delta_shapes(net) if rest else ()
    elif count in (0, len(adapt.adapted_names(net))):
        shapes = adapt.delta_shapes(net) if count else ()
    else:
        raise SnapshotMismatch(
            f"adapter holds {count} deltas, the model adapts {len(adapt.adapted_names(net))}"
        )
    if len(rest) != sum(int(np.prod(shape)) for shape in shapes) * wire.itemsize:
        raise SnapshotMismatch("adapter size does not match the model")
    values = np.frombuffer(rest, wire).astype(net.dtype)
    arrays, used = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        arrays.append(values[used : used + size].reshape(shape))
        used += size
    if not (np.all(np.isfinite(start)) and np.all(np.isfinite(values))):
        raise SnapshotMismatch("adapter contains NaN or infinite values")
    if values.size and float(np.abs(values).max()) > adapt.LIMIT:
        raise SnapshotMismatch(f"adapter: a delta beyond +-{adapt.LIMIT:g} (a diverged adapter)")
    if n_window and int(window.max()) >= net.vocab.size:
        raise SnapshotMismatch("adapter holds characters outside the model's vocabulary")
    for array in (start, window, *arrays):
        array.flags.writeable = False
    return Adapter(tuple(arrays), start, window, steps, resets)
