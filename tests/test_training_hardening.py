"""Cancelled and broken training work leaves nothing behind, with real server processes and raw gRPC.

A storm of Trains cut off by their deadlines queues no job for a caller that was
never told of it and leaves no text and no empty job directory; a Train's inline
text counts against max_pending_upload_bytes like an upload; uploads whose client
vanished are not committed as texts; thousands of kept texts do not make every
upload start slow the calls beside it; and a trainer paused while it registers a
model, after another trainer took its job over, adds no second version and does
not move the default (a real redis-server and real ``nextchar trainer`` processes).
A trainer that loses its job says which, who has it now and what becomes of its
work: taken over by a named trainer, or gone from a store that lost its data.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import redis
from job_harness import TrainerProcess, start_job, wait_for
from nextchar.core.demo import NOTEBOOK_TEXT
from nextchar.proto import nextchar_pb2 as pb
from redis_harness import RedisServer
from server_harness import ServerProcess, cancel, error_details, take, wait_until

CLIENTS = str(Path(__file__).with_name("fault_clients.py"))
QUICK = pb.TrainConfigSpec(epochs=1, seq_len=8, batch=1, val_fraction=0.0)


def text_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.txt")) if directory.is_dir() else []


def until(condition: object, timeout: float = 20.0) -> None:
    """Wait for condition() to hold (a callable), failing the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout} s")
        time.sleep(0.1)


def test_a_deadline_storm_of_trains_queues_nothing_and_leaves_no_file(tmp_path: Path) -> None:
    """40 Trains of a 3 MB inline text with a 60 ms deadline, 8 at a time. Every job whose caller
    was not told of it (DEADLINE_EXCEEDED before the first event) ends cancelled; once they have,
    no text is left in _texts and every job directory holds its record."""
    server = ServerProcess(tmp_path, "--sweep-interval", "0.5")
    text = NOTEBOOK_TEXT * (3_000_000 // len(NOTEBOOK_TEXT))
    request = pb.TrainRequest(model_name="storm", text=text, train_config=QUICK)

    def train(_: int) -> str:
        try:
            call = server.stub.Train(request, timeout=0.06)
            job_id = str(take(call).event.job.job_id)
            cancel(call)
            return job_id
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
            return ""

    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            told = {job_id for job_id in pool.map(train, range(40)) if job_id}
        print(f"{40 - len(told)} of 40 Trains got DEADLINE_EXCEEDED")

        def settled() -> bool:
            jobs = server.stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs
            return all(j.state == pb.JOB_STATE_CANCELLED for j in jobs if j.job_id not in told)

        until(settled)
        until(lambda: not text_files(tmp_path / "_texts"))
        strays = [d for d in (tmp_path / "_jobs").glob("*") if not (d / "job.json").exists()]
        assert not strays
    finally:
        server.close()


def test_a_train_s_inline_text_counts_against_max_pending_upload_bytes(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, "--max-pending-upload-bytes", "1000000")
    try:
        big = pb.TrainRequest(model_name="big", text=NOTEBOOK_TEXT * (1_500_000 // len(NOTEBOOK_TEXT)))
        with pytest.raises(grpc.RpcError) as refused:
            list(server.stub.Train(big, timeout=30))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_details(refused.value) == {"limit": "max_pending_upload_bytes"}
        assert not text_files(tmp_path / "_texts")
        small = pb.TrainRequest(model_name="small", text=NOTEBOOK_TEXT, train_config=QUICK)
        assert list(server.stub.Train(small, timeout=60))[-1].event.job.state == pb.JOB_STATE_SUCCEEDED
    finally:
        server.close()


@pytest.mark.parametrize("size", [0, 1000])
def test_uploads_whose_client_vanished_are_not_committed(tmp_path: Path, size: int) -> None:
    """300 uploads, one piece each (or none), on one connection; the client process is SIGKILLed."""
    server = ServerProcess(tmp_path, "--max-streams", "1000")
    client = subprocess.Popen(
        [sys.executable, CLIENTS, "uploads", server.address, "300", str(size)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "sent"
        texts = tmp_path / "_texts"
        # every upload is under way (its partial file open, its piece in) before the client dies
        wait_until(lambda: len(list(texts.glob(".*.tmp"))) == 300, 60, "300 uploads under way")
        time.sleep(0.2)  # the pieces, sent before the calls' files were opened, are written
        client.kill()
        client.wait(10)
        # the server sees the connection gone and discards each upload's partial file (in its own
        # time: waited for, not slept on, on a busy machine)
        wait_until(lambda: not list(texts.glob(".*.tmp")), 60, "the broken uploads' partial files removed")
        assert not text_files(texts), f"{len(text_files(texts))} of 300 broken uploads became texts"
    finally:
        client.kill()
        server.close()


def test_upload_starts_beside_many_kept_texts_do_not_hold_up_other_calls(tmp_path: Path) -> None:
    """With 20,000 texts kept, 300 uploads start at once (each a piece, then idle): every start
    used to stat every kept text on the thread pool ListModels and Train share. ListModels,
    asked meanwhile, stays quick, and a normal upload still goes through."""
    texts = tmp_path / "_texts"
    texts.mkdir(parents=True)
    for i in range(20_000):
        (texts / f"{i:032x}.txt").write_bytes(b"kept")
    server = ServerProcess(tmp_path, "--max-streams", "1000")
    client = subprocess.Popen(
        [sys.executable, CLIENTS, "uploads", server.address, "300", "10"], stdout=subprocess.PIPE, text=True
    )
    try:
        slowest = 0.0
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            began = time.monotonic()
            server.stub.ListModels(pb.ListModelsRequest(), timeout=30)
            slowest = max(slowest, time.monotonic() - began)
        assert client.stdout is not None and client.stdout.readline().strip() == "sent"
        began = time.monotonic()
        uploaded = server.stub.UploadText(iter([pb.UploadTextRequest(piece=NOTEBOOK_TEXT)]), timeout=30)
        upload_seconds = time.monotonic() - began
        print(f"ListModels at most {slowest * 1000:.0f} ms; an upload {upload_seconds * 1000:.0f} ms")
        assert uploaded.bytes == len(NOTEBOOK_TEXT.encode())
        assert slowest < 1.0 and upload_seconds < 1.0
    finally:
        client.kill()
        client.wait(10)
        server.close()


def test_a_trainer_paused_while_it_registers_adds_no_version_and_moves_no_default(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Trainer A is stopped (SIGSTOP) as it writes the finished model's file, before publishing it;
    its lease runs out, trainer B takes the job over, finishes it and registers v1 (promoted);
    the default is then set back. A, continued, must register no v2 and leave the default be."""
    redis.Redis(port=redis_server.port, db=6).flushdb()
    url = f"redis://127.0.0.1:{redis_server.port}/6"
    replica = ServerProcess(tmp_path / "serve", "--store", url, "--trainers", "0", "--compute-in-thread")
    args = ("--checkpoint-seconds", "0.3", "--job-lease", "1")
    first = TrainerProcess(url, tmp_path / "a", *args)
    second = None
    try:
        # a big network (13 MB of parameters), trained for a few steps: its file takes a while to write
        request = pb.TrainRequest(
            model_name="fenced",
            text=NOTEBOOK_TEXT,
            promote=True,
            model_config=pb.ModelConfigSpec(cell="gru", hidden=1024),
            train_config=pb.TrainConfigSpec(seq_len=8, batch=1, max_chars=64, val_fraction=0.0, seed=3),
        )
        call = replica.stub.Train(request, timeout=60)
        job_id = str(take(call).event.job.job_id)
        cancel(call)
        staged = tmp_path / "a" / "fenced"
        deadline = time.monotonic() + 120
        while not (staged.is_dir() and any(staged.iterdir())):
            assert time.monotonic() < deadline, "trainer A never began to register"
            time.sleep(0.001)
        os.kill(first.proc.pid, signal.SIGSTOP)
        index = redis.Redis(port=redis_server.port, db=6).hgetall("nextchar:models")
        assert not any(b"fenced" in name for name in index), "A published before it was stopped"

        second = TrainerProcess(url, tmp_path / "b", *args)
        assert wait_for(replica, job_id).state == pb.JOB_STATE_SUCCEEDED
        listed = replica.stub.ListModels(pb.ListModelsRequest(), timeout=10)
        assert (listed.default_model.name, listed.default_model.version) == ("fenced", 1)
        replica.stub.SetDefaultModel(
            pb.SetDefaultModelRequest(model=pb.ModelRef(name="default", version=1)), timeout=10
        )

        os.kill(first.proc.pid, signal.SIGCONT)
        first.wait_for_line(
            f"job {job_id} \\(fenced\\): taken over by another trainer, [^ ]+:{second.proc.pid},"
        )
        listed = replica.stub.ListModels(pb.ListModelsRequest(), timeout=10)
        versions = sorted((m.model.name, m.model.version) for m in listed.models)
        assert versions == [("default", 1), ("fenced", 1)], versions
        assert (listed.default_model.name, listed.default_model.version) == ("default", 1)
        described = replica.stub.DescribeModel(
            pb.DescribeModelRequest(model=pb.ModelRef(name="fenced", version=1)), timeout=10
        )
        assert json.loads(described.summary_json)["job_id"] == job_id
    finally:
        with_process = first.proc.poll() is None
        if with_process:
            os.kill(first.proc.pid, signal.SIGCONT)
        first.close()
        if second is not None:
            second.close()
        replica.close()


def test_a_trainer_whose_job_was_taken_over_mid_run_names_the_trainer_that_has_it(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Trainer A is paused (SIGSTOP) mid-run past its lease; B resumes the job. A, continued,
    says which job it lost, to which trainer, and that B resumes it from its last checkpoint."""
    redis.Redis(port=redis_server.port, db=9).flushdb()
    url = f"redis://127.0.0.1:{redis_server.port}/9"
    replica = ServerProcess(tmp_path / "serve", "--store", url, "--trainers", "0", "--compute-in-thread")
    args = ("--checkpoint-seconds", "0.3", "--job-lease", "1")
    first = TrainerProcess(url, tmp_path / "a", *args)
    second = None
    try:
        job_id = start_job(replica, "taken")
        wait_for(replica, job_id, step=20)
        os.kill(first.proc.pid, signal.SIGSTOP)
        second = TrainerProcess(url, tmp_path / "b", *args)
        second.wait_for_line(f"job {job_id} \\(taken\\): (started|resumed from its checkpoint) on ")
        os.kill(first.proc.pid, signal.SIGCONT)
        _, lost = first.wait_for_line(f"job {job_id} \\(taken\\): taken over by another trainer")
        print(lost.string.strip())
        assert f":{second.proc.pid}, after this trainer (" in lost.string
        assert f":{second.proc.pid} resumes the job from its last checkpoint" in lost.string
        assert wait_for(replica, job_id).state == pb.JOB_STATE_SUCCEEDED
    finally:
        if first.proc.poll() is None:
            os.kill(first.proc.pid, signal.SIGCONT)
        first.close()
        if second is not None:
            second.close()
        replica.close()


def test_a_trainer_whose_job_vanished_says_so_and_not_that_it_was_taken_over(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Redis loses every key under a running job (a restart without persistence, here FLUSHDB):
    the trainer once said "taken over by another trainer". It says the job is gone from the
    store, that it stopped, and that nobody will resume it."""
    store = redis.Redis(port=redis_server.port, db=10)
    store.flushdb()
    url = f"redis://127.0.0.1:{redis_server.port}/10"
    replica = ServerProcess(tmp_path / "serve", "--store", url, "--trainers", "0", "--compute-in-thread")
    trainer = TrainerProcess(url, tmp_path / "t", "--checkpoint-seconds", "0.3", "--job-lease", "2")
    try:
        job_id = start_job(replica, "vanishing")
        wait_for(replica, job_id, step=20)
        store.flushdb()
        _, gone = trainer.wait_for_line(f"job {job_id} \\(vanishing\\): gone from the job store")
        print(gone.string.strip())
        assert "terminated its run" in gone.string and "no trainer will resume it" in gone.string
        assert "taken over" not in "".join(trainer.log)
        assert trainer.proc.poll() is None  # and it goes on taking jobs
    finally:
        trainer.close()
        replica.close()
