"""Load, short: bench/load_bench.py with 200 sessions for 5 s must see zero errors and flat memory.

The full run (1,000 sessions for 60 s) is ``make bench-load``; this runs the same script,
server and client processes included, small enough for CI. No timing is asserted: the
machine is shared. Memory is: after the warm-up the server's RSS may not keep growing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "load_bench.py"
SESSIONS = 200
RSS_DRIFT_LIMIT_KB = 16 * 1024  # from the end of the warm-up to the end of the run


def test_200_sessions_for_5_seconds_no_errors_and_flat_memory(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    cmd = [sys.executable, str(BENCH), "--sessions", str(SESSIONS), "--duration", "5", "--warmup", "2"]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["errors"] == 0, result["first_errors"]
    assert result["sessions_held"] == SESSIONS
    assert result["messages"] > 0
    rss = result["rss_kb"]
    assert rss["end"] - rss["after_warmup"] < RSS_DRIFT_LIMIT_KB, rss
