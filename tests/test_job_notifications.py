"""Jobs on a shared Redis reach watchers and trainers by notification, not by polling the store.

Real ``nextchar serve`` replicas (no trainer of their own) and a real ``nextchar
trainer`` on a real redis-server, watched through Redis' own command counts: a
trainer elsewhere takes a job queued through a replica at once (the replica's Train
answers RUNNING first), idle watchers cost the store nothing, and one change is
read once for the queue's places however many watch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from job_harness import MODEL, TrainerProcess
from nextchar.core.demo import NOTEBOOK_TEXT
from nextchar.proto import nextchar_pb2 as pb
from redis_harness import RedisServer
from server_harness import ServerProcess, cancel, take, wait_until

LONG = pb.TrainConfigSpec(seq_len=8, batch=1, epochs=100_000, log_every=1_000_000, val_fraction=0.0)


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[tuple[str, redis.Redis]]:
    client = redis.Redis(port=redis_server.port, db=7)
    client.flushdb()
    yield f"redis://127.0.0.1:{redis_server.port}/7", client
    client.close()


def train(server: ServerProcess, name: str) -> pb.JobInfo:
    """Queue a long job through server; its first status."""
    request = pb.TrainRequest(model_name=name, text=NOTEBOOK_TEXT, model_config=MODEL, train_config=LONG)
    call = server.stub.Train(request, timeout=60)
    first = take(call).event.job
    cancel(call)  # stop watching; the job goes on
    return first


def settled(client: redis.Redis, quiet: float = 0.5, timeout: float = 30.0) -> None:
    """Wait until the store sees no job reads for quiet seconds: the watchers have all read what
    they were started with, however slow the machine."""
    deadline = time.monotonic() + timeout
    while True:
        client.config_resetstat()
        time.sleep(quiet)
        if (calls(client, "lrange"), calls(client, "hget")) == (0, 0):
            return
        assert time.monotonic() < deadline, "the watchers never settled"


def calls(client: redis.Redis, command: str) -> int:
    stats = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def test_a_free_trainer_elsewhere_takes_a_replica_s_job_at_once(
    tmp_path: Path, store: tuple[str, redis.Redis]
) -> None:
    """The trainer hears of the job from the store: the Train answers RUNNING first, not QUEUED
    (the trainer looked at the queue every 0.5 s, the replica only told its own trainers)."""
    url, _ = store
    replica = ServerProcess(tmp_path / "serve", "--store", url, "--trainers", "0", "--compute-in-thread")
    trainer = TrainerProcess(url, tmp_path / "t")
    try:
        for i in range(3):
            first = train(replica, f"quick{i}")
            assert first.state == pb.JOB_STATE_RUNNING, first
            replica.stub.CancelJob(pb.CancelJobRequest(job_id=first.job_id), timeout=10)
            trainer.wait_for_line("cancelled")
    finally:
        trainer.close()
        replica.close()


def test_idle_watchers_cost_the_store_nothing_and_a_change_is_placed_once(
    tmp_path: Path, store: tuple[str, redis.Redis]
) -> None:
    """Twenty WatchJob streams on a job waiting in the queue (no trainer runs): in two quiet
    seconds they read nothing (they polled the store every 0.2 s each); when one more job is
    queued, the queue's places are read once for all of them (they were read once per watcher)."""
    url, client = store
    replica = ServerProcess(tmp_path / "serve", "--store", url, "--trainers", "0", "--compute-in-thread")
    watches: list[grpc.CallIterator[pb.WatchJobResponse]] = []
    try:
        waiting = train(replica, "waiting")
        assert waiting.state == pb.JOB_STATE_QUEUED
        for _ in range(20):
            watch = replica.stub.WatchJob(pb.WatchJobRequest(job_id=waiting.job_id), timeout=60)
            assert take(watch).event.job.queue_position == 1
            watches.append(watch)
        settled(client)  # the watchers are all waiting now
        client.config_resetstat()
        time.sleep(2.0)
        assert (calls(client, "lrange"), calls(client, "hget")) == (0, 0)

        client.config_resetstat()
        assert train(replica, "behind").queue_position == 2
        wait_until(lambda: calls(client, "xinfo|groups"), 30, "the watchers looked again")
        time.sleep(1.0)  # and every one of them has, on a slow machine too
        print(f"one change, 20 watchers: {calls(client, 'xinfo|groups')} reads of the queue's places")
        assert 1 <= calls(client, "xinfo|groups") <= 3
    finally:
        for watch in watches:
            cancel(watch)
        replica.close()
