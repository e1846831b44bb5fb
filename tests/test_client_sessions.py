"""The client library against a real server: sessions, predictions, fork, export/import, errors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from nextchar.client import (
    AlreadyExists,
    InvalidArgument,
    ModelNotFound,
    NextCharClient,
    OffsetMismatch,
    SessionExpired,
    SessionNotFound,
    Unavailable,
)
from nextchar.core.demo import NOTEBOOK_TEXT


@pytest.fixture
def client(server_address: str) -> Iterator[NextCharClient]:
    with NextCharClient(server_address, timeout=10) as c:
        yield c


def test_feed_predicts_every_character_statefully(client: NextCharClient) -> None:
    with client.session() as s:
        p = s.feed("hello wor")
        assert len(p) == 9 and p.start_offset == 0 and p.end_offset == 9 == s.offset
        assert p.next_chars[-1] == "l"  # "hello wor" -> "l": only a carried state knows
        assert p[1].char == "e" and p[1].offset == 1 and p[-1].top[0].char == "l"
        assert abs(sum(c.prob for c in p[0].top)) <= 1.0
        q = s.feed("ld")
        assert q.start_offset == 9 and q.next_chars[-1] == " "


def test_stream_yields_one_prediction_per_chunk_in_order(client: NextCharClient) -> None:
    with client.session() as s:
        chunks = [NOTEBOOK_TEXT[i : i + 4] for i in range(0, len(NOTEBOOK_TEXT), 4)]
        preds = list(s.stream(chunks))
        assert [p.text for p in preds] == chunks
        assert [p.start_offset for p in preds] == list(range(0, len(NOTEBOOK_TEXT), 4))
        assert s.offset == len(NOTEBOOK_TEXT)
        stateless = client.predict(NOTEBOOK_TEXT)  # one chunk from a fresh state: same answers
        assert "".join(p.next_chars for p in preds) == stateless.next_chars


def test_fork_reset_export_import(client: NextCharClient) -> None:
    with client.session(prime="hello wo") as s:
        assert s.offset == 8
        twin = s.fork()
        assert twin.offset == 8 and twin.id != s.id
        assert twin.feed("r").next_chars == s.feed("r").next_chars
        blob = s.export()
        copy = client.import_session(blob)
        assert copy.offset == s.offset == 9
        assert copy.feed("l").next_chars == s.feed("l").next_chars
        assert s.reset().offset == 0
        for other in (twin, copy):
            other.close()
        assert {twin.id, copy.id}.isdisjoint(i.session_id for i in client.sessions())
        assert s.id in [i.session_id for i in client.sessions()]


def test_attach_learns_vocab_and_offset(client: NextCharClient) -> None:
    with client.session(session_id="attach-me", prime="hel") as s:
        again = client.attach("attach-me")
        assert again.offset == 3 and again.model == s.model
        assert again.feed("l").next_chars == "o"


def test_errors_are_typed(client: NextCharClient) -> None:
    with pytest.raises(SessionNotFound) as not_found:
        client.attach("never-was")
    assert not isinstance(not_found.value, SessionExpired)
    s = client.session(session_id="closed-one")
    s.close()
    with pytest.raises(SessionExpired) as gone:
        s.feed("h")
    assert gone.value.reason == "closed" and gone.value.code == "NOT_FOUND"
    with pytest.raises(ModelNotFound):
        client.session(model="no-such-model")
    with client.session(session_id="taken"), pytest.raises(AlreadyExists):
        client.session(session_id="taken")
    with pytest.raises(InvalidArgument, match="text"):
        client.predict("")
    with client.session() as other:
        other.feed("he")
        stale = client.attach(other.id)
        other.feed("l")
        with pytest.raises(OffsetMismatch) as mismatch:
            stale.feed("l")  # it would feed "l" at offset 2, but the session is at 3
        assert mismatch.value.offset == 3


def test_unreachable_server_is_unavailable() -> None:
    with NextCharClient("127.0.0.1:1", timeout=1) as c, pytest.raises(Unavailable):
        c.health()


def test_generate_advances_a_session_or_leaves_it_on_fork(client: NextCharClient) -> None:
    pieces: list[str] = []
    with client.session(prime="hello") as s:
        forked = s.generate(12, fork=True, seed=3)
        assert s.offset == 5 and forked.session_id == ""
        advanced = s.generate(12, seed=3, on_piece=pieces.append)
        assert advanced.text == forked.text == "".join(pieces)  # same state, same seed
        assert s.offset == advanced.offset == 17
    assert len(client.generate("hello", length=70, seed=1).text) == 70
