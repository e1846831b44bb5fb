"""Adaptive vs static serving speed in process: chars/s of adapt.advance_many against inference.advance.

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 .venv/bin/python
bench/adapt_speed.py`` (under a minute). The shipped default model, its tuned AdaptConfig; N
sessions of Shakespeare, every adaptive one starting fresh at its own offset in its windows (as
streams that began at different times), fed chunk after chunk, static and adaptive rounds
alternated so both see the same machine. Cases: 100 x 1-character chunks (enough rounds that
every window completes several times), 100 x 64, and 1 x 1 (ping-pong: time per character).
Each case prints the mean rate and the median round (most 1-character rounds complete no window).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads OpenBLAS

import numpy as np
from nextchar.core import adapt, inference
from nextchar.core.default_model import load_default_model
from nextchar.core.modelfile import ModelFile

CASES = ((100, 1, 200), (100, 64, 6), (1, 1, 400))  # sessions, chunk, rounds
CORPUS = Path(__file__).resolve().parents[1] / "core" / "data" / "tinyshakespeare.txt"


def run(
    loaded: ModelFile, text: np.ndarray, sessions: int, chunk: int, rounds: int, adaptive: bool
) -> list[float]:
    """Seconds of each of rounds of sessions x chunk characters of text."""
    model, rule = loaded.model, adapt.rule(loaded.model, loaded.adapt)
    segment = rule.config.segment
    adapters = [adapt.fresh(model) for _ in range(sessions)]
    adapters = [adapt.replay(model, rule, a, text[: n % segment]) for n, a in enumerate(adapters)]
    states = model.initial_state(sessions)
    probs = np.tile(inference.initial_probs(model), (sessions, 1))
    lens = [chunk] * sessions
    elapsed = []
    for r in range(rounds):
        starts = (np.arange(sessions) * 97 + r * chunk) % (len(text) - chunk)
        idx = text[starts[None, :] + np.arange(chunk)[:, None]]  # (chunk, sessions)
        t0 = time.perf_counter()
        if adaptive:
            out, adapters = adapt.advance_many(model, rule, adapters, idx, lens, states, probs, 3, False)
        else:
            out = inference.advance(model, idx, lens, states, probs, 3, False)
        elapsed.append(time.perf_counter() - t0)
        states, probs = out.states, out.last_probs
    return elapsed


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    print(f"CPU: {cpu}")
    loaded = load_default_model()
    text = loaded.model.vocab.encode(CORPUS.read_text(encoding="utf-8")[:20_000])
    for sessions, chunk, rounds in CASES:
        chars = sessions * chunk * rounds
        static: list[float] = []
        adaptive: list[float] = []
        for _ in range(2):  # alternated
            static += run(loaded, text, sessions, chunk, rounds, False)
            adaptive += run(loaded, text, sessions, chunk, rounds, True)
        s, a = sum(static), sum(adaptive)
        s50, a50 = float(np.median(static)), float(np.median(adaptive))
        print(
            f"{sessions} x {chunk}: static {2 * chars / s:,.0f} chars/s, adaptive {2 * chars / a:,.0f} chars/s "
            f"({s / a:.0%}); per round {s / 2 / rounds * 1e3:.2f} vs {a / 2 / rounds * 1e3:.2f} ms, "
            f"p50 {s50 * 1e3:.2f} vs {a50 * 1e3:.2f} ms ({a50 / s50:.2f}x)"
        )


if __name__ == "__main__":
    main()
