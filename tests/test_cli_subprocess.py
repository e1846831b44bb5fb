"""The installed ``nextchar`` console script, run as a real process against a real server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from nextchar.client import NextCharClient, Unavailable
from nextchar.core.demo import NOTEBOOK_TEXT

NEXTCHAR = str(Path(sys.executable).with_name("nextchar"))


def nextchar(*args: str, server: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NEXTCHAR_SERVER": server}
    return subprocess.run([NEXTCHAR, *args], input=input, capture_output=True, text=True, env=env, timeout=60)


def test_pipe_into_stream(server_address: str) -> None:
    done = nextchar("stream", "--json", server=server_address, input=NOTEBOOK_TEXT + "\n")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert "".join(r["char"] for r in rows[:-1]) == NOTEBOOK_TEXT + "\n"
    assert rows[-1]["summary"]["accuracy"] > 0.9


def test_errors_are_one_line_without_traceback(server_address: str) -> None:
    done = nextchar("generate", "--model", "missing", server=server_address)
    assert done.returncode == 1
    assert done.stderr.startswith("nextchar: error: model 'missing'") and done.stderr.count("\n") == 1
    down = nextchar("health", "--timeout", "1", server="127.0.0.1:1")
    assert down.returncode == 1 and "cannot reach the server" in down.stderr
    assert "Traceback" not in down.stderr


def test_ctrl_c_without_a_terminal_leaves_the_job_running(server_address: str) -> None:
    env = {**os.environ, "NEXTCHAR_SERVER": server_address}
    args = [
        "train",
        "--text",
        NOTEBOOK_TEXT * 40,
        "--name",
        "interrupted",
        "--hidden",
        "64",
        "--epochs",
        "500",
    ]
    proc = subprocess.Popen(
        [NEXTCHAR, *args, "--seq-len", "8", "--batch", "2"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    with NextCharClient(server_address) as c:
        deadline = time.monotonic() + 30
        while not [j for j in c.jobs() if j.model_name == "interrupted"] and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "keeps running on the server" in err
        job = next(j for j in c.jobs() if j.model_name == "interrupted")
        assert job.state == "running"
        c.cancel_job(job.job_id)


def test_serve_starts_answers_and_drains_on_sigterm(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [NEXTCHAR, "serve", "--port", str(port), "--model-dir", str(tmp_path), "--grace", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with NextCharClient(f"127.0.0.1:{port}", timeout=2) as c:
            deadline = time.monotonic() + 60
            while True:
                try:
                    assert c.health() == "SERVING"
                    break
                except Unavailable:
                    assert time.monotonic() < deadline and proc.poll() is None
                    time.sleep(0.2)
            with c.session() as s:  # the empty registry got the shipped (Shakespeare) model
                assert s.feed("To be, or not to").next_chars[-1] == " "
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert proc.returncode == 0
        assert (tmp_path / "default" / "1.npz").is_file()
    finally:
        proc.kill()
        proc.wait()
