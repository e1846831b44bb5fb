"""Rewind, completion and greedy decoding, against real servers (in memory and on a real redis-server).

The rewind test's claim is exact: after taking k characters back, a session predicts
what a fresh session fed only the remaining text predicts. It is checked after
random feeds and rewinds of every size the trail allows, with a small rewind_chars
so marks are dropped and re-fed many times over.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from nextchar.client import (
    Candidate,
    FailedPrecondition,
    InvalidArgument,
    NextCharClient,
    Rewind,
    RewindTooFar,
    Session,
)
from nextchar.core.completion import complete, is_word_char
from nextchar.core.config import ModelConfig
from nextchar.core.inference import feed, initial_probs
from nextchar.core.model import CharRNN
from nextchar.core.vocab import UNK, Vocab
from nextchar.proto import nextchar_pb2 as pb
from redis_harness import RedisServer
from server_harness import ServerThread, client_of, make_registry, replicas, start_server

KEEP = 16  # the servers' rewind_chars here: marks every 4 characters
ALPHABET = "helo wrd"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    make_registry(directory, versions=1)
    return directory


@pytest.fixture(scope="module")
def memory_server(model_dir: Path) -> Iterator[ServerThread]:
    server = start_server(model_dir, rewind_chars=KEEP)
    yield server
    server.close()


@pytest.fixture(scope="module")
def redis_pair(model_dir: Path, redis_server: RedisServer) -> Iterator[tuple[ServerThread, ServerThread]]:
    with replicas(model_dir, redis_server.url, rewind_chars=KEEP) as pair:
        yield pair


def same_prediction(got: tuple[Candidate, ...], want: tuple[Candidate, ...]) -> None:
    assert [c.char for c in got] == [c.char for c in want]
    np.testing.assert_allclose([c.prob for c in got], [c.prob for c in want], rtol=1e-5, atol=1e-7)


def check_random_rewinds(fed: Session, other: Session | None, fresh: NextCharClient, seed: int) -> None:
    """Feed and rewind at random (through `other`, another replica, when given); after each
    rewind the session must predict what a fresh state fed the remaining text predicts."""
    rng = random.Random(seed)
    text, spent = "", 0
    for _ in range(40):
        chunk = "".join(rng.choice(ALPHABET) for _ in range(rng.choice((1, 1, 2, 3, 7, 20))))
        fed.feed(chunk)
        text, spent = text + chunk, max(0, spent - len(chunk))
        limit = (other or fed).refresh().rewind_limit
        # the trail reaches back rewind_chars, less what recent rewinds spent of it
        assert limit >= min(KEEP - spent, len(text))
        k = rng.randint(1, limit)
        after = (other or fed).rewind(k)
        text, spent = text[: len(text) - k], spent + k
        assert (other or fed).offset == len(text)
        fed.refresh()
        if text:
            same_prediction(after, fresh.predict(text)[-1].top)
        nxt = rng.choice(ALPHABET)
        got = fed.feed(nxt)[-1].top
        text += nxt
        same_prediction(got, fresh.predict(text)[-1].top)


def test_rewind_in_memory_predicts_as_if_the_characters_never_came(memory_server: ServerThread) -> None:
    with client_of(memory_server) as c, c.session() as s:
        check_random_rewinds(s, None, c, seed=1)


def test_rewind_on_redis_across_replicas(redis_pair: tuple[ServerThread, ServerThread]) -> None:
    a, b = redis_pair
    with client_of(a) as ca, client_of(b) as cb, ca.session() as s:
        check_random_rewinds(s, cb.attach(s.id), ca, seed=2)


def test_a_stream_rewinds_on_redis_and_another_replica_completes_from_there(
    redis_pair: tuple[ServerThread, ServerThread],
) -> None:
    a, b = redis_pair
    with client_of(a) as ca, client_of(b) as cb, ca.session() as s:
        out = list(s.stream(["hello wor", Rewind(2), "orld hel", Rewind(3)]))
        assert s.offset == len("hello world ") and out[-1].rewind_limit >= 12
        same_prediction(out[-1].next, ca.predict("hello world ")[-1].top)
        there = cb.attach(s.id)
        assert there.refresh().offset == s.offset  # the rewound state is the shared one
        assert [c.text for c in there.complete(2)] == [c.text for c in ca.complete("hello world ", n=2)]


def test_rewind_further_than_kept_is_refused_with_the_limit(memory_server: ServerThread) -> None:
    with client_of(memory_server) as c, c.session() as s:
        with pytest.raises(FailedPrecondition, match="at most 0"):
            s.rewind(1)
        s.feed("hello world hello world hello world")  # 35 characters, one chunk
        limit = s.refresh().rewind_limit
        assert limit == 35  # one chunk: its start is the only mark
        s.feed("he")
        s.feed("llo")
        limit = s.refresh().rewind_limit
        with pytest.raises(RewindTooFar, match=f"at most {limit}") as caught:
            s.rewind(limit + 1)
        assert s.refresh().offset == 40  # a refused rewind leaves the session as it was
        assert caught.value.limit == limit
        with pytest.raises(InvalidArgument):
            s.rewind(0)


def test_a_stream_rewinds_between_its_chunks(memory_server: ServerThread) -> None:
    with client_of(memory_server) as c, c.session() as s:
        out = list(s.stream(["hello w", Rewind(3), Rewind(1), "o w", "orz", Rewind(1), "ld"]))
        assert [p.start_offset for p in out] == [0, 4, 3, 3, 6, 8, 8]
        assert len(out[1]) == 0 and s.offset == 10
        same_prediction(out[2].next, c.predict("hel")[-1].top)
        same_prediction(out[-1][-1].top, c.predict("helo world")[-1].top)
        same_prediction(out[-1].next, out[-1][-1].top)


def test_fork_and_reset_keep_and_clear_the_trail(memory_server: ServerThread) -> None:
    with client_of(memory_server) as c, c.session() as s:
        s.feed("hello wor")
        twin = s.fork()
        same_prediction(twin.rewind(4), c.predict("hello")[-1].top)
        assert s.offset == 9 and twin.offset == 5
        s.reset()
        assert s.refresh().rewind_limit == 0


# ---------------------------------------------------------------- completion


def exhaustive(
    model: CharRNN, state: np.ndarray, probs: np.ndarray, max_chars: int
) -> list[tuple[str, float, bool]]:
    """Every continuation and its probability, by brute force (tiny vocabularies only)."""
    vocab = model.vocab
    word = [i for i in range(1, vocab.size) if is_word_char(vocab.char(i))]
    boundary = [i for i in range(1, vocab.size) if not is_word_char(vocab.char(i))]
    out = []
    for length in range(1, max_chars + 1):
        for seq in itertools.product(range(1, vocab.size), repeat=length):
            text = vocab.decode(list(seq))
            first = next((j for j, ch in enumerate(text) if is_word_char(ch)), None)
            if first is None or any(not is_word_char(ch) for ch in text[first:]):
                continue  # not a continuation: no word yet, or a boundary inside the word
            a = feed(model, state, probs, np.array(seq))
            assert a.probs_seq is not None
            p_chars = float(np.prod([a.probs_seq[t, 0, seq[t]] for t in range(length)], dtype=np.float64))
            last = a.last_probs[0].astype(np.float64)
            out.append((text, p_chars * last[boundary].sum(), True))
            if length == max_chars:
                out.append((text, p_chars * last[word].sum(), False))
    best: dict[str, tuple[str, float, bool]] = {}
    for entry in sorted(out, key=lambda e: -e[1]):
        best.setdefault(entry[0], entry)
    return list(best.values())


def test_completion_is_the_exact_top_n_on_a_small_vocabulary() -> None:
    model = CharRNN.create(
        ModelConfig(cell="gru", hidden=12, dtype="float64"), Vocab.from_text("ab ."), seed=3
    )
    start = feed(model, model.initial_state(1)[0], initial_probs(model), model.vocab.encode("ab a"))
    state, probs = start.states[0], start.last_probs[0]
    got = complete(model, state, probs, n=16, max_chars=3)  # a beam of 32 holds all 4**3 cases it needs
    want = exhaustive(model, state, probs, 3)[:16]
    assert [(c.text, c.complete) for c in got] == [(t, full) for t, _, full in want]
    np.testing.assert_allclose([c.prob for c in got], [p for _, p, _ in want], rtol=1e-9)
    assert complete(model, state, probs, n=16, max_chars=3) == got  # deterministic
    assert all(UNK not in model.vocab.encode(c.text) for c in got)


def test_complete_from_a_session_does_not_move_it_and_matches_a_prime(memory_server: ServerThread) -> None:
    with client_of(memory_server) as c, c.session() as s:
        s.feed("hello wo")
        from_session = s.complete(3)
        assert s.refresh().offset == 8
        from_prime = c.complete("hello wo", n=3)
        assert [x.text for x in from_session] == [x.text for x in from_prime]
        assert from_session[0].text == "rld" and from_session[0].complete
        assert from_session[0].prob > 0.5 and all(0 < x.prob <= 1 for x in from_session)
        probs = [x.prob for x in from_session]
        assert probs == sorted(probs, reverse=True)
        cut = c.complete("hello wo", n=1, max_chars=2)
        assert cut[0].text == "rl" and not cut[0].complete
        with pytest.raises(InvalidArgument, match="max_chars"):
            c.complete("he", max_chars=65)
        with pytest.raises(InvalidArgument, match="n:"):
            c.complete("he", n=17)


# ---------------------------------------------------------------- greedy decoding


def test_temperature_zero_is_greedy_everywhere(memory_server: ServerThread) -> None:
    model = memory_server.server.registry.resolve("default", 1).net
    assert model is not None
    with client_of(memory_server) as c:
        a = c.generate("hello", length=30, temperature=0.0)  # no seed: greedy needs none
        b = c.generate("hello", length=30, temperature=0.0)
        nucleus = c.generate("hello", length=30, top_p=0.0)
        assert a.text == b.text == nucleus.text
        primed = feed(model, model.initial_state(1)[0], initial_probs(model), model.vocab.encode("hello"))
        state, probs, want = primed.states[0], primed.last_probs[0], []
        for _ in range(30):
            p = probs.astype(np.float64).copy()
            p[UNK] = 0
            want.append(int(np.argmax(p)))
            state, step = model.step(state[None, :], np.array([want[-1]]))
            state, probs = state[0], step[0]
        assert a.text == model.vocab.decode(want)
        hot = {c.generate("hello", length=30, temperature=5.0, seed=seed).text for seed in range(3)}
        assert len(hot) > 1
        for seed in range(3):  # an unset temperature (raw request: no field) is 1.0, not greedy
            raw = pb.GenerateRequest(prime_text="hello", length=30, seed=seed)
            unset = "".join(r.text for r in memory_server.stub.Generate(raw, timeout=10))
            assert unset == c.generate("hello", length=30, temperature=1.0, seed=seed).text
        with pytest.raises(InvalidArgument, match="temperature"):
            c.generate("he", length=3, temperature=-1.0)
        assert not math.isnan(a.offset)
