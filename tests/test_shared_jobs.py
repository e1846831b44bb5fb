"""Jobs and models shared through one Redis, with real processes and a real redis-server.

Two ``nextchar serve`` replicas with separate model directories and no trainer of
their own (``--trainers 0``) and ``nextchar trainer`` processes, all on one Redis:
a job queued through replica A is listed, watched and cancelled through B, a
second job (its text uploaded through A, trained through B) waits in the queue
behind the first, the model a job registers is listed and served by B, and
default and deletions agree on both. A trainer
SIGKILLed mid-epoch loses its lease, and another trainer takes the job up from
its checkpoint; that one gets SIGTERM (it checkpoints and puts the job back in the
queue), and a third finishes it: the final weights are bit-identical to an
undisturbed run's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from job_harness import CORPUS, MODEL, TrainerProcess, job, start_job, wait_for
from nextchar.proto import nextchar_pb2 as pb
from redis_harness import RedisServer
from server_harness import ServerProcess, cancel, stream_chars, take

LEASE = "2"  # seconds: a dead trainer's job waits this long for another
LONG = pb.TrainConfigSpec(seq_len=32, batch=16, epochs=1000, log_every=5, seed=7)
SHORT = pb.TrainConfigSpec(seq_len=32, batch=16, epochs=1, log_every=5, seed=7)


def store_url(redis_server: RedisServer, db: int) -> str:
    """A Redis database of its own, emptied: the other shared-store tests read their own directories."""
    redis.Redis(port=redis_server.port, db=db).flushdb()
    return f"redis://127.0.0.1:{redis_server.port}/{db}"


@pytest.fixture
def replicas(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[ServerProcess, ServerProcess, str]]:
    url = store_url(redis_server, 2)
    args = ("--store", url, "--trainers", "0", "--compute-in-thread")
    a = ServerProcess(tmp_path / "a", *args)  # installs the shipped default model into the store
    b = ServerProcess(tmp_path / "b", *args)
    yield a, b, url
    a.close()
    b.close()


def models(server: ServerProcess) -> tuple[set[tuple[str, int]], tuple[str, int]]:
    listed = server.stub.ListModels(pb.ListModelsRequest(), timeout=10)
    default = (listed.default_model.name, listed.default_model.version)
    return {(m.model.name, m.model.version) for m in listed.models}, default


def checksum(server: ServerProcess, name: str) -> str:
    described = server.stub.DescribeModel(pb.DescribeModelRequest(model=pb.ModelRef(name=name)), timeout=10)
    return str(json.loads(described.meta_json)["checksum"])


def test_jobs_and_models_are_shared_by_replicas_with_separate_directories(
    tmp_path: Path, replicas: tuple[ServerProcess, ServerProcess, str]
) -> None:
    a, b, url = replicas
    assert models(a) == models(b) == ({("default", 1)}, ("default", 1))  # the one A installed
    trainer = TrainerProcess(  # at DEBUG: its checkpoints are logged too
        url, tmp_path / "t", "--checkpoint-seconds", "0.3", "--job-lease", LEASE, "--log-level", "debug"
    )
    try:
        short = start_job(
            a, "shared", pb.TrainConfigSpec(seq_len=32, batch=16, epochs=1, log_every=5, seed=7)
        )
        events = list(b.stub.WatchJob(pb.WatchJobRequest(job_id=short), timeout=120))  # through B
        assert events[-1].event.job.state == pb.JOB_STATE_SUCCEEDED
        assert sum(e.event.HasField("progress") for e in events) >= 5  # live progress, from B
        assert wait_for(b, short).result.name == "shared"

        # the trainer's model: listed and served by both, without a shared directory
        assert ("shared", 1) in models(a)[0] and ("shared", 1) in models(b)[0]
        created = b.stub.CreateSession(pb.CreateSessionRequest(model=pb.ModelRef(name="shared")), timeout=10)
        replies = stream_chars(b.stub, "To be, or not", created.session.session_id, chunk=4)
        assert sum(r.predictions.count for r in replies) == len("To be, or not")
        stateless = a.stub.Predict(
            pb.PredictRequest(model=pb.ModelRef(name="shared"), text="To be"), timeout=10
        )
        assert (stateless.model.name, stateless.predictions.count) == ("shared", len("To be"))
        assert checksum(a, "shared") == checksum(b, "shared")

        # the default and deletions agree: set on A, seen and guarded on B
        a.stub.SetDefaultModel(
            pb.SetDefaultModelRequest(model=pb.ModelRef(name="shared", version=1)), timeout=10
        )
        assert models(b)[1] == ("shared", 1)
        with pytest.raises(grpc.RpcError) as refused:
            b.stub.DeleteModel(pb.DeleteModelRequest(model=pb.ModelRef(name="shared", version=1)), timeout=10)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        b.stub.SetDefaultModel(
            pb.SetDefaultModelRequest(model=pb.ModelRef(name="default", version=1)), timeout=10
        )
        b.stub.DeleteModel(pb.DeleteModelRequest(model=pb.ModelRef(name="shared", version=1)), timeout=10)
        assert models(a) == ({("default", 1)}, ("default", 1))

        # one trainer: a second job waits behind the first, and runs once B cancels the first
        long = start_job(a, "long", LONG)
        wait_for(b, long, step=10)
        # its text uploaded through A, trained through B: an upload is shared too
        pieces = [
            pb.UploadTextRequest(piece=CORPUS.read_text()[i : i + 10_000]) for i in range(0, 60_000, 10_000)
        ]
        uploaded = a.stub.UploadText(iter(pieces), timeout=30)
        request = pb.TrainRequest(
            model_name="behind", text_id=uploaded.text_id, model_config=MODEL, train_config=SHORT
        )
        call = b.stub.Train(request, timeout=60)
        behind = str(take(call).event.job.job_id)
        cancel(call)
        queued = job(a, behind)
        assert queued.state == pb.JOB_STATE_QUEUED and queued.queue_position == 1
        b.stub.CancelJob(pb.CancelJobRequest(job_id=long), timeout=10)
        cancelled = wait_for(a, long)
        assert cancelled.state == pb.JOB_STATE_CANCELLED and "cancel" in cancelled.error
        assert wait_for(a, behind).state == pb.JOB_STATE_SUCCEEDED
        assert ("long", 1) not in models(b)[0] and ("behind", 1) in models(b)[0]
        log = "".join(trainer.log)
        for event in ("started on trainer", "checkpointed at", "succeeded", "cancelled", "registered by job"):
            assert event in log, event
    finally:
        trainer.close()


def test_a_trainer_s_job_resumes_on_another_from_its_checkpoint_after_sigkill_and_sigterm(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    url = store_url(redis_server, 3)
    replica = ServerProcess(tmp_path / "serve", "--store", url, "--trainers", "0", "--compute-in-thread")
    args = ("--checkpoint-seconds", "0.3", "--job-lease", LEASE)
    first = TrainerProcess(url, tmp_path / "t1", *args)
    second = third = None
    try:
        reference = start_job(replica, "undisturbed")
        assert wait_for(replica, reference).state == pb.JOB_STATE_SUCCEEDED

        killed = start_job(replica, "trainer-killed")
        wait_for(replica, killed, step=200)  # mid-epoch 2: an epoch-end checkpoint behind it
        first.proc.kill()  # its trainer process dies with it; nobody renews the lease
        killed_at = time.monotonic()
        first.proc.wait(10)
        second = TrainerProcess(url, tmp_path / "t2", *args)  # no file of the job on its machine
        resumed_at, taken = second.wait_for_line(" on trainer ")  # the job taken up
        assert "resumed from its checkpoint" in taken.string and killed in taken.string, taken.string
        print(f"trainer SIGKILL -> resumed on another trainer: {resumed_at - killed_at:.2f} s")

        wait_for(replica, killed, step=job(replica, killed).latest.step + 50)
        second.proc.terminate()  # SIGTERM: the trainer checkpoints, and the job goes back to the queue
        assert second.proc.wait(30) == 0
        assert job(replica, killed).state == pb.JOB_STATE_QUEUED
        third = TrainerProcess(url, tmp_path / "t3", *args)
        _, taken = third.wait_for_line(" on trainer ")
        assert "resumed from its checkpoint" in taken.string, taken.string
        info = wait_for(replica, killed)
        assert info.state == pb.JOB_STATE_SUCCEEDED and info.attempts == 3
        assert checksum(replica, "trainer-killed") == checksum(replica, "undisturbed")  # bit-identical
    finally:
        for trainer in (first, second, third):
            if trainer is not None:
                trainer.close()
        replica.close()
