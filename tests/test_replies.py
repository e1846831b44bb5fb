"""Prediction replies written as bytes (nextchar.server.replies) are exactly protobuf's serialization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from nextchar.core.config import ModelConfig
from nextchar.core.inference import advance, pack_chunks
from nextchar.core.model import CharRNN
from nextchar.core.vocab import UNK, Vocab
from nextchar.proto import nextchar_pb2 as pb
from nextchar.server import replies
from nextchar.server.batching.work import Rows
from nextchar.server.registry import ModelVersion
from nextchar.server.sessions.manager import Predicted


def model_version(vocab_size: int) -> ModelVersion:
    chars = "".join(chr(0x4E00 + i) for i in range(vocab_size - 1))  # V-1 characters + the unknown slot
    net = CharRNN.create(ModelConfig(cell="rnn", hidden=16), Vocab(chars), seed=1)
    return ModelVersion.from_model("m.v2", 7, Path("m.npz"), net, [], {}, {})


def results(mv: ModelVersion, rng: np.random.Generator, full: bool) -> list[Predicted]:
    """A batch's results as the scheduler makes them: chunks of mixed lengths, unknown characters included."""
    net = mv.require()
    V = net.vocab.size
    chunks = [rng.integers(0, V, size=int(rng.integers(1, 40))) for _ in range(5)]
    order, lens, idx = pack_chunks(chunks)
    k = int(rng.integers(1, min(V, 12) + 1))
    states = rng.standard_normal((len(chunks), net.config.hidden)).astype(net.dtype)
    probs0 = np.full((len(chunks), V), 1.0 / V, dtype=net.dtype)
    probs0[:, 1] = 0.0  # a character the model ruled out: surprisal inf
    out = advance(net, idx, lens, states, probs0, k, full)
    offsets = [0, 1, 127, 128, 2**40]
    return [
        Predicted(
            offsets[col],
            Rows(chunks[i], k, col, out, out.states[col], out.last_probs[col]),
            "" if col % 2 else "\u2603",
            0,
            0,
        )
        for col, i in enumerate(order)
    ]


def expected(session_id: str, mv: ModelVersion, vocab: str, p: Predicted, rewind_limit: int) -> bytes:
    """The same reply built the ordinary way, through protobuf's own message classes."""
    reply = pb.PredictStreamResponse(
        session_id=session_id, model=pb.ModelRef(name=mv.name, version=mv.version), vocab=vocab
    )
    m, r = reply.predictions, p.rows
    m.start_offset, m.count, m.top_k = p.start_offset, r.n, r.k
    m.top_index.extend(r.top_index.ravel().tolist())
    m.top_prob.extend(r.top_prob.ravel().tolist())
    m.surprisal_bits.extend(r.surprisal_bits.tolist())
    if r.distribution is not None:
        m.distribution.extend(r.distribution.astype(np.float32).ravel().tolist())
    if p.unknown_chars:
        m.unknown_positions.extend(np.flatnonzero(r.idx == UNK).tolist())
        m.unknown_chars = p.unknown_chars
    reply.rewind_limit = rewind_limit
    return reply.SerializeToString()


@pytest.mark.parametrize("vocab_size", [5, 66, 128, 129, 2049])  # indices of one and two varint bytes
@pytest.mark.parametrize("full", [False, True])
def test_reply_bytes_are_protobufs_serialization(vocab_size: int, full: bool) -> None:
    rng = np.random.default_rng(vocab_size)
    mv = model_version(vocab_size)
    for r in results(mv, rng, full):
        for session_id, vocab, rewind_limit in (("", "", 0), ("s-1", mv.require().vocab.chars, 300)):
            head = replies.with_vocab(replies.head(session_id, mv), vocab)
            assert replies.reply(head, r, rewind_limit) == expected(session_id, mv, vocab, r, rewind_limit)
    # a PredictResponse shares the fields: it parses from the same bytes, rewind_limit left out
    r = results(mv, rng, full)[0]
    parsed = pb.PredictResponse.FromString(replies.reply(replies.with_vocab(replies.head("s", mv), "ab"), r))
    assert (parsed.session_id, parsed.vocab, parsed.predictions.count) == ("s", "ab", r.rows.n)


def test_varints_match_protobuf_for_every_size() -> None:
    values = np.array([0, 1, 127, 128, 16383, 16384, 2**21, 2**28 - 1, 2**28, 2**32 - 1], dtype=np.uint64)
    msg = pb.Predictions()
    msg.top_index.extend(values.tolist())
    payload = replies.varints(values)
    assert replies.varints(values[:0]) == b""
    # the packed field is key, length, payload: compare the payload
    assert msg.SerializeToString().endswith(payload)
    assert pb.Predictions.FromString(b"\x22" + replies.varint(len(payload)) + payload).top_index == list(
        values
    )
