"""The nextchar.v1 messages in JSON, both ways, and predictions written straight from a batch's arrays.

Requests are parsed with protobuf's own JSON mapping (field names as in the proto,
unknown fields refused), so a wrong type or a misspelt field is INVALID_ARGUMENT
naming it, as a malformed protobuf is over gRPC. Responses are protobuf's JSON form
with one change: 64-bit integers stay JSON numbers (protobuf writes them as strings;
offsets and counts never come near 2**53). Predictions skip the message: their
arrays are written as JSON directly (``dumps``: orjson writes a NumPy array in one
call, float32 as the shortest text that parses back to the same float32; a
64-character prediction's reply took 140 us with json.dumps of lists, 6 us so), with
each candidate's character beside its index.
"""

from __future__ import annotations

import functools
import json
from typing import Any, TypeVar

import numpy as np
import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from nextchar.core.vocab import UNK
from nextchar.server.errors import InvalidArgument
from nextchar.server.sessions.manager import Predicted

M = TypeVar("M", bound=Message)
INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def json_object(data: bytes | str, what: str = "body") -> dict[str, Any]:
    """A JSON object from a body or a frame ({} when empty); InvalidArgument saying what is wrong."""
    if not data.strip():
        return {}
    try:
        value = json.loads(data)
    except UnicodeDecodeError:
        raise InvalidArgument(f"{what}: not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{what}: not JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what}: a JSON object expected")
    return value


def parse(value: dict[str, Any], cls: type[M]) -> M:
    """The message cls in a JSON object, by protobuf's JSON mapping."""
    try:
        return json_format.ParseDict(value, cls())
    except json_format.ParseError as exc:
        raise InvalidArgument(f"{cls.DESCRIPTOR.name}: {str(exc).splitlines()[0][:300]}") from None


def to_json(message: Message) -> dict[str, Any]:
    out = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _numbers(message.DESCRIPTOR, out)
    return out


def _numbers(descriptor: Any, out: dict[str, Any]) -> None:
    """64-bit integers back to numbers, through nested and repeated messages."""
    for name, value in out.items():
        field = descriptor.fields_by_name.get(name)
        if field is None:
            continue
        if field.type in INT64:
            out[name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, dict):
                    _numbers(field.message_type, item)


def dumps(value: Any) -> bytes:
    """value as JSON (UTF-8), NumPy arrays included: float32 exact and short (each number parses
    back to the same float32), infinity and NaN as null."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def floats(values: np.ndarray) -> np.ndarray:
    """float32 values for ``dumps``, flat."""
    return values.astype(np.float32, copy=False).ravel()


@functools.lru_cache(maxsize=64)
def _chars(vocab: str) -> tuple[str, ...]:
    """Each index's character, "" for the unknown slot (index 0); made once per vocabulary."""
    return ("", *vocab)


def candidates(vocab: str, index: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    """Ranked candidates: their indices, probabilities and characters ("" for the unknown slot)."""
    chars = _chars(vocab)
    flat = index.ravel()
    return {"top_index": flat, "top_prob": floats(prob), "top_chars": [chars[i] for i in flat.tolist()]}


def predictions(predicted: Predicted, vocab: str) -> dict[str, Any]:
    rows = predicted.rows
    out: dict[str, Any] = {"start_offset": predicted.start_offset, "count": rows.n, "top_k": rows.k}
    out |= candidates(vocab, rows.top_index, rows.top_prob)
    out["surprisal_bits"] = floats(rows.surprisal_bits)
    distribution = rows.distribution
    if distribution is not None:
        out["distribution"] = floats(distribution)
    if predicted.unknown_chars:
        out["unknown_positions"] = np.flatnonzero(rows.idx == UNK)
        out["unknown_chars"] = predicted.unknown_chars
    return out
