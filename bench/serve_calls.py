"""Python calls per streamed message in the server's event loop: this build, and another.

Run: ``python bench/serve_calls.py [--baseline DIR] [--cases 1x1,100x1] [--seconds 3] [--top 30]``.

Each build's server runs under bench/call_counter.py (DIR's with DIR's ``.venv``), serving the
serve benchmark's model; the serve benchmark's load client streams one case at it, the counting
switched on for ``--seconds`` after a warm-up. Calls are divided by the PredictStream requests
the server parsed meanwhile. Unlike CPU time (±10% between runs here), the count is the same
from run to run, so it shows what a change to the hot path added or removed, function by
function: the table lists the largest differences. JSON goes to ``bench/results/calls-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import serve_bench as sb

ROOT = Path(__file__).resolve().parents[1]
REQUEST = "C:PredictStreamRequest.FromString"  # one per request the server parses


def calls_per_message(
    python: str, model_dir: str, streams: int, chunk: int, seconds: float
) -> dict[str, float]:
    """One build's server under the call counter: its calls per request, by function."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = sb.server_command(model_dir, python)
        at = cmd.index("-m")
        cmd[at : at + 2] = [str(ROOT / "bench" / "call_counter.py"), out.name]
        proc, port = sb.start(cmd)
        try:
            sb.run_client(port, streams, chunk, 1.0, 0.3, proc.pid)  # warm: sessions, batches, caches
            os.kill(proc.pid, signal.SIGUSR1)
            sb.run_client(port, streams, chunk, seconds, 0.0, proc.pid)
            os.kill(proc.pid, signal.SIGUSR1)
            os.kill(proc.pid, signal.SIGUSR2)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not Path(out.name).stat().st_size:
                time.sleep(0.1)
            calls: dict[str, int] = json.loads(Path(out.name).read_text())["calls"]
        finally:
            proc.terminate()
            proc.wait(15)
    requests = calls.get(REQUEST, 0)
    if not requests:
        raise RuntimeError(f"no {REQUEST} counted: did the server parse any request?")
    return {name: n / requests for name, n in calls.items()}


def main(cases: list[tuple[int, int]], seconds: float, baseline: Path | None, top: int) -> dict[str, Any]:
    builds = {"this": sys.executable}
    if baseline is not None:
        builds["baseline"] = str(baseline / ".venv" / "bin" / "python")
    rows = []
    with tempfile.TemporaryDirectory() as model_dir:
        for streams, chunk in cases:
            per = {
                name: calls_per_message(py, model_dir, streams, chunk, seconds) for name, py in builds.items()
            }
            row: dict[str, Any] = {"streams": streams, "chunk": chunk}
            row.update({f"{name}_calls_per_message": sum(c.values()) for name, c in per.items()})
            row["functions"] = per
            rows.append(row)
            line = f"{streams:>5} x {chunk:<3} this build {row['this_calls_per_message']:7.1f} calls/message"
            if baseline is not None:
                line += f", baseline {row['baseline_calls_per_message']:7.1f}"
            print(line, flush=True)
            if baseline is not None:
                this, base = per["this"], per["baseline"]
                diffs = sorted(set(this) | set(base), key=lambda k: -abs(this.get(k, 0) - base.get(k, 0)))
                for name in diffs[:top]:
                    delta = this.get(name, 0) - base.get(name, 0)
                    if abs(delta) >= 0.05:
                        print(
                            f"    {base.get(name, 0):7.2f} -> {this.get(name, 0):7.2f}  {delta:+6.2f}  {name}"
                        )
    return {
        "benchmark": "serve_calls",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "baseline": str(baseline) if baseline is not None else None,
        "seconds": seconds,
        "cases": rows,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="1x1,100x1", help="streams x characters per message")
    parser.add_argument("--seconds", type=float, default=3.0, help="counted seconds per build and case")
    parser.add_argument("--baseline", type=Path, help="another checkout (with its .venv) to compare with")
    parser.add_argument("--top", type=int, default=30, help="differences listed per case")
    args = parser.parse_args()
    cases = [(int(a), int(b)) for a, b in (c.split("x") for c in args.cases.split(","))]
    result = main(cases, args.seconds, args.baseline.resolve() if args.baseline else None, args.top)
    sb.RESULTS.mkdir(parents=True, exist_ok=True)
    path = sb.RESULTS / f"calls-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")
