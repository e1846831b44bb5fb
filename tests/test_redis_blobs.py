"""Files in Redis (nextchar.server.blobs) and the shared model registry's guards, on a real redis-server.

A blob larger than a chunk comes back byte for byte; a rewrite leaves no chunk of
the old file behind; a damaged chunk is refused, never written out. Two processes
publishing the same version of a model cannot both get it, and the default can
neither be set to a deleted version nor be deleted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis
from nextchar.core.config import ModelConfig, TrainConfig
from nextchar.server.blobs import CHUNK, BlobChanged, Blobs, connect
from nextchar.server.shared_models import INDEX, RedisModelFiles
from redis_harness import RedisServer

if TYPE_CHECKING:
    from nextchar.server.training.store import JobStore

DB = 4  # a database of its own


def chunk(client: redis.Redis, key: str, i: int) -> str:
    """The name of the i-th chunk of the blob's current generation."""
    gen = client.hget(key, "gen")
    assert isinstance(gen, bytes)
    return f"{key}:{gen.decode()}:{i}"


@pytest.fixture
def client(redis_server: RedisServer) -> redis.Redis:
    client = connect(f"redis://127.0.0.1:{redis_server.port}/{DB}")
    client.flushdb()
    return client


def test_a_blob_of_several_chunks_round_trips_and_a_rewrite_leaves_nothing_behind(
    client: redis.Redis, tmp_path: Path
) -> None:
    blobs = Blobs(client)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(2 * CHUNK + 1234))  # three chunks
    sha = blobs.put("k", big)
    assert blobs.sha256("k") == sha and client.hget("k", "chunks") == b"3"
    assert blobs.get("k", tmp_path / "back.bin") == sha
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()

    small = tmp_path / "small.bin"
    small.write_bytes(b"hello")
    blobs.put("k", small)
    assert sorted(client.keys("k*")) == [b"k", chunk(client, "k", 0).encode()]
    assert blobs.get("k", tmp_path / "back.bin") is not None
    assert (tmp_path / "back.bin").read_bytes() == b"hello"

    blobs.delete("k")
    assert client.keys("k*") == [] and blobs.get("k", tmp_path / "gone.bin") is None


def test_a_damaged_blob_is_refused_and_never_written_out(client: redis.Redis, tmp_path: Path) -> None:
    blobs = Blobs(client)
    source = tmp_path / "model.npz"
    source.write_bytes(os.urandom(1000))
    blobs.put("k", source)
    client.set(chunk(client, "k", 0), b"x" * 1000)  # same size, other bytes
    target = tmp_path / "target.npz"
    with pytest.raises(BlobChanged):
        blobs.get("k", target)
    assert not target.exists() and list(tmp_path.glob(".*.tmp")) == []


def test_shared_versions_cannot_be_taken_twice_and_the_default_stays_usable(
    client: redis.Redis, tmp_path: Path
) -> None:
    a = RedisModelFiles(client, "redis://test", tmp_path / "a")
    b = RedisModelFiles(client, "redis://test", tmp_path / "b")
    first, second = tmp_path / "first.npz", tmp_path / "second.npz"
    first.write_bytes(b"first model")
    second.write_bytes(b"second model")
    assert a.publish(("m", 1), first)
    assert not b.publish(("m", 1), second)  # taken: b registers the next version instead
    assert b.publish(("m", 2), second)
    assert client.hlen(INDEX) == 2
    assert (tmp_path / "b" / "m" / "1.npz").exists() is False
    assert b.files()[("m", 1)].read_bytes() == b"first model"  # b's cache gets a's file

    assert a.write_pointer(("m", 1)) and b.read_pointer() == ("m", 1)
    assert not b.withdraw(("m", 1), tmp_path / "b" / "m" / "1.npz")  # the default: refused
    assert b.withdraw(("m", 2), tmp_path / "b" / "m" / "2.npz")
    assert not a.write_pointer(("m", 2))  # deleted: the default cannot name it
    assert set(a.files()) == {("m", 1)} and a.read_pointer() == ("m", 1)


def test_replicas_starting_at_once_on_an_empty_store_install_the_shipped_model_once(
    client: redis.Redis, tmp_path: Path
) -> None:
    """Both find the shared registry empty at start (load_all before either installs); the one that
    installs second takes up the first one's version 1 instead of adding a v2."""
    from nextchar.server.app import install_default_model
    from nextchar.server.registry import Registry

    a, b = (Registry(tmp_path / d, RedisModelFiles(client, "redis://test", tmp_path / d)) for d in "ab")
    a.load_all()
    b.load_all()
    assert a.is_empty and b.is_empty
    install_default_model(a)
    install_default_model(b)
    for replica in (a, b):
        assert [(v.name, v.version) for v in replica.versions()] == [("default", 1)]
        assert replica.default is not None and replica.default.version == 1
    assert client.hlen(INDEX) == 1


@pytest.mark.parametrize("shared", [True, False])
def test_queue_places_are_the_order_trainers_take_jobs_in(
    client: redis.Redis, tmp_path: Path, shared: bool
) -> None:
    """Three jobs queued in turn; the first is taken, then paused (back in the queue): the places
    ListJobs shows are the order the next takes follow, in Redis (the paused job's turn is at the
    stream's end) as in the local journal (it keeps its place)."""
    from nextchar.server.training.journal import LocalJobStore
    from nextchar.server.training.redis_jobs import RedisJobStore

    store = (
        RedisJobStore(client, "redis://test", 15.0, tmp_path / "cache")
        if shared
        else LocalJobStore(tmp_path / "_jobs")
    )
    ids = queue_three_jobs(store, tmp_path)
    assert store.queue() == ids
    first = store.take("t1")
    assert first is not None and first.job_id == ids[0]
    assert store.queue() == ids[1:]
    store.release(first, requeue=True)
    order = store.queue()
    assert order == ([*ids[1:], ids[0]] if shared else ids)
    taken = []
    while (claim := store.take("t2")) is not None:
        taken.append(claim.job_id)
    assert taken == order and store.queue() == []


def test_a_job_cancelled_while_it_waits_takes_no_place(client: redis.Redis, tmp_path: Path) -> None:
    """Its turn stays in the Redis stream until a trainer drops it; the places skip it meanwhile."""
    import asyncio

    from nextchar.server.training.jobs import JobManager
    from nextchar.server.training.redis_jobs import RedisJobStore

    store = RedisJobStore(client, "redis://test", 15.0, tmp_path / "cache")
    ids = queue_three_jobs(store, tmp_path)
    jobs = JobManager(store, max_vocab=100)

    async def cancel_the_first() -> None:
        await jobs.load()
        assert await jobs.places() == {ids[0]: 1, ids[1]: 2, ids[2]: 3}
        await jobs.cancel(ids[0])
        assert store.queue() == ids  # the cancelled job's turn is still in the stream
        assert await jobs.places() == {ids[1]: 1, ids[2]: 2}

    asyncio.run(cancel_the_first())


def test_the_queue_comes_back_after_redis_lost_it(client: redis.Redis, tmp_path: Path) -> None:
    """A restart without persistence empties Redis: the next read says UNAVAILABLE, the one after
    finds an empty queue made again (not the same error for ever)."""
    from nextchar.server.errors import Unavailable
    from nextchar.server.training.redis_jobs import RedisJobStore

    store = RedisJobStore(client, "redis://test", 15.0, tmp_path / "cache")
    assert store.queue() == []
    client.flushdb()
    with pytest.raises(Unavailable):
        store.queue()
    assert store.queue() == []


def queue_three_jobs(store: JobStore, tmp_path: Path) -> list[str]:
    """Three jobs added in turn (created 0, 1, 2); their ids, oldest first."""
    from nextchar.server.training.store import Job

    text = tmp_path / "text.txt"
    ids = [c * 32 for c in "abc"]
    for i, job_id in enumerate(ids):
        text.write_text("some text")  # add() takes the file into the job's own store
        store.add(
            Job(
                id=job_id,
                model_name="m",
                promote=False,
                model_config=ModelConfig(),
                train_config=TrainConfig(),
                created=i,
            ),
            text,
        )
    return ids


@pytest.mark.parametrize("shared", [True, False], ids=["redis", "journal"])
def test_only_the_newest_ended_jobs_are_kept_and_a_resumed_one_never_goes(
    client: redis.Redis, tmp_path: Path, shared: bool
) -> None:
    """Retention (max_finished_jobs): of three ended jobs and one still queued, prune(1) removes the
    two that ended first, with their files; a job queued again (ResumeJob) after it was read as
    ended is not removed."""
    import asyncio

    from nextchar.server.training.jobs import JobManager
    from nextchar.server.training.journal import LocalJobStore
    from nextchar.server.training.redis_jobs import RedisJobStore
    from nextchar.server.training.store import FAILED, QUEUED, SUCCEEDED, Job

    store = (
        RedisJobStore(client, "redis://test", 15.0, tmp_path / "cache")
        if shared
        else LocalJobStore(tmp_path / "_jobs")
    )
    ids = [*queue_three_jobs(store, tmp_path)]
    text = tmp_path / "text.txt"
    text.write_text("some text")
    store.add(
        Job(
            id="d" * 32, model_name="m", promote=False, model_config=ModelConfig(), train_config=TrainConfig()
        ),
        text,
    )
    ended = {ids[0]: (SUCCEEDED, 30.0), ids[1]: (FAILED, 10.0), ids[2]: (SUCCEEDED, 20.0)}
    for job in store.all():
        if job.id in ended:
            job.state, job.finished = ended[job.id]
            store.save(job)
    jobs = JobManager(store, max_vocab=100)
    if shared:
        assert client.exists(f"nextchar:job:{ids[1]}", f"nextchar:job:{ids[1]}:text") == 2
    assert asyncio.run(jobs.prune(1)) == 2  # ended at 10 and 20 go; the newest, at 30, stays
    assert [j.id for j in store.all()] == [ids[0], "d" * 32]
    assert store.records(ids[1]) == [] and not (tmp_path / "_jobs" / ids[1]).exists()
    if shared:
        assert not client.exists(f"nextchar:job:{ids[1]}", f"nextchar:job:{ids[1]}:text")
    resumed = store.get(ids[0])
    resumed.state = QUEUED  # ResumeJob queued it after prune read it as ended
    store.save(resumed)
    assert not store.remove(ids[0]) and store.get(ids[0]).state == QUEUED
    assert asyncio.run(jobs.prune(0)) == 0


def test_a_replica_that_loses_a_version_race_leaves_the_winners_file_alone(
    client: redis.Redis, tmp_path: Path
) -> None:
    """Two replicas with shared models on one common model directory: the one that loses the race
    for version 1 wrote its model over the winner's file and then unlinked it, so the winner,
    once its network was released, could not load its own version again."""
    import numpy as np
    from nextchar.core.config import ModelConfig
    from nextchar.core.demo import NOTEBOOK_TEXT
    from nextchar.core.model import CharRNN
    from nextchar.core.modelfile import load_model
    from nextchar.core.vocab import Vocab
    from nextchar.server.registry import Registry

    vocab = Vocab.from_text(NOTEBOOK_TEXT)
    first, second = (CharRNN.create(ModelConfig(hidden=8), vocab, seed=s) for s in (0, 1))
    a, b = (Registry(tmp_path, RedisModelFiles(client, "redis://test", tmp_path)) for _ in "ab")
    a.load_all()
    b.load_all()
    won = a.register("m", first, history=[], summary={})
    # b chose its versions before a's file appeared (the race, as register() runs it): 1 first
    with b._lock:
        lost = b._save("m", iter((1, 2)), second, [], {}, False)
    assert lost is not None and (won.version, lost.version) == (1, 2)
    assert load_model(tmp_path / "m" / "1.npz").meta["checksum"] == won.checksum
    won.release()
    np.testing.assert_array_equal(won.require().params["Why"], first.params["Why"])
    assert not list((tmp_path / "m").glob(".*"))  # no staging file left behind
