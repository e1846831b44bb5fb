"""The scheduler, its executors and the batch arithmetic, and the per-session memory budget, in-process (no network needed)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from nextchar.core.config import ModelConfig
from nextchar.core.inference import feed, initial_probs, top_k_rows
from nextchar.core.model import CharRNN
from nextchar.core.vocab import Vocab
from nextchar.server.batching.executors import ProcessExecutor
from nextchar.server.batching.scheduler import Scheduler
from nextchar.server.batching.work import BatchStats, ChunkResult, PredictWork, compute
from nextchar.server.errors import Aborted
from nextchar.server.registry import ModelVersion
from nextchar.server.sessions.manager import SessionManager
from nextchar.server.sessions.memory import InMemorySessionStore
from nextchar.server.sessions.session import Session

VOCAB = Vocab.from_text("abcdefghijklmnopqrstuvwxyz ,.")


def version(hidden: int = 64, cell: str = "rnn") -> ModelVersion:
    model = CharRNN.create(ModelConfig(cell=cell, hidden=hidden), VOCAB, seed=1)
    return ModelVersion.from_model("m", 1, Path("m/1.npz"), model, [], {}, {})


def solo(model: CharRNN, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 after each character, distributions (T, V) after each), one session alone."""
    out = feed(model, model.initial_state(1)[0], initial_probs(model), VOCAB.encode(text))
    assert out.probs_seq is not None
    probs = out.probs_seq[1:, 0]
    return probs.argmax(axis=1), probs


def test_mixed_length_batch_matches_each_session_alone() -> None:
    mv = version(cell="gru")
    model = mv.net
    assert model is not None
    texts = ["hello world", "a", "the quick brown fox", "zz top", "xyz"]
    loop = asyncio.new_event_loop()
    works = [
        PredictWork(Session.fresh(str(i), mv), VOCAB.encode(t), 3, True, 0, loop.create_future())
        for i, t in enumerate(texts)
    ]
    results = compute(works, BatchStats())
    for work, result, text in zip(works, results, texts, strict=True):
        want_top1, want_probs = solo(model, text)
        assert isinstance(result, ChunkResult)
        np.testing.assert_array_equal(result.top_index[:, 0], want_top1)
        assert result.distribution is not None
        np.testing.assert_allclose(result.distribution, want_probs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.probs, want_probs[-1], rtol=1e-5, atol=1e-6)
        assert result.top_index.shape == (len(text), 3) and work.session.offset == 0
    loop.close()


def test_top_k_rows_sorted_and_complete() -> None:
    probs = np.random.default_rng(0).dirichlet(np.ones(30), size=50).astype(np.float32)
    reference = np.argsort(-probs, axis=1, kind="stable")
    for k in (1, 5, 8, 9, 12, 30):  # both the argmax passes (k <= 8) and argpartition
        for rows in (probs, probs[:1]):  # many rows, and the lone row's sort
            idx, vals = top_k_rows(rows, k)
            np.testing.assert_array_equal(idx, reference[: len(rows), :k])
            np.testing.assert_array_equal(vals, np.take_along_axis(rows, reference[: len(rows), :k], axis=1))
            assert np.all(np.diff(vals, axis=1) <= 0)


def test_top_k_rows_breaks_ties_by_the_lower_index_on_every_path() -> None:
    """Rounded probabilities tie a lot: each of the three strategies must order ties alike."""
    probs = np.round(np.random.default_rng(1).dirichlet(np.ones(40), size=20), 2).astype(np.float32)
    reference = np.lexsort((np.broadcast_to(np.arange(40), probs.shape), -probs), axis=1)
    for k in (3, 8, 9, 20, 40):
        for rows in (slice(None), slice(0, 1), slice(5, 6)):  # many rows, and lone rows
            idx, _ = top_k_rows(probs[rows], k)
            np.testing.assert_array_equal(idx, reference[rows, :k], err_msg=f"k={k}, rows {rows}")


def test_concurrent_sessions_are_stepped_together() -> None:
    mv = version()

    async def main() -> Scheduler:
        scheduler = Scheduler(inline_chars=0)
        scheduler.start()
        sessions = [Session.fresh(str(i), mv) for i in range(50)]
        await asyncio.gather(*(scheduler.predict(s, VOCAB.encode("hello"), 3, False) for s in sessions))
        await scheduler.close()
        assert all(s.offset == 5 for s in sessions)
        return scheduler

    stats = asyncio.run(main()).stats
    assert stats.chars == 250 and stats.max_sessions == 50
    assert stats.steps <= 10  # 5 positions, one or two batches: never one step per session


def test_streams_on_a_slow_model_are_still_stepped_together() -> None:
    """Streams that each wait for the previous reply, on a model whose inline step takes longer
    than the lone-request window: the requests that waited for the loop meanwhile are batched,
    not stepped one by one as if each were alone."""
    mv = version(hidden=512, cell="gru")
    chunk = VOCAB.encode("the quick brown fox jumps over the lazy dog, " * 2)[:64]

    async def main() -> Scheduler:
        scheduler = Scheduler()  # 64-character chunks of a few sessions run inline
        scheduler.start()
        sessions = [Session.fresh(str(i), mv) for i in range(12)]

        async def stream(session: Session) -> None:
            for _ in range(4):
                await scheduler.predict(session, chunk, 3, False)

        await asyncio.gather(*(stream(s) for s in sessions))
        await scheduler.close()
        return scheduler

    stats = asyncio.run(main()).stats
    assert stats.chars == 12 * 4 * 64
    assert stats.batches <= 12, f"{stats.batches} batches for 12 streams x 4 chunks"


def test_idle_session_costs_at_most_4_kb_beyond_its_state() -> None:
    mv = version(hidden=256)
    model = mv.net
    assert model is not None
    sessions = SessionManager(InMemorySessionStore(idle_timeout=600), Scheduler(), 100_000, 4096)
    n = 5000

    async def add_all() -> None:
        for _ in range(n):
            session = Session.fresh(sessions.admit(""), mv)
            session.state = session.state.copy()
            session.probs = model.initial_state(1)[0][: VOCAB.size].copy()
            session.offset = 123
            await sessions.add(session)

    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    asyncio.run(add_all())
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    assert len(sessions.store) == n
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    per_session = grown / n - model.state_size * model.dtype.itemsize
    print(f"{per_session:.0f} bytes per idle session beyond its state")
    assert per_session <= 4096, f"{per_session:.0f} bytes per idle session beyond its state"


def test_result_for_a_session_reset_in_flight_is_dropped() -> None:
    mv = version()

    async def main() -> None:
        scheduler = Scheduler(inline_chars=0)  # everything queues: the reset lands before the batch runs
        session = Session.fresh("s", mv)
        pending = asyncio.ensure_future(scheduler.predict(session, VOCAB.encode("hello"), 3, False))
        await asyncio.sleep(0)
        session.reset()
        scheduler.start()
        with pytest.raises(Aborted, match="reset or closed"):
            await pending
        assert session.offset == 0
        await scheduler.close()

    asyncio.run(main())


def test_a_lone_character_matches_the_same_character_in_a_mixed_batch() -> None:
    """advance's one-character case (one step, one sort) against its general case (the same
    character beside a longer chunk: probability tables, argmax passes)."""
    mv = version(cell="lstm")
    model = mv.net
    assert model is not None
    loop = asyncio.new_event_loop()
    session = Session.fresh("s", mv)
    warm = feed(model, session.state, session.probs, VOCAB.encode("the cat"))
    session.state, session.probs = warm.states[0], warm.last_probs[0]  # mid-text: non-trivial surprisal
    work = PredictWork(session, VOCAB.encode("a"), 4, True, 0, loop.create_future())
    other = PredictWork(Session.fresh("t", mv), VOCAB.encode("dog"), 4, True, 0, loop.create_future())
    lone, mixed = compute([work], BatchStats())[0], compute([other, work], BatchStats())[1]
    for name in ("top_index", "top_prob", "surprisal_bits", "distribution", "state", "probs"):
        np.testing.assert_allclose(
            getattr(lone, name), getattr(mixed, name), rtol=1e-6, atol=1e-7, err_msg=name
        )
    loop.close()


def test_big_batches_in_the_compute_process_match_each_session_alone() -> None:
    mv = version(cell="gru")
    model = mv.net
    assert model is not None
    texts = [f"the quick brown fox {i} jumps" for i in range(30)]

    async def main() -> Scheduler:
        scheduler = Scheduler(inline_chars=0, compute_process=True)
        scheduler.start()
        sessions = [Session.fresh(str(i), mv) for i in range(len(texts))]
        results = await asyncio.gather(
            *(
                scheduler.predict(s, VOCAB.encode(t[:-3]), 2, True)
                for s, t in zip(sessions, texts, strict=True)
            )
        )
        for s, t, r in zip(sessions, texts, results, strict=True):
            assert s.offset == len(t) - 3
            assert r.distribution is not None
            np.testing.assert_allclose(r.distribution, solo(model, t[:-3])[1], rtol=1e-5, atol=1e-6)
        again = await asyncio.gather(
            *(
                scheduler.predict(s, VOCAB.encode(t[-3:]), 2, True)
                for s, t in zip(sessions, texts, strict=True)
            )
        )
        for t, r in zip(texts, again, strict=True):
            assert r.distribution is not None
            np.testing.assert_allclose(r.distribution, solo(model, t)[1][-3:], rtol=1e-5, atol=1e-6)
        await scheduler.close()
        return scheduler

    stats = asyncio.run(main()).stats
    assert stats.remote_batches >= 2 and stats.chars == sum(len(t) for t in texts)


def test_chunks_queued_for_one_session_run_in_order_across_pipelined_batches() -> None:
    """Every session's three chunks are asked for at once: batches pipeline on the compute process,
    but a session is never in two at a time, so each ends where one run over its text does."""
    mv = version()
    model = mv.net
    assert model is not None
    texts = [f"session {i} reads a line of text" for i in range(40)]

    async def main() -> Scheduler:
        scheduler = Scheduler(inline_chars=0, compute_process=True)
        scheduler.start()
        sessions = [Session.fresh(str(i), mv) for i in range(len(texts))]
        thirds = [(t[:10], t[10:20], t[20:]) for t in texts]
        results = await asyncio.gather(
            *(
                scheduler.predict(s, VOCAB.encode(part), 1, True)
                for s, parts in zip(sessions, thirds, strict=True)
                for part in parts
            )
        )
        await scheduler.close()
        for i, (s, t) in enumerate(zip(sessions, texts, strict=True)):
            assert s.offset == len(t)
            last = results[3 * i + 2].distribution
            assert last is not None
            np.testing.assert_allclose(last, solo(model, t)[1][20:], rtol=1e-5, atol=1e-6)
        return scheduler

    stats = asyncio.run(main()).stats
    assert stats.remote_batches >= 3


def test_a_killed_compute_process_falls_back_to_the_batch_thread() -> None:
    mv = version()
    model = mv.net
    assert model is not None

    async def main() -> None:
        scheduler = Scheduler(inline_chars=0, compute_process=True)
        scheduler.start()
        sessions = [Session.fresh(str(i), mv) for i in range(20)]
        await asyncio.gather(*(scheduler.predict(s, VOCAB.encode("hello "), 2, False) for s in sessions))
        assert scheduler.stats.remote_batches >= 1
        pid = scheduler.compute_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        results = await asyncio.gather(
            *(scheduler.predict(s, VOCAB.encode("world"), 2, True) for s in sessions)
        )
        assert scheduler.compute_pid is None  # computing in the thread from now on
        for s, r in zip(sessions, results, strict=True):
            assert s.offset == len("hello world")
            assert r.distribution is not None
            np.testing.assert_allclose(
                r.distribution, solo(model, "hello world")[1][6:], rtol=1e-5, atol=1e-6
            )
        await scheduler.close()

    asyncio.run(main())


def test_a_hung_compute_process_is_given_up_after_its_deadline() -> None:
    """SIGSTOP: the compute process neither answers nor dies. The batch fails over to the thread."""
    mv = version()
    model = mv.net
    assert model is not None

    async def main() -> None:
        scheduler = Scheduler(inline_chars=0, compute_process=True)
        assert isinstance(scheduler.offload, ProcessExecutor) and scheduler.offload.process is not None
        scheduler.offload.process.deadline = 0.5  # a short deadline for the test
        scheduler.start()
        sessions = [Session.fresh(str(i), mv) for i in range(10)]
        await asyncio.gather(*(scheduler.predict(s, VOCAB.encode("hello "), 2, False) for s in sessions))
        pid = scheduler.compute_pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        results = await asyncio.gather(
            *(scheduler.predict(s, VOCAB.encode("world"), 2, True) for s in sessions)
        )
        assert 0.5 <= time.monotonic() - start < 10 and scheduler.compute_pid is None
        for r in results:
            assert r.distribution is not None
            np.testing.assert_allclose(
                r.distribution, solo(model, "hello world")[1][6:], rtol=1e-5, atol=1e-6
            )
        await scheduler.close()
        with contextlib.suppress(ProcessLookupError):  # killed by close(); never left stopped
            os.kill(pid, signal.SIGCONT)

    asyncio.run(main())


def test_the_compute_process_lets_go_of_a_model_the_server_dropped() -> None:
    """Every model sent to the compute process stayed alive in the server for good (a deleted
    version too, and its copy in the child): now the server holds them weakly, and the child
    forgets one the server dropped; the models still in use go on answering right."""
    import gc
    import weakref

    async def main() -> None:
        scheduler = Scheduler(inline_chars=0, compute_process=True)
        scheduler.start()
        first = version()
        sessions = [Session.fresh(str(i), first) for i in range(4)]
        await asyncio.gather(*(scheduler.predict(s, VOCAB.encode("hello "), 2, False) for s in sessions))
        assert scheduler.stats.remote_batches >= 1
        dropped = weakref.ref(first.require())
        del first, sessions  # the version deleted, its sessions closed
        second = version(cell="gru")
        model = second.require()
        sessions = [Session.fresh(str(i), second) for i in range(4)]
        for text in ("hello", " world"):  # the second batch also tells the child to forget
            results = await asyncio.gather(
                *(scheduler.predict(s, VOCAB.encode(text), 2, True) for s in sessions)
            )
            gc.collect()
            assert dropped() is None  # the executor kept it alive before
        for r in results:
            assert r.distribution is not None
            np.testing.assert_allclose(
                r.distribution, solo(model, "hello world")[1][5:], rtol=1e-5, atol=1e-6
            )
        assert scheduler.compute_pid is not None and scheduler.stats.remote_batches >= 3  # the child answered
        await scheduler.close()

    asyncio.run(main())
