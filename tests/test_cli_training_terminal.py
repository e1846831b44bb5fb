"""Following a training job as people do: Ctrl-C in a real terminal, and progress into a pipe or a file.

Ctrl-C is sent through a pseudo-terminal (pexpect), as a terminal sends it, and the
answers are typed; without a terminal, stderr is a pipe read line by line while the
job runs. Every server and every job here is real.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
from nextchar.core.demo import NOTEBOOK_TEXT
from server_harness import LoggedProcess, make_registry

CLI = [sys.executable, "-m", "nextchar.cli"]
LONG = ["--text", NOTEBOOK_TEXT * 40, "--hidden", "64", "--epochs", "5000", "--seq-len", "8", "--batch", "2"]


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server that trains one job at a time (--trainers 1): the second one queues.

    This module runs no gRPC in its own process (the server is a process of its own, jobs are
    asked about through the CLI): pexpect forks this process for each pty, and a fork taken
    while gRPC's threads poll can leave the child dead before it runs anything."""
    model_dir = tmp_path_factory.mktemp("models")
    make_registry(model_dir, versions=1)
    server = LoggedProcess("serve", "--port", "0", "--model-dir", str(model_dir), "--trainers", "1")
    port = server.wait_for_line(r"serving on [\d.]+:(\d+)")[1].group(1)
    yield f"127.0.0.1:{port}"
    server.close()


@pytest.fixture(autouse=True)
def nothing_left_running(address: str) -> Iterator[None]:
    yield
    for job in jobs(address):  # what a test left running would hold the one trainer
        if job["state"] in ("queued", "running"):
            cli(address, "jobs", "cancel", job["job_id"])


def cli(address: str, *args: str) -> str:
    command = [*CLI, *args, "--server", address, "--timeout", "30"]  # a loaded machine is slow to answer
    done = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    return done.stdout


def jobs(address: str) -> list[dict[str, Any]]:
    return list(json.loads(cli(address, "jobs", "list", "--json")))


def state(address: str, job_id: str) -> str:
    return str(next(job["state"] for job in jobs(address) if job["job_id"] == job_id))


def running(address: str, job_id: str) -> None:
    deadline = time.monotonic() + 30
    while state(address, job_id) != "running":
        assert time.monotonic() < deadline, f"job {job_id} never ran"
        time.sleep(0.1)


def spawn(address: str, *args: str) -> pexpect.spawn:
    return pexpect.spawn(
        CLI[0], [*CLI[1:], *args, "--server", address], encoding="utf-8", timeout=30, dimensions=(40, 200)
    )


def train_in_terminal(address: str, name: str) -> tuple[pexpect.spawn, str]:
    child = spawn(address, "train", *LONG, "--name", name)
    child.expect(r"training job (\S+) \(follow")
    job_id = child.match.group(1)
    running(address, job_id)
    child.expect("epoch")  # the bar is up
    return child, job_id


def detached(address: str, name: str) -> str:
    return str(json.loads(cli(address, "train", *LONG, "--name", name, "--detach", "--json"))["job_id"])


def test_only_an_exact_answer_cancels_a_job_after_ctrl_c(address: str) -> None:
    child, job_id = train_in_terminal(address, "asked")
    child.sendintr()
    child.expect(r"cancel it, or leave it running\?")
    child.sendline("clear; nextchar train corpus.txt")  # typed ahead, meant for the shell
    child.expect(r"is no answer: type c \(cancel\) or l \(leave\)")
    child.expect(r"cancel it, or leave it running\?")  # asked again
    assert state(address, job_id) == "running"
    child.sendline("cancel")
    child.expect(f"training job {job_id} cancelled")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    deadline = time.monotonic() + 10
    while state(address, job_id) != "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_ctrl_c_twice_leaves_the_job_running_and_says_how_to_find_it(address: str) -> None:
    child, job_id = train_in_terminal(address, "twice")
    child.sendintr()
    child.expect(r"cancel it, or leave it running\?")
    child.sendintr()  # the second Ctrl-C, at the question
    child.expect(f"keeps running on the server: nextchar jobs watch {job_id} follows it")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    assert state(address, job_id) == "running"


def test_ctrl_c_in_jobs_watch_only_stops_watching(address: str) -> None:
    job_id = detached(address, "watched")
    running(address, job_id)
    child = spawn(address, "jobs", "watch", job_id)
    child.expect("epoch")
    child.sendintr()
    child.expect(f"stopped watching; training job {job_id} keeps running")
    child.expect(pexpect.EOF)
    assert "cancel it" not in (child.before or "")  # never offered
    child.close()
    assert child.exitstatus == 130
    assert state(address, job_id) == "running"


def plain_lines(proc: subprocess.Popen[str], n: int) -> list[str]:
    """The first n lines of a process's stderr, read while it runs."""
    assert proc.stderr is not None
    lines = [proc.stderr.readline() for _ in range(n)]
    assert proc.poll() is None, "".join(lines)
    return lines


@pytest.mark.parametrize("command", ["train", "watch"])
def test_without_a_terminal_each_epoch_is_one_plain_line_and_a_queue_place_is_said(
    address: str, command: str
) -> None:
    busy = detached(address, "first")  # holds the one trainer: the next job queues
    running(address, busy)
    if command == "train":
        args = ["train", *LONG, "--name", "second"]
    else:
        args = ["jobs", "watch", detached(address, "second")]
    proc = subprocess.Popen(
        [*CLI, *args, "--server", address],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        said = [proc.stderr.readline()]
        while "queued" not in said[-1]:  # the plan and the job's id come first for a train
            assert said[-1] and len(said) < 4, f"no queue place said: {said}"
            said.append(proc.stderr.readline())
        line = said[-1]
        assert line.strip() == "training second: queued, place 1"
        cli(address, "jobs", "cancel", busy)
        epochs = plain_lines(proc, 3)  # while the job runs, not when it ends
        for n, epoch in enumerate(epochs, 1):
            assert re.fullmatch(
                rf"training second: epoch {n}  loss \d\.\d{{3}}  \d\.\d\d bits/char  val \d\.\d\d  "
                r"[\d,]+ chars/s  ETA \d+ s \(\d+%\)\n",
                epoch,
            ), epoch
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=30)
        assert "\x1b" not in "".join(epochs) + rest  # no bar, no cursor movement
    finally:
        proc.kill()
        proc.wait()


def test_the_plan_is_said_before_a_big_model_starts(address: str, tmp_path: Path) -> None:
    corpus = tmp_path / "small.txt"
    corpus.write_text(NOTEBOOK_TEXT * 800)  # 28 KB, as the file
    done = subprocess.run(
        [*CLI, "train", str(corpus), "--hidden", "4096", "--detach", "--server", address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    plan = done.stderr.splitlines()
    assert re.fullmatch(
        r"model small: rnn 1x4096, 16,855,049 parameters, about [\d.]+ MB to train; "
        r"7 steps an epoch of 25,200 characters",
        plan[0],
    ), plan[0]
    assert "the first progress (and ETA) comes after 100 steps" in plan[1]
    assert plan[2].startswith("hint: an epoch is only 7 steps (batch 64 x seq-len 64")
