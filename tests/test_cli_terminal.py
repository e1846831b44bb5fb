"""The command line as people run it: in a real pseudo-terminal, behind a pipe, under Ctrl-C.

``nextchar stream`` on a terminal is driven through pexpect (a pty, the keys a person
types, escape sequences included); a piped stream is fed by a writer that pauses in
the middle of a line; ``nextchar serve`` gets SIGINT the way a terminal sends it, to
its whole process group. Every process is real, and so is every server.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from server_harness import ServerProcess, make_registry

CLI = [sys.executable, "-m", "nextchar.cli"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    make_registry(tmp_path, versions=1)
    srv = ServerProcess(tmp_path, "--rewind-chars", "64")
    yield srv
    srv.close()


def spawn_stream(address: str) -> pexpect.spawn:
    child = pexpect.spawn(
        CLI[0], [*CLI[1:], "stream", "--server", address], encoding="utf-8", timeout=15, dimensions=(40, 300)
    )
    child.expect("Ctrl-D ends")
    return child


def test_interactive_stream_sends_pastes_whole_and_backspace_rewinds(server: ServerProcess) -> None:
    child = spawn_stream(server.address)
    child.send("hello wor")
    child.expect(r"hello wor  →  l \d+%")  # the carried state knows "l" comes next
    child.send("\x7f\x7f")  # Backspace twice: the session takes "or" back
    child.expect(r"hello w  →  o \d+%")
    child.send("\x1b[D\x1b[A\x1bOP")  # arrows, F1: ignored, nothing sent, nothing ends
    paste = "orld hello world\n" * 10 + "hello wé"  # 178 characters, newlines and an unknown one
    child.send(paste)
    child.expect("unknown to the model: [^)]*é")
    child.send("\x04")  # Ctrl-D
    child.expect(r"chars\s+│\s+(\d+)")
    sent = int(child.match.group(1))
    child.expect(r"rewinds\s+│\s+(\d+)")
    rewinds = int(child.match.group(1))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert (sent, rewinds) == (len("hello wor") + len(paste), 2)


def test_backspace_never_goes_further_than_the_session_can(server: ServerProcess) -> None:
    child = spawn_stream(server.address)
    child.send("he")
    child.expect(r"he  →  ")
    child.send("\x7f" * 5)  # two can be taken back; the other three only ring the bell
    child.expect("\x07\x07\x07")  # the bell, three times
    child.expect(r"\r\x1b\[K  →  \S+ \d+%")  # back at the start: nothing typed, the first guess
    child.send("hi")
    child.expect(r"hi  →  ")
    child.send("\x04")
    child.expect(r"rewinds\s+│\s+2")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_a_lost_server_is_reported_at_once_on_its_own_line(server: ServerProcess) -> None:
    child = spawn_stream(server.address)
    child.send("hello")
    child.expect(r"hello  →  ")
    server.proc.kill()
    start = time.monotonic()
    child.expect(r"\r\n(nextchar: error: [^\r\n]+)", timeout=10)
    assert time.monotonic() - start < 5  # not after the next key, not after retries
    assert "the server" in child.match.group(1) and "`nextchar serve`" in child.match.group(1)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1


def test_a_piped_stream_sends_characters_as_they_arrive(server: ServerProcess) -> None:
    proc = subprocess.Popen(
        [*CLI, "stream", "--server", server.address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("hello")
    proc.stdin.flush()
    start = time.monotonic()
    lines = [proc.stdout.readline() for _ in range(5)]  # before the line is finished
    waited = time.monotonic() - start
    assert [line.split()[1] for line in lines] == list("hello") and waited < 3
    time.sleep(1)  # the writer pauses mid-line
    rest, err = proc.communicate(" w\n", timeout=20)
    assert proc.returncode == 0, err
    assert [line.split()[1] for line in rest.splitlines()[:3]] == ["␠", "w", "\\n"]


def test_ctrl_c_on_serve_drains_without_a_traceback(tmp_path: Path) -> None:
    make_registry(tmp_path, versions=1)
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", "0", "--model-dir", str(tmp_path)],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job has
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "serving on" in line:
            break
    time.sleep(1)  # the compute process is up
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the server AND its children get it
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "server stopped" in err


def test_files_written_follow_the_umask(tmp_path: Path) -> None:
    from nextchar.core.atomic import atomic_write

    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "loss.csv") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "loss.csv").stat().st_mode) == 0o644
