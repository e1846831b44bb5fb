"""The scheduler, its executors and the batch arithmetic, the session manager's turns and commits,
and the per-session memory budget, in-process (no network needed)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from nextchar.core.config import ModelConfig, Sampling
from nextchar.core.inference import feed, initial_probs, top_k_rows
from nextchar.core.model import CharRNN
from nextchar.core.vocab import Vocab
from nextchar.server.batching.executors import ProcessExecutor
from nextchar.server.batching.scheduler import Scheduler
from nextchar.server.batching.work import BatchStats, Generated, PredictWork, Rows, compute
from nextchar.server.budget import ReplyBudget
from nextchar.server.catalog import Catalog
from nextchar.server.errors import Aborted
from nextchar.server.registry import ModelVersion, Registry
from nextchar.server.sessions.limits import Limits
from nextchar.server.sessions.manager import SessionManager
from nextchar.server.sessions.memory import InMemorySessionStore
from nextchar.server.sessions.session import Session, start_value
from nextchar.server.sessions.trail import Trail
from nextchar.server.sessions.value import SessionValue

VOCAB = Vocab.from_text("abcdefghijklmnopqrstuvwxyz ,.")


def version(hidden: int = 64, cell: str = "rnn") -> ModelVersion:
    model = CharRNN.create(ModelConfig(cell=cell, hidden=hidden), VOCAB, seed=1)
    return ModelVersion.from_model("m", 1, Path("m/1.npz"), model, [], {}, {})


def manager(scheduler: Scheduler, tmp: Path = Path("unused-model-dir")) -> SessionManager:
    """A session manager on scheduler, sessions in memory (its models are given, never looked up)."""
    return SessionManager(
        InMemorySessionStore(idle_timeout=600),
        scheduler,
        Catalog(Registry(tmp)),
        Limits(),
        ReplyBudget(1 << 30),
    )


def work(
    loop: asyncio.AbstractEventLoop, mv: ModelVersion, value: SessionValue, text: str, k: int
) -> PredictWork:
    net = mv.require()
    return PredictWork(
        object(), net, VOCAB.encode(text), value.state, value.probs, k, True, loop.create_future()
    )


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
    start = start_value(mv, model)
    works = [work(loop, mv, start, t, 3) for t in texts]
    results = compute(works, BatchStats())
    for result, text in zip(results, texts, strict=True):
        want_top1, want_probs = solo(model, text)
        assert isinstance(result, Rows)
        np.testing.assert_array_equal(result.top_index[:, 0], want_top1)
        assert result.distribution is not None
        np.testing.assert_allclose(result.distribution, want_probs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.probs, want_probs[-1], rtol=1e-5, atol=1e-6)
        assert result.top_index.shape == (len(text), 3)
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
        sessions = manager(scheduler)
        created = [await sessions.create("", mv) for _ in range(50)]
        await asyncio.gather(*(sessions.predict(s, "hello", 3, False) for s in created))
        await scheduler.close()
        assert all(s.offset == 5 for s in created)
        return scheduler

    stats = asyncio.run(main()).stats
    assert stats.chars == 250 and stats.max_sessions == 50
    assert stats.steps <= 10  # 5 positions, one or two batches: never one step per session


def test_streams_on_a_slow_model_are_still_stepped_together() -> None:
    """Streams that each wait for the previous reply, on a model whose inline step takes longer
    than the lone-request window: the requests that waited for the loop meanwhile are batched,
    not stepped one by one as if each were alone."""
    mv = version(hidden=512, cell="gru")
    chunk = ("the quick brown fox jumps over the lazy dog, " * 2)[:64]

    async def main() -> Scheduler:
        scheduler = Scheduler()  # 64-character chunks of a few sessions run inline
        scheduler.start()
        sessions = manager(scheduler)
        created = [await sessions.create("", mv) for _ in range(12)]

        async def stream(session: Session) -> None:
            for _ in range(4):
                await sessions.predict(session, chunk, 3, False)

        await asyncio.gather(*(stream(s) for s in created))
        await scheduler.close()
        return scheduler

    stats = asyncio.run(main()).stats
    assert stats.chars == 12 * 4 * 64
    assert stats.batches <= 12, f"{stats.batches} batches for 12 streams x 4 chunks"


def test_idle_session_costs_at_most_4_kb_beyond_its_state() -> None:
    mv = version(hidden=256)
    model = mv.net
    assert model is not None
    sessions = manager(Scheduler())
    n = 5000

    async def add_all() -> None:
        for _ in range(n):
            state, probs = model.initial_state(1)[0], model.initial_state(1)[0][: VOCAB.size].copy()
            value = SessionValue(state, probs, 123, Trail(0))
            await sessions.store.add(Session(sessions.admit(""), mv, value), 100_000)

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


def test_a_change_for_a_session_closed_in_flight_is_not_applied() -> None:
    mv = version()

    async def main() -> None:
        scheduler = Scheduler(inline_chars=0)  # everything queues: the close lands before the batch runs
        sessions = manager(scheduler)
        session = await sessions.create("s", mv)
        before = session.value
        pending = asyncio.ensure_future(sessions.predict(session, "hello", 3, False))
        await asyncio.sleep(0)
        await sessions.close("s")
        scheduler.start()
        with pytest.raises(Aborted, match="reset or closed"):
            await pending
        assert session.value is before and sessions.budget.used == 0
        await scheduler.close()

    asyncio.run(main())


def test_changes_of_one_session_asked_at_once_take_turns_in_order() -> None:
    """Three chunks of one session sent on three calls at once: each waits its turn and is
    computed from the value the one before left, as one run over the whole text."""
    mv = version()
    model = mv.require()

    async def main() -> None:
        scheduler = Scheduler(inline_chars=0)
        scheduler.start()
        sessions = manager(scheduler)
        session = await sessions.create("s", mv)
        parts = ("the cat ", "sat on ", "the mat")
        results = await asyncio.gather(*(sessions.predict(session, p, 2, True) for p in parts))
        await scheduler.close()
        assert [r.start_offset for r in results] == [0, 8, 15] and session.offset == 22
        want = solo(model, "".join(parts))[1]
        for r, start in zip(results, (0, 8, 15), strict=True):
            assert r.rows.distribution is not None
            np.testing.assert_allclose(
                r.rows.distribution, want[start : start + r.rows.n], rtol=1e-5, atol=1e-6
            )
        assert len(sessions.turns) == 0  # nothing held once the changes are done

    asyncio.run(main())


def test_a_failing_work_fails_alone_not_the_batch_beside_it() -> None:
    """One work whose arithmetic raises (a state of the wrong size stands in for any bug or
    poison) is batched with well-behaved ones: only it fails; the others get their rows."""
    mv = version()
    model = mv.require()

    async def main() -> None:
        scheduler = Scheduler(inline_chars=0)
        scheduler.start()
        start = start_value(mv, model)
        good = [
            scheduler.predict(object(), model, VOCAB.encode("hello"), start.state, start.probs, 2, True)
            for _ in range(5)
        ]
        bad = scheduler.predict(object(), model, VOCAB.encode("hello"), start.state[:3], start.probs, 2, True)
        results = await asyncio.gather(*good, bad, return_exceptions=True)
        await scheduler.close()
        assert all(isinstance(r, Rows) for r in results[:5]) and isinstance(results[5], Exception)
        for r in results[:5]:
            assert isinstance(r, Rows) and r.distribution is not None
            np.testing.assert_allclose(r.distribution, solo(model, "hello")[1], rtol=1e-5, atol=1e-6)

    asyncio.run(main())


def test_a_lone_character_matches_the_same_character_in_a_mixed_batch() -> None:
    """advance's one-character case (one step, one sort) against its general case (the same
    character beside a longer chunk: probability tables, argmax passes)."""
    mv = version(cell="lstm")
    model = mv.net
    assert model is not None
    loop = asyncio.new_event_loop()
    start = start_value(mv, model)
    warm = feed(model, start.state, start.probs, VOCAB.encode("the cat"))
    mid = SessionValue(warm.states[0], warm.last_probs[0], 7, Trail(0))  # mid-text: non-trivial surprisal
    one, other = work(loop, mv, mid, "a", 4), work(loop, mv, start, "dog", 4)
    lone, mixed = compute([one], BatchStats())[0], compute([other, one], BatchStats())[1]
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
        manager_ = manager(scheduler)
        sessions = [await manager_.create("", mv) for _ in range(len(texts))]
        results = await asyncio.gather(
            *(manager_.predict(s, t[:-3], 2, True) for s, t in zip(sessions, texts, strict=True))
        )
        for s, t, r in zip(sessions, texts, results, strict=True):
            assert s.offset == len(t) - 3
            assert r.rows.distribution is not None
            np.testing.assert_allclose(r.rows.distribution, solo(model, t[:-3])[1], rtol=1e-5, atol=1e-6)
        again = await asyncio.gather(
            *(manager_.predict(s, t[-3:], 2, True) for s, t in zip(sessions, texts, strict=True))
        )
        for t, r in zip(texts, again, strict=True):
            assert r.rows.distribution is not None
            np.testing.assert_allclose(r.rows.distribution, solo(model, t)[1][-3:], rtol=1e-5, atol=1e-6)
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
        manager_ = manager(scheduler)
        sessions = [await manager_.create("", mv) for _ in range(len(texts))]
        thirds = [(t[:10], t[10:20], t[20:]) for t in texts]
        results = await asyncio.gather(
            *(
                manager_.predict(s, part, 1, True)
                for s, parts in zip(sessions, thirds, strict=True)
                for part in parts
            )
        )
        await scheduler.close()
        for i, (s, t) in enumerate(zip(sessions, texts, strict=True)):
            assert s.offset == len(t)
            last = results[3 * i + 2].rows.distribution
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
        manager_ = manager(scheduler)
        sessions = [await manager_.create("", mv) for _ in range(20)]
        await asyncio.gather(*(manager_.predict(s, "hello ", 2, False) for s in sessions))
        assert scheduler.stats.remote_batches >= 1
        pid = scheduler.compute_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        results = await asyncio.gather(*(manager_.predict(s, "world", 2, True) for s in sessions))
        assert scheduler.compute_pid is None  # computing in the thread from now on
        for s, r in zip(sessions, results, strict=True):
            assert s.offset == len("hello world")
            assert r.rows.distribution is not None
            np.testing.assert_allclose(
                r.rows.distribution, solo(model, "hello world")[1][6:], rtol=1e-5, atol=1e-6
            )
        await scheduler.close()

    asyncio.run(main())


def drawn_pieces(compute_process: bool, length: int = 64, pieces: int = 2) -> tuple[list[Generated], int]:
    """A static session's generation, piece after piece from one seeded generator, and how many
    batches the compute process answered."""
    mv = version(cell="gru")
    model = mv.require()
    start = start_value(mv, model)

    async def main() -> tuple[list[Generated], int]:
        scheduler = Scheduler(inline_chars=0, compute_process=compute_process)
        scheduler.start()
        rng, state, probs, out = np.random.default_rng(7), start.state, start.probs, []
        for _ in range(pieces):
            piece = await scheduler.generate(
                object(), model, state, probs, length, rng, Sampling(temperature=0.8, top_k=5)
            )
            out.append(piece)
            state, probs = piece.state, piece.probs
        await scheduler.close()
        return out, scheduler.stats.remote_batches

    return asyncio.run(main())


def test_generations_in_the_compute_process_draw_what_the_thread_draws() -> None:
    """A static session's Generate pieces are drawn in the compute process (off the server's GIL),
    bit for bit what the thread draws: the same text, state and prediction, and the generator
    moved on as far (the second piece draws on from where the first left it)."""
    there, remote = drawn_pieces(compute_process=True)
    here, _ = drawn_pieces(compute_process=False)
    assert remote == 2
    assert [p.text for p in there] == [p.text for p in here] and len(there[1].text) == 64
    for a, b in zip(there, here, strict=True):
        assert np.array_equal(a.state, b.state) and np.array_equal(a.probs, b.probs)
        assert np.array_equal(a.idx, b.idx)


@pytest.mark.parametrize("compute_process", [True, False])
def test_a_batch_of_draws_that_fails_part_way_is_drawn_again_the_same(compute_process: bool) -> None:
    """One generation of a batch is drawn, then the next fails (a state no model has): the batch
    is computed again work by work (in the thread: the compute process is given up), and the
    first generation draws what it drew the first time (its generator had not moved), the failure
    staying with its work. (Its generator moved by the failed try, a seeded Generate batched
    beside a failing one drew other text.)"""
    mv = version(cell="gru")
    model = mv.require()
    start = start_value(mv, model)
    sampling = Sampling(temperature=0.8, top_k=5)

    async def main() -> tuple[Generated, BaseException | Generated, int | None]:
        scheduler = Scheduler(inline_chars=0, compute_process=compute_process)
        scheduler.start()
        await scheduler.predict(object(), model, VOCAB.encode("a"), start.state, start.probs, 1, False)
        good = scheduler.generate(
            object(), model, start.state, start.probs, 64, np.random.default_rng(7), sampling
        )
        bad_state = np.zeros(3, dtype=start.state.dtype)  # no cell takes it: its product fails
        bad = scheduler.generate(
            object(), model, bad_state, start.probs, 64, np.random.default_rng(8), sampling
        )
        drawn, failed = await asyncio.gather(good, bad, return_exceptions=True)
        assert isinstance(drawn, Generated)
        pid = scheduler.compute_pid
        await scheduler.close()
        return drawn, failed, pid

    drawn, failed, pid = asyncio.run(main())
    assert isinstance(failed, ValueError) and pid is None  # the process gave up, the thread failed it alone
    alone = drawn_pieces(compute_process=False, pieces=1)[0][0]
    assert drawn.text == alone.text and np.array_equal(drawn.state, alone.state)


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
        manager_ = manager(scheduler)
        sessions = [await manager_.create("", mv) for _ in range(10)]
        await asyncio.gather(*(manager_.predict(s, "hello ", 2, False) for s in sessions))
        pid = scheduler.compute_pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        results = await asyncio.gather(*(manager_.predict(s, "world", 2, True) for s in sessions))
        assert 0.5 <= time.monotonic() - start < 10 and scheduler.compute_pid is None
        for r in results:
            assert r.rows.distribution is not None
            np.testing.assert_allclose(
                r.rows.distribution, solo(model, "hello world")[1][6:], rtol=1e-5, atol=1e-6
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
        manager_ = manager(scheduler)
        first = version()
        sessions = [await manager_.create("", first) for _ in range(4)]
        await asyncio.gather(*(manager_.predict(s, "hello ", 2, False) for s in sessions))
        assert scheduler.stats.remote_batches >= 1
        dropped = weakref.ref(first.require())
        for s in sessions:
            await manager_.close(s.id)
        del first, sessions, s  # the version deleted, its sessions closed
        second = version(cell="gru")
        model = second.require()
        sessions = [await manager_.create("", second) for _ in range(4)]
        for text in ("hello", " world"):  # the second batch also tells the child to forget
            results = await asyncio.gather(*(manager_.predict(s, text, 2, True) for s in sessions))
            gc.collect()
            assert dropped() is None  # the executor kept it alive before
        for r in results:
            assert r.rows.distribution is not None
            np.testing.assert_allclose(
                r.rows.distribution, solo(model, "hello world")[1][5:], rtol=1e-5, atol=1e-6
            )
        assert scheduler.compute_pid is not None and scheduler.stats.remote_batches >= 3  # the child answered
        await scheduler.close()

    asyncio.run(main())


def test_one_character_work_is_not_held_behind_a_long_chunk() -> None:
    """A 4,096-character chunk (a prime) computes off the loop; one-character messages of other
    streams asked meanwhile are answered without waiting for it (they waited for all of it when
    batched with it, or queued behind it)."""
    mv = version(hidden=512, cell="gru")
    model = mv.require()
    start = start_value(mv, model)
    long_text = VOCAB.encode(("the quick brown fox jumps over the lazy dog " * 100)[:4096])

    async def main() -> tuple[int, bool]:
        scheduler = Scheduler()
        scheduler.start()
        long = asyncio.ensure_future(
            scheduler.predict(object(), model, long_text, start.state, start.probs, 1, False)
        )
        await asyncio.sleep(0.005)
        rounds = 0
        keys = [object() for _ in range(5)]
        while not long.done() and rounds < 50:
            one = VOCAB.encode("a")
            await asyncio.gather(
                *(scheduler.predict(k, model, one, start.state, start.probs, 3, False) for k in keys)
            )
            rounds += 1
        answered_first = not long.done()
        await long
        await scheduler.close()
        return rounds, answered_first

    rounds, answered_first = asyncio.run(main())
    assert answered_first and rounds >= 3, (
        f"{rounds} rounds of one-character messages while the long chunk computed"
    )


def test_one_character_work_is_not_held_behind_a_generate_piece() -> None:
    """A Generate's 64-character piece draws character by character: it is long work, computed off
    the loop, however few characters it counts (counted as 64 batched ones, it ran on the loop
    and held every stream batched with it, ~5 ms at H=256: make bench-abuse's poison kind)."""
    mv = version(hidden=512, cell="gru")
    model = mv.require()
    start = start_value(mv, model)

    async def main() -> int:
        scheduler = Scheduler()
        scheduler.start()
        drawing = asyncio.ensure_future(
            scheduler.generate(
                object(), model, start.state, start.probs, 64, np.random.default_rng(0), Sampling()
            )
        )
        await asyncio.sleep(0)
        rounds = 0  # rounds answered while it was still drawing
        keys = [object() for _ in range(5)]
        while not drawing.done():
            one = VOCAB.encode("a")
            await asyncio.gather(
                *(scheduler.predict(k, model, one, start.state, start.probs, 3, False) for k in keys)
            )
            rounds += not drawing.done()
        await scheduler.close()
        return rounds

    rounds = asyncio.run(main())
    assert rounds >= 3, f"{rounds} rounds of one-character messages answered while it drew"


def test_adaptive_steps_never_run_on_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """An adaptive session's chunks that complete a window (a gradient step) are computed off the
    loop; the one-character chunks between steps may run on it, like static ones (a lone one at
    once, inline)."""
    from nextchar.core import adapt

    mv = version(cell="gru")
    threads: list[bool] = []  # per gradient step: was it computed on the loop's thread?
    learnt = adapt._learnt

    def recorded(*args: object, **kwargs: object) -> object:
        threads.append(threading.get_ident() == loop_thread)
        return learnt(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(adapt, "_learnt", recorded)  # every step, served or replayed, goes through it
    loop_thread = threading.get_ident()

    async def main() -> tuple[int, int]:
        scheduler = Scheduler()
        scheduler.start()
        sessions = manager(scheduler)
        session = await sessions.create("", mv, adapt=True)
        for ch in "hello world, hello there, hello again " * 2:  # 76 characters: 3 steps
            await sessions.predict(session, ch, 1, False)
        await scheduler.close()
        assert session.value.adapter is not None
        return session.value.adapter.steps, scheduler.stats.batches

    steps, batches = asyncio.run(main())
    assert steps == 3 and threads and not any(threads)
    assert batches >= 70  # the rest ran as one-character batches (inline while alone)
