"""Sessions over the network: stateful predictions, resume, fork, isolation, export/import, generation."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from nextchar.core.demo import NOTEBOOK_TEXT
from nextchar.core.model import CharRNN
from nextchar.proto import nextchar_pb2 as pb
from server_harness import (
    ServerThread,
    cancel,
    error_details,
    expected,
    make_registry,
    start_server,
    stream_chars,
    surprisals,
    take,
    top1,
)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    model_dir = tmp_path_factory.mktemp("models")
    make_registry(model_dir, versions=1)
    server = start_server(model_dir)
    yield server
    server.close()


@pytest.fixture(scope="module")
def model(srv: ServerThread) -> CharRNN:
    mv = srv.server.registry.resolve("default", 1)
    assert mv.net is not None
    return mv.net


def test_notebook_text_streamed_one_char_at_a_time_gives_stateful_predictions(
    srv: ServerThread, model: CharRNN
) -> None:
    responses = stream_chars(srv.stub, NOTEBOOK_TEXT, top_k=3)
    vocab = responses[0].vocab
    assert vocab == model.vocab.chars and all(not r.vocab for r in responses[1:])  # vocab sent once
    want_top1, want_surprisal = expected(model, NOTEBOOK_TEXT)
    assert top1(vocab, responses) == want_top1
    np.testing.assert_allclose(surprisals(responses), want_surprisal, rtol=1e-4, atol=1e-5)
    # the trained notebook model knows which l it is at: only a carried state can
    assert top1(vocab, responses)[:-1] == NOTEBOOK_TEXT[1:]
    assert [r.predictions.start_offset for r in responses] == list(range(len(NOTEBOOK_TEXT)))
    assert {r.model.name for r in responses} == {"default"} and {r.model.version for r in responses} == {1}
    first = responses[0].predictions
    assert first.count == 1 and first.top_k == 3 and len(first.top_index) == 3
    assert list(first.top_prob) == sorted(first.top_prob, reverse=True)


def test_chunks_and_single_characters_agree(srv: ServerThread, model: CharRNN) -> None:
    text = NOTEBOOK_TEXT * 3
    singles = stream_chars(srv.stub, text)
    chunks = stream_chars(srv.stub, text, chunk=16)
    assert top1(singles[0].vocab, singles) == top1(chunks[0].vocab, chunks)
    np.testing.assert_allclose(surprisals(singles), surprisals(chunks), rtol=1e-4, atol=1e-5)
    one = srv.stub.Predict(pb.PredictRequest(text=text, top_k=2, full_distribution=True), timeout=10)
    dist = np.array(one.predictions.distribution).reshape(len(text), model.vocab.size)
    np.testing.assert_allclose(dist.sum(axis=1), 1.0, rtol=1e-4)
    np.testing.assert_allclose(
        np.array(one.predictions.surprisal_bits), surprisals(singles), rtol=1e-4, atol=1e-5
    )


def test_reconnect_and_resume_at_the_offset_last_seen(srv: ServerThread) -> None:
    whole = stream_chars(srv.stub, NOTEBOOK_TEXT)
    created = srv.stub.CreateSession(pb.CreateSessionRequest(session_id="resume-me"), timeout=5)
    first = stream_chars(srv.stub, NOTEBOOK_TEXT[:12], session_id=created.session.session_id)
    # the stream broke (here: ended); the session lives on until its idle timeout
    offset = first[-1].predictions.start_offset + first[-1].predictions.count
    assert offset == 12
    requests = iter(
        [pb.PredictStreamRequest(session_id="resume-me", text=NOTEBOOK_TEXT[12:], expect_offset=offset)]
    )
    rest = list(srv.stub.PredictStream(requests, timeout=10))
    assert rest[0].predictions.start_offset == 12
    np.testing.assert_allclose(surprisals(first + rest), surprisals(whole), rtol=1e-4, atol=1e-5)
    # feeding the same chunk twice is caught when the client says where it thinks it is
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.Predict(pb.PredictRequest(session_id="resume-me", text="x", expect_offset=12), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "offset 35" in str(err.value.details())
    assert error_details(err.value) == {"field": "expect_offset", "offset": "35"}


def test_broken_stream_leaves_session_alive(srv: ServerThread) -> None:
    sid = srv.stub.CreateSession(pb.CreateSessionRequest(), timeout=5).session.session_id

    def requests() -> Iterator[pb.PredictStreamRequest]:
        yield pb.PredictStreamRequest(session_id=sid, text="hello")
        threading.Event().wait(10)  # never send more; the client cancels
        yield pb.PredictStreamRequest(text="x")

    call = srv.stub.PredictStream(requests(), timeout=10)
    assert take(call).predictions.count == 5
    cancel(call)
    info = srv.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=5).session
    assert info.offset == 5


def test_fork_continues_from_a_copy(srv: ServerThread) -> None:
    sid = srv.stub.CreateSession(
        pb.CreateSessionRequest(prime_text="hello wor"), timeout=5
    ).session.session_id
    fork = srv.stub.ForkSession(
        pb.ForkSessionRequest(source_session_id=sid, session_id="the-fork"), timeout=5
    )
    assert fork.session.offset == 9 and fork.session.session_id == "the-fork"
    a = srv.stub.Predict(pb.PredictRequest(session_id=sid, text="ld"), timeout=5).predictions
    b = srv.stub.Predict(pb.PredictRequest(session_id="the-fork", text="ld"), timeout=5).predictions
    assert list(a.top_index) == list(b.top_index) and list(a.surprisal_bits) == list(b.surprisal_bits)
    # advancing the original does not move the fork
    srv.stub.Predict(pb.PredictRequest(session_id=sid, text=" hello"), timeout=5)
    after = srv.stub.GetSession(pb.GetSessionRequest(session_id="the-fork"), timeout=5).session
    assert after.offset == 11


def test_interleaved_sessions_never_share_state(srv: ServerThread, model: CharRNN) -> None:
    """Many concurrent streams, different texts, batched together: each matches its solo run."""
    texts = [NOTEBOOK_TEXT[i:] + NOTEBOOK_TEXT[:i] for i in range(0, 24, 2)]
    results: dict[int, list[pb.PredictStreamResponse]] = {}
    barrier = threading.Barrier(len(texts))

    def run(i: int) -> None:
        channel, stub = srv.new_stub()
        with channel:
            barrier.wait()
            results[i] = stream_chars(stub, texts[i])

    before = srv.server.scheduler.stats.max_sessions
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i, text in enumerate(texts):
        want_top1, want_surprisal = expected(model, text)
        assert top1(results[i][0].vocab, results[i]) == want_top1
        np.testing.assert_allclose(surprisals(results[i]), want_surprisal, rtol=1e-4, atol=1e-5)
    assert max(before, srv.server.scheduler.stats.max_sessions) > 1  # sessions really were stepped together


def test_two_sessions_alternating_on_one_channel(srv: ServerThread, model: CharRNN) -> None:
    a = srv.stub.CreateSession(pb.CreateSessionRequest(), timeout=5).session.session_id
    b = srv.stub.CreateSession(pb.CreateSessionRequest(), timeout=5).session.session_id
    text_a, text_b = "hello world", "world hello"
    got: dict[str, list[float]] = {a: [], b: []}
    for ca, cb in zip(text_a, text_b, strict=True):
        for sid, ch in ((a, ca), (b, cb)):
            r = srv.stub.Predict(pb.PredictRequest(session_id=sid, text=ch), timeout=5)
            got[sid].extend(r.predictions.surprisal_bits)
    np.testing.assert_allclose(got[a], expected(model, text_a)[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[b], expected(model, text_b)[1], rtol=1e-4, atol=1e-5)


def test_export_import_reset_close_list(srv: ServerThread) -> None:
    sid = srv.stub.CreateSession(pb.CreateSessionRequest(prime_text="hello w"), timeout=5).session.session_id
    blob = srv.stub.ExportSession(pb.ExportSessionRequest(session_id=sid), timeout=5).blob
    clone = srv.stub.ImportSession(
        pb.ImportSessionRequest(blob=blob, session_id="imported"), timeout=5
    ).session
    assert clone.offset == 7 and clone.model.version == 1
    a = srv.stub.Predict(pb.PredictRequest(session_id=sid, text="orld"), timeout=5).predictions
    b = srv.stub.Predict(pb.PredictRequest(session_id="imported", text="orld"), timeout=5).predictions
    assert list(a.surprisal_bits) == list(b.surprisal_bits)
    reset = srv.stub.ResetSession(pb.ResetSessionRequest(session_id=sid), timeout=5).session
    assert reset.offset == 0
    fresh = srv.stub.Predict(pb.PredictRequest(text="h"), timeout=5).predictions
    again = srv.stub.Predict(pb.PredictRequest(session_id=sid, text="h"), timeout=5).predictions
    assert list(fresh.surprisal_bits) == list(again.surprisal_bits)
    listed = srv.stub.ListSessions(pb.ListSessionsRequest(page_size=1), timeout=5)
    assert len(listed.sessions) == 1 and listed.next_page_token and listed.total >= 2
    srv.stub.CloseSession(pb.CloseSessionRequest(session_id="imported"), timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.GetSession(pb.GetSessionRequest(session_id="imported"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "closed" in str(err.value.details())


@pytest.mark.parametrize("token", ["-1", "x", str(1 << 60), "9223372036854775807"])
def test_a_page_token_no_listing_gave_is_invalid_argument(srv: ServerThread, token: str) -> None:
    """Tokens are offsets ListSessions handed out: negative ones, and ones past 2**53 (on the
    Redis store, ZRANGE overflowed its 64-bit integers and the call said "retry"), are refused;
    one past the end is an empty last page."""
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.ListSessions(pb.ListSessionsRequest(page_token=token), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in str(err.value.details())
    past = srv.stub.ListSessions(pb.ListSessionsRequest(page_token=str(1 << 40)), timeout=5)
    assert not past.sessions and not past.next_page_token


def test_unknown_characters_are_reported_not_fatal(srv: ServerThread) -> None:
    r = srv.stub.Predict(pb.PredictRequest(text="hello 🙂 wXrld"), timeout=5).predictions
    assert r.count == 13
    assert list(r.unknown_positions) == [6, 9] and r.unknown_chars == "🙂X"


def test_generate_advances_the_session_or_a_fork(srv: ServerThread) -> None:
    sid = srv.stub.CreateSession(pb.CreateSessionRequest(prime_text="hello "), timeout=5).session.session_id
    forked = "".join(
        r.text
        for r in srv.stub.Generate(
            pb.GenerateRequest(session_id=sid, fork=True, length=20, seed=3), timeout=10
        )
    )
    assert srv.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=5).session.offset == 6
    pieces = list(srv.stub.Generate(pb.GenerateRequest(session_id=sid, length=20, seed=3), timeout=10))
    assert "".join(p.text for p in pieces) == forked  # same seed, same state: same text
    assert forked.startswith("world")
    assert pieces[-1].offset == 26 and pieces[-1].session_id == sid
    long = list(srv.stub.Generate(pb.GenerateRequest(prime_text="hel", length=150, seed=1), timeout=10))
    assert len(long) == 3 and sum(len(p.text) for p in long) == 150  # streamed in pieces
