"""Completion benchmark: what a Complete costs the server, n = 3 continuations of up to 12 characters, H = 256.

Run: ``make bench-complete`` (or ``python bench/complete_bench.py [--calls N]``).

An H=256 rnn is trained for a fixed budget on the corpus (tinyshakespeare from
../shared when present, else the repository's bundled text, else random text), so
the beam search meets the peaked distributions a real model has, not a random
model's flat ones. Then, at --calls points of held-out text:

- in process: ``nextchar.core.completion.complete`` from the session's state, one
  BLAS thread: the server's compute for one Complete;
- over gRPC, against a real ``nextchar serve`` process: Complete on a live session,
  and GetSession on the same session as the transport's reference in the same run
  (the difference is what completion adds to a call).

The goal (issue "keyboard-grade streaming"): the in-process time ≤ 2 ms. Like the
other benchmarks it runs its processes without this machine's OpenBLAS pin
(OPENBLAS_CORETYPE, OPENBLAS_L2_SIZE: a user's machine has none) and records the
kernel that ran. Results: ``bench/results/complete-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_env import blas_kernel, unpin_this_process

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CORPORA = [
    ROOT.parent / "shared" / "data" / "tinyshakespeare.txt",
    ROOT / "core" / "data" / "tinyshakespeare.txt",
]
TRAIN_CHARS = 2_000_000
N, MAX_CHARS, HIDDEN = 3, 12, 256


def unpinned() -> None:
    """Run this script again without the OpenBLAS pin, if it is set (before NumPy loads OpenBLAS)."""
    unpin_this_process()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def corpus() -> str:
    import numpy as np  # after unpinned(): NumPy loads OpenBLAS

    for path in CORPORA:
        if path.is_file():
            return path.read_text()
    rng = np.random.default_rng(0)
    return "".join(rng.choice(list("abcdefghij klmnop\n"), 400_000))


def percentiles(seconds: list[float]) -> dict[str, float]:
    import numpy as np  # after unpinned(): NumPy loads OpenBLAS

    ms = np.array(seconds) * 1e3
    return {
        "p50_ms": float(np.median(ms)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
    }


def main(calls: int) -> dict[str, Any]:
    import numpy as np  # after unpinned(): NumPy loads OpenBLAS
    from nextchar.client import NextCharClient
    from nextchar.core.completion import complete
    from nextchar.core.config import ModelConfig, TrainConfig
    from nextchar.core.inference import feed, initial_probs
    from nextchar.core.train import train
    from nextchar.server.registry import Registry

    text = corpus()
    start = time.perf_counter()
    config = TrainConfig(epochs=100, max_chars=TRAIN_CHARS, val_fraction=0.1, seed=0)
    result = train(text, ModelConfig(cell="rnn", hidden=HIDDEN), config)
    model, trained = result.model, time.perf_counter() - start
    held_out = text[-100_000:]
    rng = np.random.default_rng(0)
    points = sorted(int(p) for p in rng.integers(200, len(held_out), calls))
    states = []
    for p in points:  # the state after 200 characters of context before each point
        a = feed(
            model, model.initial_state(1)[0], initial_probs(model), model.vocab.encode(held_out[p - 200 : p])
        )
        states.append((a.states[0], a.last_probs[0], held_out[p - 200 : p]))
    for state, probs, _ in states[:20]:
        complete(model, state, probs, N, MAX_CHARS)  # warm-up
    local = []
    for state, probs, _ in states:
        t = time.perf_counter()
        complete(model, state, probs, N, MAX_CHARS)
        local.append(time.perf_counter() - t)

    with tempfile.TemporaryDirectory() as model_dir:
        Registry(Path(model_dir)).register("default", model, history=[], summary={}, promote=True)
        cmd = [sys.executable, "-m", "nextchar.cli", "serve", "--port", "0", "--model-dir", model_dir]
        proc = subprocess.Popen([*cmd, "--no-default-model"], stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        port = next(int(line.rsplit(":", 1)[1].split()[0]) for line in proc.stderr if "serving on" in line)
        try:
            with NextCharClient(f"127.0.0.1:{port}") as client:
                rpc: list[float] = []
                info: list[float] = []
                for _, _, context in states:
                    with client.session(prime=context) as session:
                        for timings, call in (
                            (rpc, lambda: session.complete(N, max_chars=MAX_CHARS)),
                            (info, session.refresh),
                        ):
                            t = time.perf_counter()
                            call()
                            timings.append(time.perf_counter() - t)
        finally:
            proc.terminate()
            proc.wait(30)
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "blas_kernel": blas_kernel(),
        "model": {
            "cell": "rnn",
            "hidden": HIDDEN,
            "vocab": model.vocab.size,
            "trained_chars": TRAIN_CHARS,
            "train_seconds": round(trained, 1),
            "val_bpc": result.summary.get("val_bpc"),
        },
        "n": N,
        "max_chars": MAX_CHARS,
        "calls": calls,
        "in_process": percentiles(local),
        "rpc_complete": percentiles(rpc),
        "rpc_get_session": percentiles(info),
        "goal_ms": 2.0,
    }


def print_table(r: dict[str, Any]) -> None:
    print(
        f"completion, n={r['n']} up to {r['max_chars']} chars, H={r['model']['hidden']} rnn "
        f"(val {r['model']['val_bpc']:.2f} bits/char), BLAS kernel {r['blas_kernel']}, {r['calls']} calls"
    )
    print(f"{'':28} {'p50 ms':>8} {'p99 ms':>8}")
    for key, label in (
        ("in_process", "in process (server compute)"),
        ("rpc_complete", "Complete RPC"),
        ("rpc_get_session", "GetSession RPC (reference)"),
    ):
        print(f"{label:28} {r[key]['p50_ms']:8.3f} {r[key]['p99_ms']:8.3f}")
    added = r["rpc_complete"]["p50_ms"] - r["rpc_get_session"]["p50_ms"]
    met = "met" if r["in_process"]["p50_ms"] <= r["goal_ms"] else "NOT met"
    print(f"completion adds {added:.3f} ms to a call (p50); goal ≤ {r['goal_ms']} ms in process: {met}")


if __name__ == "__main__":
    unpinned()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    out = main(args.calls)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"complete-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1))
    print_table(out)
    print(f"wrote {path.relative_to(ROOT)}")
