"""Durable training jobs, with real processes: nothing a checkpoint holds is lost to a crash.

Four identical jobs (same text, configs and seed) on real ``nextchar serve``
processes sharing one model directory: one runs undisturbed; one has its trainer
SIGKILLed mid-epoch (the server restarts it from its checkpoint); one is running
when its server gets SIGTERM (it pauses, and the next server resumes it); one is
running when its server is SIGKILLed (its trainer dies with it; the next server
resumes it). All four must register weights with the same checksum, and the
journal must still list every job after the restarts.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import grpc
import pytest
from job_harness import CORPUS, start_job, wait_for
from nextchar.core.config import TrainConfig
from nextchar.core.modelfile import load_model
from nextchar.proto import nextchar_pb2 as pb
from nextchar.server.errors import InvalidArgument
from nextchar.server.registry import Registry
from nextchar.server.training.jobs import READ_PIECE, validate
from nextchar.server.training.trainer import NICE as TRAINER_NICE
from server_harness import ServerProcess


def checksum(model_dir: Path, name: str) -> str:
    registry = Registry(model_dir)
    registry.load_all()
    return registry.resolve(name, 1).checksum


def test_jobs_resume_bit_identically_after_trainer_kill_sigterm_and_sigkill(tmp_path: Path) -> None:
    args = ("--checkpoint-seconds", "0.3")
    server = ServerProcess(tmp_path, *args)
    try:
        reference = start_job(server, "undisturbed")
        assert wait_for(server, reference).state == pb.JOB_STATE_SUCCEEDED

        killed = start_job(server, "trainer-killed")
        wait_for(server, killed, step=200)  # mid-epoch 2: an epoch-end checkpoint behind it
        os.kill(trainer_of(server.proc.pid), signal.SIGKILL)
        info = wait_for(server, killed)
        assert info.state == pb.JOB_STATE_SUCCEEDED and info.attempts == 2

        paused = start_job(server, "server-sigterm")
        wait_for(server, paused, step=200)
        server.proc.send_signal(signal.SIGTERM)  # drains: the trainer checkpoints and stops
        assert server.proc.wait(60) == 0
        assert any(f"job {paused} (server-sigterm): back in the queue" in line for line in server.log)
    finally:
        server.close()

    server = ServerProcess(tmp_path, *args)  # takes the journal up: the paused job resumes
    try:
        assert wait_for(server, paused).state == pb.JOB_STATE_SUCCEEDED
        crashed = start_job(server, "server-sigkill")
        wait_for(server, crashed, step=200)
        server.proc.kill()  # no drain: the trainer dies with its server
        server.proc.wait(10)
    finally:
        server.close()

    server = ServerProcess(tmp_path, *args)
    try:
        assert wait_for(server, crashed).state == pb.JOB_STATE_SUCCEEDED
        listed = {j.job_id: j.state for j in server.stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs}
        assert set(listed) == {reference, killed, paused, crashed}  # the journal kept them all
        assert set(listed.values()) == {pb.JOB_STATE_SUCCEEDED}
        resumed_log = "".join(server.log)
        assert (
            "back in the queue from the journal" in resumed_log
            and "resumed from its checkpoint" in resumed_log
        )
    finally:
        server.close()

    sums = {
        name: checksum(tmp_path, name)
        for name in ("undisturbed", "trainer-killed", "server-sigterm", "server-sigkill")
    }
    assert len(set(sums.values())) == 1, sums  # bit-identical weights, however the run was interrupted


def test_a_failed_job_can_be_resumed_and_unknown_ones_are_not_found(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path)
    try:
        try:
            server.stub.ResumeJob(pb.ResumeJobRequest(job_id="job-nope"), timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
        else:
            raise AssertionError("resuming an unknown job must fail")
        done = start_job(server, "finished")
        wait_for(server, done)
        try:
            server.stub.ResumeJob(pb.ResumeJobRequest(job_id=done), timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "succeeded" in str(exc.details())
        else:
            raise AssertionError("a succeeded job has nothing to resume")
    finally:
        server.close()


def test_the_log_says_a_jobs_start_and_end_not_each_checkpoint(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path)  # the default log level: INFO
    try:
        job_id = start_job(server, "quiet")  # four epochs: a checkpoint at the end of each but the last
        assert wait_for(server, job_id).state == pb.JOB_STATE_SUCCEEDED
        server.wait_for_line(f"job {job_id} \\(quiet\\): succeeded")
        said = [line for line in server.log if job_id in line]
        assert any("started on trainer" in line for line in said), said
        assert any("tuning its adaptation" in line for line in said), said
        assert not [line for line in said if "checkpointed" in line], said
    finally:
        server.close()
    registry = Registry(tmp_path)
    registry.load_all()
    recorded = load_model(registry.resolve("quiet", 1).path)  # the config its trainer tuned
    assert recorded.adapt.stats is not None and recorded.summary["adapt"]["chars"] > 0


def trainer_of(server_pid: int) -> int:
    """The pid of the server's trainer: its child at the trainers' lower CPU priority (nice 10;
    the compute process, its other child, runs at the server's)."""
    for task in Path(f"/proc/{server_pid}/task").glob("*/children"):
        for child in task.read_text().split():
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[16]) == TRAINER_NICE:  # field 19 of stat: nice
                return int(child)
    raise AssertionError("no trainer process")


def test_a_corpus_above_the_old_message_limit_trains_with_the_server_staying_small(tmp_path: Path) -> None:
    """70 MB of text (the old single-message limit was 64 MiB) goes up in pieces and trains;
    the server validates it a piece at a time, so its own memory does not grow with it."""
    from nextchar.client import NextCharClient, TrainConfig

    server = ServerProcess(tmp_path)
    try:
        base_kb = hwm_kb(server.proc.pid)
        text = CORPUS.read_text() * 63  # 70 MB, ASCII
        with NextCharClient(server.address, timeout=120) as client:
            info = client.train(text, name="big", train_config=TrainConfig(max_chars=8192, val_fraction=0.0))
        assert info.model.name == "big" and len(text) > 64 * 2**20
        grown_mb = (hwm_kb(server.proc.pid) - base_kb) / 1024
        assert grown_mb < 40, (
            f"the server's peak memory grew {grown_mb:.0f} MB for a {len(text) / 1e6:.0f} MB text"
        )
    finally:
        server.close()


def hwm_kb(pid: int) -> int:
    """The process's peak resident memory (VmHWM), KiB."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1])


def test_a_job_that_finishes_again_after_registering_registers_no_second_version(tmp_path: Path) -> None:
    """The window a SIGKILL can hit: the model registered, the job's end not yet recorded, so the
    job resumes and finishes again. The second finish finds the version the first registered (its
    summary names the job) and promotes it if it was not yet; another job's model still gets a
    version of its own."""
    from nextchar.core.config import ModelConfig, TrainConfig
    from nextchar.core.demo import NOTEBOOK_TEXT
    from nextchar.core.modelfile import ModelPayload
    from nextchar.core.train import train
    from nextchar.server.training.journal import LocalJobStore
    from nextchar.server.training.pipe import Done
    from nextchar.server.training.pool import TrainerPool
    from nextchar.server.training.store import SUCCEEDED, Claim, Job

    registry = Registry(tmp_path)
    store = LocalJobStore(tmp_path / "_jobs")
    pool = TrainerPool(store, registry, 1, 0.0, 15.0)

    def claimed(job: Job) -> Claim:
        text = tmp_path / "text.txt"
        text.write_text(NOTEBOOK_TEXT)
        store.add(job, text)
        claim = store.take("test")
        assert claim is not None and claim.job_id == job.id
        return claim

    result = train(NOTEBOOK_TEXT, ModelConfig(hidden=8), TrainConfig(epochs=1, seq_len=8, batch=1))
    body = Done(ModelPayload.of(result.model), result.history, result.summary)
    job = Job(
        id="a" * 32, model_name="tiny", promote=True, model_config=ModelConfig(), train_config=TrainConfig()
    )
    claim = claimed(job)
    first = pool._register(claim, job, body)
    assert first == (SUCCEEDED, "", ("tiny", 1))
    # another model made the default meanwhile, as if the first finish died before its pointer
    registry.register("other", result.model, history=[], summary={}, promote=True)
    again = pool._register(claim, job, body)
    assert again == first
    assert [(v.name, v.version) for v in registry.versions()] == [("other", 1), ("tiny", 1)]
    assert registry.default is not None and (registry.default.name, registry.default.version) == ("tiny", 1)
    other_job = Job(
        id="b" * 32, model_name="tiny", promote=False, model_config=ModelConfig(), train_config=TrainConfig()
    )
    assert pool._register(claimed(other_job), other_job, body) == (SUCCEEDED, "", ("tiny", 2))


def test_the_text_check_counts_distinct_characters_exactly_across_pieces(tmp_path: Path) -> None:
    """validate counts the distinct characters of a text read in pieces (a character split between
    two pieces, astral ones, ASCII and not): exactly max_vocab is taken, one more is refused, and a
    text that is not UTF-8 is refused naming where."""
    wide = "".join(chr(c) for c in (*range(0x4E00, 0x4E00 + 40), *range(0x1F600, 0x1F600 + 40)))
    body = "a" * (READ_PIECE - 1) + "é" + "abc" * 50_000 + wide  # "é" straddles the first piece's end
    text = tmp_path / "t.txt"
    text.write_text(body, encoding="utf-8")
    distinct = len(set(body))
    validate(text, TrainConfig(), distinct)
    with pytest.raises(InvalidArgument, match=f"{distinct} distinct characters exceed max_vocab"):
        validate(text, TrainConfig(), distinct - 1)
    text.write_bytes(body.encode()[: READ_PIECE + 5] + b"\xff" + b"abc" * 100)
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        validate(text, TrainConfig(), 1000)
