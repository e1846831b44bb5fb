"""Test harness for training jobs on real processes: queue a job, follow it, run a ``nextchar trainer``.

Every job here trains the same small GRU on the same 80,000 characters with the same
seed, so any two that finish register bit-identical weights, however they were
interrupted (the tests compare their checksums).
"""

from __future__ import annotations

import time
from pathlib import Path

from nextchar.proto import nextchar_pb2 as pb
from server_harness import LoggedProcess, ServerProcess, cancel, take

CORPUS = Path(__file__).resolve().parents[1] / "core" / "data" / "tinyshakespeare.txt"
MODEL = pb.ModelConfigSpec(cell="gru", hidden=48)
CONFIG = pb.TrainConfigSpec(seq_len=32, batch=16, epochs=4, dropout=0.1, log_every=5, seed=7)


def start_job(server: ServerProcess, name: str, config: pb.TrainConfigSpec = CONFIG) -> str:
    text = CORPUS.read_text()[:80_000]
    request = pb.TrainRequest(model_name=name, text=text, model_config=MODEL, train_config=config)
    call = server.stub.Train(request, timeout=120)
    job_id = str(take(call).event.job.job_id)
    cancel(call)  # stop watching; the job goes on
    return job_id


def job(server: ServerProcess, job_id: str) -> pb.JobInfo:
    jobs = server.stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs
    return next(j for j in jobs if j.job_id == job_id)


def wait_for(server: ServerProcess, job_id: str, step: int = 0, timeout: float = 120) -> pb.JobInfo:
    """Until the job is past step (and RUNNING), or, with step 0, until it has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job(server, job_id)
        if step and info.state == pb.JOB_STATE_RUNNING and info.latest.step >= step:
            return info
        if not step and info.state not in (pb.JOB_STATE_RUNNING, pb.JOB_STATE_QUEUED):
            return info
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not get there: {job(server, job_id)}")


class TrainerProcess(LoggedProcess):
    """``python -m nextchar.cli trainer --store URL --model-dir DIR *args``, once it takes jobs."""

    def __init__(self, store: str, model_dir: Path, *args: str) -> None:
        super().__init__("trainer", "--store", store, "--model-dir", str(model_dir), *args)
        self.wait_for_line("taking jobs from")
