"""README.md's walkthrough and Python snippet, run as written, leave the user's `make run` server alone.

Issue 24: the walkthrough said it worked the same whether or not `make run` held
50051, but both servers shared the default model directory, so its ``--promote``
replaced the `make run` server's default model with a toy one; and its Python
snippet talked to the walkthrough's server after the walkthrough had stopped it.

The commands are read out of README.md (its "Walkthrough" section's ``sh`` blocks, in
order, as one shell session; the "Python library" section's ``python`` block, checked against what it says it prints), so the
README and this test cannot drift apart. What is changed before running them, each
checked to be there: the ports (free ones, since other test runs may hold 50051 and
50061), ``source .venv/bin/activate`` (this interpreter's environment is already the
one to use) and the epochs (a short run trains the same way). The `make run` server is
`nextchar serve` on the default model directory, which both servers resolve from
the same ``XDG_DATA_HOME``, as on a user's machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from doc_blocks import ROOT, blocks, run_python, section
from nextchar.client import NextCharClient
from nextchar.core.default_model import PROBE_LINE, load_default_model
from nextchar.server.config import default_model_dir
from server_harness import ServerProcess

README = ROOT / "README.md"
WALKTHROUGH_PORT = "50061"
MAKE_RUN_ADDRESS = "127.0.0.1:50051"
ACTIVATE = "source .venv/bin/activate\n"
EPOCHS = "--epochs 20"


def replaced(text: str, old: str, new: str) -> str:
    assert old in text, f"the walkthrough no longer has {old!r}: update this test"
    return text.replace(old, new)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_shell(script: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> tuple[str, str, int]:
    """bash -c script in a process group of its own, which is killed whole afterwards: a
    walkthrough that fails before its `kill %1` must not leave its server running."""
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=cwd,
        env=env,
        text=True,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return stdout, stderr, proc.returncode


def stream_summary(address: str, line: str) -> dict[str, object]:
    """``nextchar stream --json`` of one line: its closing summary (model, bits/char)."""
    out = subprocess.run(
        [sys.executable, "-m", "nextchar.cli", "stream", "--json", "--server", address],
        input=line,
        text=True,
        capture_output=True,
        timeout=60,
        check=True,
    )
    summary: dict[str, object] = json.loads(out.stdout.splitlines()[-1])["summary"]
    return summary


def test_the_readme_walkthrough_leaves_the_make_run_server_on_the_shipped_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))  # the user's default model directory
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where mktemp puts the walkthrough's own
    monkeypatch.delenv("NEXTCHAR_SERVER", raising=False)
    monkeypatch.delenv("NEXTCHAR_MODEL_DIR", raising=False)
    shipped_bpc = load_default_model().summary["probe"]["bits_per_char"]

    make_run = ServerProcess(default_model_dir())  # `make run`: nextchar serve on the defaults
    try:
        before = stream_summary(make_run.address, PROBE_LINE)
        assert before["model"] == "default:v1"
        assert before["bits_per_char"] == pytest.approx(shipped_bpc, abs=1e-3)

        walkthrough, line = section(README, "Walkthrough")
        script = "\n".join(b.code for b in blocks(walkthrough, first_line=line) if b.language == "sh")
        script = replaced(script, ACTIVATE, "")
        script = replaced(script, WALKTHROUGH_PORT, str(free_port()))
        script = replaced(script, EPOCHS, "--epochs 2")
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        clone = tmp_path / "clone"  # what the walkthrough reads of a clone, and nothing it could write to
        clone.mkdir()
        (clone / "core").symlink_to(ROOT / "core")
        (clone / "README.md").symlink_to(README)
        # stop at the first failing command, and stop the walkthrough's server then too
        stopping = "set -e\ntrap 'status=$?; set +e; kill $(jobs -p) 2>/dev/null; wait; exit $status' EXIT\n"
        stdout, stderr, returncode = run_shell(f"{stopping}{script}\nwait\n", clone, env)
        assert returncode == 0, f"the walkthrough failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
        assert "* code:v1" in stdout, f"its own server's default is not its model:\n{stdout}"

        python, line = section(README, "The Python library")
        ran = run_python(blocks(python, first_line=line), "README.md", {MAKE_RUN_ADDRESS: make_run.address})
        assert ran == 1

        with NextCharClient(make_run.address) as client:
            models = client.models()
            assert [(str(m.model), m.is_default) for m in models] == [("default:v1", True)]
            assert client.jobs() == []
        after = stream_summary(make_run.address, PROBE_LINE)
        assert after["model"] == "default:v1"
        assert after["bits_per_char"] == pytest.approx(shipped_bpc, abs=1e-3)
    finally:
        make_run.close()
