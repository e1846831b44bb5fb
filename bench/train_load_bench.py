"""Serving while training: does a training job on the same machine cost the streams their latency?

Run: ``make bench-train-load`` (or ``python bench/train_load_bench.py [--duration S] [--rounds N]``).

One ``nextchar serve`` process (the serve benchmark's H=256 rnn) and the serve
benchmark's load client in its own process: one ping-pong stream (p50/p99 per
one-character message) and 100 one-character streams (messages/s). Each case runs
alone and beside a training job (a GRU of 256 on the corpus, started through the
server: its trainer runs at nice 10), alternating rounds, so a slow spell of the
shared machine hits both. Reported: the medians and the with/without ratios, and
the trainer's characters/s. Like the other benchmarks its processes run without
this machine's OpenBLAS pin. Results: ``bench/results/train-load-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_bench as sb  # the server command, its start-up and the load client
from bench_env import unpin_this_process

CASES = [(1, "ping-pong"), (100, "100 streams")]


def start_training(port: int, seconds: float) -> tuple[Any, str]:
    from nextchar.client import ModelConfig, NextCharClient, TrainConfig

    client = NextCharClient(f"127.0.0.1:{port}", timeout=60)
    run = client.start_training(
        sb.corpus(),
        name="background",
        model_config=ModelConfig(cell="gru", hidden=256),
        train_config=TrainConfig(epochs=1000, max_seconds=seconds, val_fraction=0.05),
    )
    job_id = run.job_id
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the trainer is stepping, not starting up
        job = client.job(job_id)
        if job.latest is not None and job.latest.step >= 5:
            break
        time.sleep(0.2)
    run.detach()
    return client, job_id


def main(duration: float, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = sb.start(sb.server_command(tmp))
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {
            name: {"alone": [], "training": []} for _, name in CASES
        }
        trainer_rates: list[float] = []
        try:
            for _ in range(rounds):
                for phase in ("alone", "training"):
                    client, job_id = (
                        start_training(port, 4 * (duration + 3)) if phase == "training" else (None, "")
                    )
                    for streams, name in CASES:
                        runs[name][phase].append(sb.run_client(port, streams, 1, duration, 1.0, proc.pid))
                    if client is not None:
                        latest = client.job(job_id).latest
                        trainer_rates.append(latest.chars_per_sec if latest and latest.chars_per_sec else 0.0)
                        client.cancel_job(job_id)
                        client.close()
                        time.sleep(1.0)  # the trainer gone before the next round
        finally:
            proc.kill()
    cases = {}
    for _, name in CASES:
        alone, training = sb.median_run(runs[name]["alone"]), sb.median_run(runs[name]["training"])
        cases[name] = {
            "alone": alone,
            "training": training,
            "p50_ratio": sb.ratio(training["p50_ms"], alone["p50_ms"]),
            "p99_ratio": sb.ratio(training["p99_ms"], alone["p99_ms"]),
            "messages_ratio": sb.ratio(training["messages_per_sec"], alone["messages_per_sec"]),
        }
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "duration": duration,
        "rounds": rounds,
        "trainer_chars_per_sec": statistics.median(trainer_rates) if trainer_rates else None,
        "cases": cases,
    }


def print_table(r: dict[str, Any]) -> None:
    print(
        f"serving beside a GRU-256 training job ({r['rounds']} alternating rounds, medians); "
        f"trainer {r['trainer_chars_per_sec'] or 0:,.0f} chars/s"
    )
    print(
        f"{'':12} {'alone p50/p99 ms':>18} {'training p50/p99 ms':>20} {'msgs/s alone':>13} {'training':>9} {'ratio':>6}"
    )
    for name, c in r["cases"].items():
        a, t = c["alone"], c["training"]
        print(
            f"{name:12} {a['p50_ms']:8.2f} / {a['p99_ms']:6.2f} {t['p50_ms']:10.2f} / {t['p99_ms']:6.2f} "
            f"{a['messages_per_sec']:13,.0f} {t['messages_per_sec']:9,.0f} {c['messages_ratio']:6.2f}"
        )


if __name__ == "__main__":
    unpin_this_process()  # the measured processes run unpinned, as a user's would (bench_env)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per case and round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    out = main(args.duration, args.rounds)
    sb.RESULTS.mkdir(parents=True, exist_ok=True)
    path = sb.RESULTS / f"train-load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1))
    print_table(out)
    print(f"wrote {path.relative_to(sb.ROOT)}")
