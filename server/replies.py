"""Prediction replies as wire bytes, written straight from a batch's arrays.

A prediction reply is mostly packed arrays (n*k indices, n*k probabilities, n
surprisals). Building it as a protobuf message copies every value into a Python
list and then into the message (~12 µs for a 64-character chunk, a tenth of the
service's whole cost per message); written here, each array is one ``tobytes``
(~2.5 µs). The bytes are exactly what ``SerializeToString`` gives for the same
message (tests/test_replies.py checks it field by field on random replies), and
the service's response serializer passes bytes through (nextchar.server.wire).

Only what PredictResponse and PredictStreamResponse carry is written here; both
share their first four fields (session_id, model, vocab, predictions). Field
numbers come from the generated descriptors, so a renumbered proto breaks the
import, not the wire.
"""

from __future__ import annotations

import functools

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from nextchar.core.vocab import UNK
from nextchar.proto import nextchar_pb2 as pb
from nextchar.server.registry import ModelVersion
from nextchar.server.sessions.manager import Predicted

VARINT, LEN = 0, 2  # the wire types used here
_LEN_TYPES = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE)


def _key(message: type[Message], name: str) -> bytes:
    """The field's key (number and wire type) as bytes; repeated scalars are packed (LEN)."""
    field = message.DESCRIPTOR.fields_by_name[name]
    wire = LEN if field.is_packed or field.type in _LEN_TYPES else VARINT
    return varint(field.number << 3 | wire)


def varint(n: int) -> bytes:
    """n >= 0 as a protobuf base-128 varint."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def varints(values: np.ndarray) -> bytes:
    """Non-negative integers as consecutive varints (a packed field's payload), vectorised."""
    a = values.ravel()
    if a.max(initial=0) < 0x80:  # every vocabulary index of a vocabulary below 128
        return a.astype(np.uint8).tobytes()
    a = a.astype(np.uint64)
    sizes = np.ones(a.size, dtype=np.int64)
    for bits in (7, 14, 21, 28, 35, 42, 49, 56, 63):
        sizes += a >= np.uint64(1 << bits)
    starts = np.cumsum(sizes) - sizes
    out = np.empty(int(sizes.sum()), dtype=np.uint8)
    for j in range(int(sizes.max())):
        live = sizes > j
        byte = (a[live] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (sizes[live] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[live] + j] = (byte | more).astype(np.uint8)
    return out.tobytes()


def _field(key: bytes, payload: bytes) -> bytes:
    """A length-delimited field; an empty one is left out, as protobuf leaves out defaults."""
    return key + varint(len(payload)) + payload if payload else b""


def _floats(values: np.ndarray) -> bytes:
    return values.astype("<f4", copy=False).tobytes()


_P_START, _P_COUNT, _P_TOP_K = (_key(pb.Predictions, f) for f in ("start_offset", "count", "top_k"))
_P_INDEX, _P_PROB, _P_SURPRISAL = (
    _key(pb.Predictions, f) for f in ("top_index", "top_prob", "surprisal_bits")
)
_P_DIST, _P_UNK_POS, _P_UNK_CHARS = (
    _key(pb.Predictions, f) for f in ("distribution", "unknown_positions", "unknown_chars")
)
_R_ID, _R_MODEL, _R_VOCAB, _R_PREDICTIONS, _R_REWIND = (
    _key(pb.PredictStreamResponse, f) for f in ("session_id", "model", "vocab", "predictions", "rewind_limit")
)
for _name in ("session_id", "model", "vocab", "predictions"):  # the fields the two replies share
    assert _key(pb.PredictResponse, _name) == _key(pb.PredictStreamResponse, _name), _name


@functools.lru_cache(maxsize=1024)
def _frame(n: int, k: int, index_bytes: int) -> tuple[bytes, bytes, bytes]:
    """What a Predictions message of n characters, k candidates each, holds besides its arrays and
    offset: count and top_k, and each packed field's key and length. A stream's messages
    mostly share one shape, so it is encoded once."""
    return (
        b"".join((_P_COUNT, varint(n), _P_TOP_K, varint(k), _P_INDEX, varint(index_bytes))),
        _P_PROB + varint(4 * n * k),
        _P_SURPRISAL + varint(4 * n),
    )


def predictions(predicted: Predicted) -> bytes:
    """The Predictions message of a chunk, serialized (defaults left out, as protobuf does)."""
    rows, start = predicted.rows, predicted.start_offset
    top_index = rows.top_index
    vocab_size = rows.batch.last_probs.shape[1]  # every index is below it
    index = top_index.astype(np.uint8).tobytes() if vocab_size <= 0x80 else varints(top_index)
    counts, prob_key, surprisal_key = _frame(rows.n, rows.k, len(index))
    parts = [_P_START + varint(start) if start else b"", counts, index]
    parts += (prob_key, _floats(rows.top_prob), surprisal_key, _floats(rows.surprisal_bits))
    distribution = rows.distribution
    if distribution is not None:
        parts.append(_field(_P_DIST, _floats(distribution)))
    if predicted.unknown_chars:
        parts.append(_field(_P_UNK_POS, varints(np.flatnonzero(rows.idx == UNK))))
        parts.append(_field(_P_UNK_CHARS, predicted.unknown_chars.encode()))
    return b"".join(parts)


def head(session_id: str, model: ModelVersion) -> bytes:
    """A reply's leading fields, session id and model: the same for every reply of a stream, so a
    stream encodes them once."""
    ref = pb.ModelRef(name=model.name, version=model.version).SerializeToString()
    return _field(_R_ID, session_id.encode()) + _field(_R_MODEL, ref)


def with_vocab(head_bytes: bytes, vocab: str) -> bytes:
    """head plus the vocabulary (a unary reply, a stream's first): its field follows the model's."""
    return head_bytes + _field(_R_VOCAB, vocab.encode())


def reply(head_bytes: bytes, predicted: Predicted, rewind_limit: int = 0) -> bytes:
    """A PredictResponse (rewind_limit 0) or PredictStreamResponse, serialized."""
    body = predictions(predicted)  # never empty: count is at least 1
    tail = (_R_REWIND, varint(rewind_limit)) if rewind_limit else ()
    return b"".join((head_bytes, _R_PREDICTIONS, varint(len(body)), body, *tail))
