"""What an adaptive session costs a server, everything included: its RSS growth per session.

Run: ``python bench/adapt_memory.py [--sessions N] [--chars C]`` (part of ``make bench-adapt``).

A real server process on the shipped default model (GRU-256); a client creates N
static sessions, feeds each C characters in 64-character chunks (so its rewind trail
is full and its marks are dropped and replaced as in use), then N adaptive sessions
the same way. The server's resident memory (VmRSS) is read before and after each
group: the growth per session is what one costs, state, trail, adapters and the
allocator's share included. Goal (issue 22): an adaptive session <= 512 KB; a static
one as before adaptation existed (about 10 KB with its trail).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads OpenBLAS

from bench_env import blas_info, unpin_this_process

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GOAL_KB = 512
CHUNK = 64


def rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match is not None
    return int(match.group(1))


def start_server(model_dir: str) -> tuple[subprocess.Popen[str], int]:
    cmd = [sys.executable, "-m", "nextchar.cli", "serve", "--port", "0", "--model-dir", model_dir]
    cmd += ["--max-adaptive-sessions", "100000", "--compute-in-thread"]  # one process: its RSS is all of it
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stderr is not None
    for line in proc.stderr:
        match = re.search(r"serving on [\d.]+:(\d+)", line)
        if match:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep its pipe drained
            return proc, int(match.group(1))
    raise RuntimeError("the server did not start")


def text_of(chars: int) -> str:
    from nextchar.core.default_model import CORPUS, data_file

    with data_file(CORPUS) as path:
        return path.read_text(encoding="utf-8")[-chars * 4 :]


def fill(client: Any, n: int, text: str, adapt: bool) -> list[Any]:
    """n sessions, each fed its own stretch of text in CHUNK-character messages."""
    sessions = []
    for i in range(n):
        session = client.session(adapt=adapt)
        start = (i * 37) % (len(text) // 2)
        own = text[start : start + len(text) // 4]
        for at in range(0, len(own), CHUNK):
            session.feed(own[at : at + CHUNK], top_k=1)
        sessions.append(session)
    return sessions


def main(n: int, chars: int) -> dict[str, Any]:
    from nextchar.client import NextCharClient

    text = text_of(chars)
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_server(tmp)
        try:
            with NextCharClient(f"127.0.0.1:{port}", timeout=60) as client:
                fill(client, 2, text, False)  # warm: the model, both code paths
                fill(client, 2, text, True)
                before = rss_kb(proc.pid)
                fill(client, n, text, False)
                middle = rss_kb(proc.pid)
                adaptive = fill(client, n, text, True)
                after = rss_kb(proc.pid)
                steps = sum(s.refresh().adapt_steps for s in adaptive) / n
        finally:
            proc.terminate()
            proc.wait(30)
    static_kb = (middle - before) / n
    adaptive_kb = (after - middle) / n
    return {
        "benchmark": "adapt-memory",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "blas": blas_info(),
        "sessions_per_kind": n,
        "chars_per_session": len(text) // 4,
        "adapt_steps_per_session": steps,
        "rss_kb": {"before": before, "after_static": middle, "after_adaptive": after},
        "static_session_kb": static_kb,
        "adaptive_session_kb": adaptive_kb,
        "goals": {f"adaptive_session_le_{GOAL_KB}_kb": adaptive_kb <= GOAL_KB},
    }


if __name__ == "__main__":
    unpin_this_process()
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--chars", type=int, default=2000, help="characters per session (about)")
    args = parser.parse_args()
    result = main(args.sessions, args.chars)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"adapt-memory-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"per session: static {result['static_session_kb']:.1f} KB, adaptive "
        f"{result['adaptive_session_kb']:.1f} KB ({result['adapt_steps_per_session']:.0f} steps each); "
        + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in result["goals"].items())
    )
    print(f"wrote {out}", file=sys.stderr)
