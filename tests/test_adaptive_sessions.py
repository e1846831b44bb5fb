"""Sessions that learn their writer, against real servers: in memory, and two replicas on a real redis-server.

The claims are exact where the issue asks for it. An adapter is a function of the
session's text alone, so after any mix of chunks, rewinds, forks, exports, imports
and replica changes, a session's adapter is the same bytes as the adapter of a fresh
adaptive session fed the same text in one piece (compared through ExportSession's
blob, whose ``adapter`` field holds it whole). Predictions agree with that fresh
session's to float precision: the same arithmetic, in chunks of other shapes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from nextchar.client import NextCharClient, Overloaded, Session
from nextchar.core.adapt import AdaptConfig
from nextchar.core.modelfile import save_model
from nextchar.proto import nextchar_pb2 as pb
from redis_harness import RedisServer
from server_harness import (
    ServerThread,
    cancel,
    client_of,
    make_registry,
    replicas,
    start_server,
    take,
    train_notebook_model,
)

KEEP = 16  # the servers' rewind_chars: marks every 4 characters, dropped (and the base replayed) often
ALPHABET = "helo wrd"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    make_registry(directory, versions=1)
    model, history, summary = train_notebook_model()
    for name, rate in (("still", 0.0), ("wild", 1e4)):  # adapts nothing; diverges at every step
        (directory / name).mkdir()
        save_model(
            directory / name / "1.npz", model, history=history, summary=summary, adapt=AdaptConfig(lr=rate)
        )
    return directory


@pytest.fixture(scope="module")
def memory_server(model_dir: Path) -> Iterator[ServerThread]:
    server = start_server(model_dir, rewind_chars=KEEP, max_adaptive_sessions=50)
    yield server
    server.close()


@pytest.fixture(scope="module")
def redis_pair(model_dir: Path, redis_server: RedisServer) -> Iterator[tuple[ServerThread, ServerThread]]:
    with replicas(model_dir, redis_server.url, rewind_chars=KEEP) as pair:
        yield pair


def snapshot_of(session: Session) -> pb.SessionSnapshot:
    snap = pb.SessionSnapshot()
    snap.ParseFromString(session.export())
    return snap


def fed_fresh(client: NextCharClient, text: str) -> Session:
    """A new adaptive session fed text in one message (or none)."""
    session = client.session(adapt=True)
    if text:
        session.feed(text)
    return session


def same_as_fresh(session: Session, client: NextCharClient, text: str) -> None:
    """session is where a fresh adaptive session fed text is: offset, adapter (bit for bit),
    state and next prediction (to float precision)."""
    fresh = fed_fresh(client, text)
    try:
        got, want = snapshot_of(session), snapshot_of(fresh)
        assert got.offset == want.offset == len(text)
        assert got.adapter == want.adapter  # steps, window, start state and deltas: the same bytes
        np.testing.assert_allclose(
            np.frombuffer(got.state, "<f4"), np.frombuffer(want.state, "<f4"), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            np.frombuffer(got.probs, "<f4"), np.frombuffer(want.probs, "<f4"), rtol=1e-4, atol=1e-7
        )
    finally:
        fresh.close()


def check_random_rewinds(fed: Session, other: Session | None, client: NextCharClient, seed: int) -> None:
    """Feed and rewind at random (the rewinds through `other`, another replica, when given); after
    each rewind and each feed the session is what a fresh session fed the remaining text is."""
    rng = random.Random(seed)
    text = ""
    for _ in range(25):
        chunk = "".join(rng.choice(ALPHABET) for _ in range(rng.choice((1, 1, 2, 3, 7, 20, 45))))
        fed.feed(chunk)
        text += chunk
        mover = other or fed
        limit = mover.refresh().rewind_limit
        k = rng.randint(1, limit)
        mover.rewind(k)
        text = text[: len(text) - k]
        fed.refresh()
        same_as_fresh(mover, client, text)


def test_an_adaptive_session_adapts_and_says_so(memory_server: ServerThread) -> None:
    text = "hello world " * 12
    with client_of(memory_server, 30) as c, c.session(adapt=True) as s, c.session() as plain:
        adapted, static = s.feed(text), plain.feed(text)
        info = s.refresh()
        assert info.adaptive and info.adapt_steps == len(text) // 20 and info.adapt_resets == 0
        assert not plain.refresh().adaptive
        # the first window and the character that completes it are scored by the model's weights
        # (before the step that learns from them), the rest by the session's own
        bits, static_bits = [p.surprisal_bits for p in adapted], [p.surprisal_bits for p in static]
        np.testing.assert_allclose(bits[:21], static_bits[:21], rtol=1e-5, atol=1e-6)
        assert sum(bits[21:]) < sum(static_bits[21:])
        assert snapshot_of(plain).adapter == b""


def test_chunking_does_not_change_the_adapter(memory_server: ServerThread) -> None:
    rng = random.Random(5)
    text = "".join(rng.choice(ALPHABET) for _ in range(230))
    with client_of(memory_server, 30) as c, c.session(adapt=True) as s:
        at = 0
        while at < len(text):
            n = rng.choice((1, 2, 19, 20, 21, 64))
            s.feed(text[at : at + n])
            at += n
        same_as_fresh(s, c, text)


def test_rewind_in_memory_is_exact_for_the_adapter(memory_server: ServerThread) -> None:
    with client_of(memory_server, 30) as c, c.session(adapt=True) as s:
        check_random_rewinds(s, None, c, seed=1)


def test_rewind_on_redis_across_replicas_is_exact_for_the_adapter(
    redis_pair: tuple[ServerThread, ServerThread],
) -> None:
    a, b = redis_pair
    with client_of(a, 30) as ca, client_of(b, 30) as cb, ca.session(adapt=True) as s:
        check_random_rewinds(s, cb.attach(s.id), ca, seed=2)


def test_a_replica_takes_over_a_stream_with_the_same_adapter(
    redis_pair: tuple[ServerThread, ServerThread],
) -> None:
    """Failover mid-stream: a stream on replica a, then the same session streamed on b (a's copy
    is stale now); b continues from the adapter a stored, and both end where one session would."""
    a, b = redis_pair
    rng = random.Random(3)
    chunks = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 30))) for _ in range(16)]
    with client_of(a, 30) as ca, client_of(b, 30) as cb, ca.session(adapt=True) as s:
        list(s.stream(chunks[:8]))
        there = cb.attach(s.id)
        list(there.stream(chunks[8:]))
        assert there.refresh().adapt_steps == len("".join(chunks)) // 20
        same_as_fresh(there, ca, "".join(chunks))
        same_as_fresh(s, cb, "".join(chunks))  # a reads b's adapter back from the store


def test_fork_export_import_and_reset(memory_server: ServerThread) -> None:
    text = "hello world hello word held " * 3
    with client_of(memory_server, 30) as c, c.session(adapt=True) as s:
        s.feed(text)
        twin = s.fork()
        assert twin.refresh().adaptive
        twin.feed("hello")
        same_as_fresh(twin, c, text + "hello")
        blob = s.export()
        assert snapshot_of(s).trail_adapter == b""  # the trail's base stays on the server
        profile = c.import_session(blob)
        info = profile.refresh()
        assert info.adaptive and info.adapt_steps == len(text) // 20
        profile.feed(" world")
        s.feed(" world")
        assert snapshot_of(profile).adapter == snapshot_of(s).adapter
        s.reset()
        info = s.refresh()
        assert info.adaptive and info.offset == 0 and info.adapt_steps == 0
        same_as_fresh(s, c, "")
        twin.close()
        profile.close()


def test_imported_adapters_are_checked(memory_server: ServerThread) -> None:
    """A blob's adapter is refused when it could not have come from the model: bad sizes, values
    beyond the limit a diverging adapter is reset at, NaN, characters outside the vocabulary."""
    with client_of(memory_server, 30) as c, c.session(adapt=True) as s:
        s.feed("hello world " * 4)
        snap = snapshot_of(s)
    adapter = snap.adapter
    window_at = 4 + 4 + 8 + 8 + len(snap.state)  # the header, the window's start state, then the window
    assert len(adapter) > window_at + 2  # 48 characters: a window of 8, and deltas
    bad = {
        "truncated": adapter[:10],
        "sizes": adapter + b"\0\0\0\0",
        "a delta beyond the limit": adapter[:-4] + np.array([1e6], "<f4").tobytes(),
        "NaN": adapter[:-4] + np.array([np.nan], "<f4").tobytes(),
        "an unknown character": adapter[:window_at] + b"\xff\xff" + adapter[window_at + 2 :],
    }
    channel, stub = memory_server.new_stub()
    for why, blob in bad.items():
        wrong = pb.SessionSnapshot()
        wrong.CopyFrom(snap)
        wrong.adapter = blob
        with pytest.raises(grpc.RpcError) as caught:
            stub.ImportSession(pb.ImportSessionRequest(blob=wrong.SerializeToString()))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, why
        assert "adapter" in (caught.value.details() or ""), why
    channel.close()


def test_hostile_texts_cannot_make_predictions_non_finite(memory_server: ServerThread) -> None:
    rng = random.Random(9)
    texts = {
        "random characters": "".join(chr(rng.randint(1, 0xD7FF)) for _ in range(2000)),
        "one character repeated": "l" * 20_000,
        "nothing the model knows": "ЖЖЖЖ" * 500,
    }
    with client_of(memory_server, 30) as c:
        for text in texts.values():
            with c.session(adapt=True) as s:
                for at in range(0, len(text), 4096):
                    out = s.feed(text[at : at + 4096])
                    assert all(np.isfinite(p.top[0].prob) for p in out)
                snap = snapshot_of(s)
                assert len(snap.adapter) < 200_000  # two weights' deltas at most, whatever the text
                assert np.all(np.isfinite(np.frombuffer(snap.probs, "<f4")))


def test_generate_and_complete_use_the_adapted_weights(memory_server: ServerThread) -> None:
    with client_of(memory_server, 30) as c, c.session(adapt=True) as s:
        s.feed("hello world " * 5)
        text = s.generate(70, seed=4).text
        assert len(text) == 70 and s.refresh().offset == 60 + 70
        # the generated text was fed as any other: the adapter is the text's
        same_as_fresh(s, c, "hello world " * 5 + text)
        assert s.complete(2)


def test_session_less_predict_adapts_to_its_text(memory_server: ServerThread) -> None:
    text = "hello world " * 6
    with client_of(memory_server, 30) as c, fed_fresh(c, "") as s:
        once = c.predict(text, adapt=True)
        fed = s.feed(text)
        np.testing.assert_allclose(
            [p.surprisal_bits for p in once], [p.surprisal_bits for p in fed], rtol=1e-4, atol=1e-5
        )
        assert [p.surprisal_bits for p in c.predict(text)] != [p.surprisal_bits for p in once]


def test_the_adaptive_cap_refuses_adaptive_sessions_only(model_dir: Path) -> None:
    server = start_server(model_dir, max_adaptive_sessions=2)
    try:
        with client_of(server, 30) as c:
            first, second = c.session(adapt=True), c.session(adapt=True)
            with pytest.raises(Overloaded, match="adaptive session cap of 2"):
                c.session(adapt=True)
            with pytest.raises(Overloaded):
                first.fork()
            with pytest.raises(Overloaded):
                c.import_session(second.export())
            plain = c.session()  # the cap is on adaptive sessions only
            second.close()
            third = c.session(adapt=True)
            assert third.refresh().adaptive
            metrics = server.server.metrics.registry
            assert metrics.get_sample_value("nextchar_sessions_adaptive") == 2
            third.feed("hello world " * 3)
            held = metrics.get_sample_value("nextchar_adapter_bytes")
            assert held is not None and held > 0
            plain.close()
    finally:
        server.close()


def test_the_server_default_decides_when_a_request_does_not(model_dir: Path) -> None:
    server = start_server(model_dir, adapt=True)
    try:
        with client_of(server, 30) as c:
            assert c.session().refresh().adaptive
            assert not c.session(adapt=False).refresh().adaptive
            stub = server.stub
            replies = stub.PredictStream(iter([pb.PredictStreamRequest(text="hello")]))
            first = take(replies)
            assert c.attach(first.session_id).refresh().adaptive
            cancel(replies)
            replies = stub.PredictStream(iter([pb.PredictStreamRequest(text="hello", adapt=False)]))
            first = take(replies)
            assert not c.attach(first.session_id).refresh().adaptive
            cancel(replies)
    finally:
        server.close()


def test_rate_zero_is_a_static_session_bit_for_bit(memory_server: ServerThread) -> None:
    """A model whose adaptation rate is 0: its adaptive sessions predict exactly what static ones
    do, float for float, message for message (the adaptive path changes nothing but the weights)."""
    rng = random.Random(7)
    chunks = [
        "".join(rng.choice(ALPHABET) for _ in range(rng.choice((1, 3, 19, 20, 21, 50)))) for _ in range(12)
    ]
    with client_of(memory_server, 30) as c, c.session("still", adapt=True) as s, c.session("still") as plain:
        for chunk in chunks:
            got, want = s.feed(chunk), plain.feed(chunk)
            assert [(p.top, p.surprisal_bits) for p in got] == [(p.top, p.surprisal_bits) for p in want]
        assert snapshot_of(s).state == snapshot_of(plain).state
        assert s.refresh().adapt_steps == len("".join(chunks)) // 20


def test_a_diverging_adapter_is_reset_counted_and_harmless(memory_server: ServerThread) -> None:
    text = "hello world " * 10
    metrics = memory_server.server.metrics.registry
    before = metrics.get_sample_value("nextchar_adapter_resets_total") or 0.0
    with client_of(memory_server, 30) as c, c.session("wild", adapt=True) as s:
        out = s.feed(text)
        assert all(np.isfinite(p.surprisal_bits) for p in out)
        resets = s.refresh().adapt_resets
        assert resets > 0
        assert metrics.get_sample_value("nextchar_adapter_resets_total") == before + resets
        s.rewind(30)  # the rewind replays the resets: counted once
        assert metrics.get_sample_value("nextchar_adapter_resets_total") == before + resets
