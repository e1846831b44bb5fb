"""Adaptation benchmark: static vs adapted bits/char of the shipped default model (dynamic evaluation).

Run: ``make bench-adapt`` (or ``python bench/adapt_bench.py [--ood-chars N]``), a few minutes on
one BLAS thread.

The model's AdaptConfig is the one its file records: tuned as every training run
tunes at its end (``nextchar.core.adapt_tune.at_end_of_training``: gradient statistics
on the training text's end, then the best of a few rates on the validation text; the
in-domain figure is thus on the text its rate was picked on). ``--retune`` tunes it
again here instead (the same call). Two texts are scored from a fresh session
(``adapt_tune.side_by_side``; ``nextchar eval --adapt`` measures the same thing on a server), each window of
20 characters before the step that learns from it:

- in-domain: tinyshakespeare's last 10% (the bundled corpus's validation split);
- out-of-domain: this repository's tracked Python and Markdown files, sorted by path
  and concatenated, their first --ood-chars characters (code and prose the model
  never saw; the text's SHA-256 is recorded, since the repository changes).

Static figures are ``nextchar.core.evaluate``'s (one state through the text, no
adaptation). Goals (issue 22): in-domain adapted <= 2.15 bits/char (static 2.344);
out-of-domain >= 25% fewer bits/char than static; the first 1,000 characters of
each already better than static. Results: ``bench/results/adapt-<time>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads OpenBLAS

from bench_env import blas_info

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OOD_CHARS = 100_000
FIRST = 1_000
GOAL_IN_DOMAIN = 2.15
GOAL_OOD_CUT = 0.25


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def repository_text(chars: int) -> str:
    files = subprocess.run(
        ["git", "ls-files", "*.py", "*.md"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    return "".join((ROOT / name).read_text(encoding="utf-8") for name in sorted(files))[:chars]


def measure(name: str, text: str, config: Any) -> dict[str, Any]:
    from nextchar.core.adapt_tune import side_by_side
    from nextchar.core.default_model import load_default_model

    model = load_default_model().model
    started = time.perf_counter()
    scores = side_by_side(model, config, model.vocab.encode(text), FIRST)
    seconds = time.perf_counter() - started
    return {
        "text": name,
        "chars": int(scores["chars"]),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "static_bpc": scores["static_bpc"],
        "adapted_bpc": scores["adapted_bpc"],
        "change": scores["adapted_bpc"] / scores["static_bpc"] - 1,
        "first_chars": int(scores["first_chars"]),
        "first_static_bpc": scores["first_static_bpc"],
        "first_adapted_bpc": scores["first_adapted_bpc"],
        "adapt_seconds": seconds,
    }


def main(ood_chars: int, retune: bool = False) -> dict[str, Any]:
    from nextchar.core import adapt
    from nextchar.core.adapt_tune import at_end_of_training
    from nextchar.core.default_model import corpus, load_default_model

    _, training, validation = corpus()
    shipped = load_default_model()
    model, config, tune_seconds = shipped.model, shipped.adapt, None
    if retune:
        started = time.perf_counter()
        config = at_end_of_training(model, training, validation).config
        tune_seconds = time.perf_counter() - started
    rows = [
        measure("tinyshakespeare, last 10%", validation, config),
        measure(
            f"this repository's .py and .md, first {ood_chars:,} chars", repository_text(ood_chars), config
        ),
    ]
    in_domain, ood = rows
    return {
        "benchmark": "adapt",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": cpu_model(),
        "load_average": os.getloadavg(),  # the machine is shared: others' load slows the timings only
        "blas": blas_info(),
        "model": "default-model.npz (GRU-256)",
        "adapted_weights": list(adapt.adapted_names(model)),
        "adapter_bytes": adapt.adapter_bytes(model),
        "config": {k: v for k, v in config.to_dict().items() if k != "stats"},
        "config_source": "tuned here (--retune)" if retune else "recorded in the shipped file",
        "tune_seconds": tune_seconds,
        "texts": rows,
        "goals": {
            "in_domain_le_2.15": in_domain["adapted_bpc"] <= GOAL_IN_DOMAIN,
            "ood_25pct_fewer": ood["change"] <= -GOAL_OOD_CUT,
            "first_1000_better": all(r["first_adapted_bpc"] < r["first_static_bpc"] for r in rows),
        },
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"lr {result['config']['lr']:g}, decay {result['config']['decay']:g}, segment "
        f"{result['config']['segment']}, floor {result['config']['floor']:g} ({result['config_source']}"
        + (f", {result['tune_seconds']:.0f} s" if result["tune_seconds"] is not None else "")
        + f"); adapter {result['adapter_bytes'] / 1024:.0f} KB",
        "| text | chars | static bits/char | adapted | change | first 1,000: static | adapted |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["texts"]:
        lines.append(
            f"| {r['text']} | {r['chars']:,} | {r['static_bpc']:.3f} | {r['adapted_bpc']:.3f} | "
            f"{r['change']:+.1%} | {r['first_static_bpc']:.3f} | {r['first_adapted_bpc']:.3f} |"
        )
    lines.append("goals: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in result["goals"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--ood-chars", type=int, default=OOD_CHARS)
    parser.add_argument("--retune", action="store_true", help="tune the config here, not the file's")
    args = parser.parse_args()
    result = main(args.ood_chars, args.retune)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"adapt-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {out}", file=sys.stderr)
