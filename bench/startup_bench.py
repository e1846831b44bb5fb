"""Command-line start-up: how long ``nextchar --help`` and ``nextchar predict`` take, end to end.

Run: ``make bench-startup`` (or ``python bench/startup_bench.py [--runs N]``).

People call the CLI in loops, so a client command should be done in well under
0.2 s. Each command runs --runs times as a fresh process (the installed
``nextchar`` script, as a shell would run it); ``predict`` talks to a real
``nextchar serve`` started here. Reported: median and worst wall time per command,
beside ``python -c pass`` (the interpreter's own start) measured the same way.
Results: ``bench/results/startup-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
NEXTCHAR = str(Path(sys.executable).with_name("nextchar"))
GOAL = 0.2  # seconds


def timed(cmd: list[str], runs: int) -> dict[str, float]:
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        seconds.append(time.perf_counter() - start)
    return {"median_s": statistics.median(seconds), "max_s": max(seconds)}


def main(runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as model_dir:
        serve = [NEXTCHAR, "serve", "--port", "0", "--model-dir", model_dir]
        proc = subprocess.Popen(serve, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        port = next(int(line.rsplit(":", 1)[1].split()[0]) for line in proc.stderr if "serving on" in line)
        try:
            timed([NEXTCHAR, "predict", "hello", "--server", f"127.0.0.1:{port}"], 2)  # warm the caches
            return {
                "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "runs": runs,
                "python -c pass": timed([sys.executable, "-c", "pass"], runs),
                "nextchar --help": timed([NEXTCHAR, "--help"], runs),
                "nextchar predict": timed(
                    [NEXTCHAR, "predict", "hello", "--server", f"127.0.0.1:{port}"], runs
                ),
                "goal_s": GOAL,
            }
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    out = main(parser.parse_args().runs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"startup-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"command-line start-up, {out['runs']} runs each (median / worst, seconds)")
    for name in ("python -c pass", "nextchar --help", "nextchar predict"):
        r = out[name]
        mark = "" if name.startswith("python") else ("  met" if r["median_s"] < GOAL else "  NOT met")
        print(f"  {name:18} {r['median_s']:.3f} / {r['max_s']:.3f}{mark}")
    print(f"wrote {path.relative_to(ROOT)}")
