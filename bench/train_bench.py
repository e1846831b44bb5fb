"""Training benchmark: nextchar against a stock PyTorch char-RNN, side by side in one run.

Run: ``make bench-train`` (installs torch 2.13.0 first), or directly::

    .venv/bin/python bench/train_bench.py                      # rnn 5M chars, gru/lstm 1M (~10 min)
    .venv/bin/python bench/train_bench.py --cells rnn --chars 5000000
    .venv/bin/python bench/train_bench.py --quick              # 100k chars per cell: a smoke test

Throughput on a shared machine drifts by ±15% between runs, so the figure that counts is
the ratio nextchar/torch measured in the same run. Quality at a fixed character budget
and seed is deterministic, so bits/char can be compared with a reference run too
(PyTorch nn.RNN H=256 B=64 T=64: 2.654 bits/char after 5M characters, ANCHOR_BPC).

Each training run happens in a fresh process: nextchar tunes glibc's malloc for the
whole process and torch keeps OpenMP threads around, and neither should tilt the other's
figures. Both sides share the data file, the 90/10 split, the vocabulary (V includes
nextchar's unknown slot), the cell, H, B, T, Adam lr 2e-3, global-norm clip 5, seed 0 and
the character budget. chars/s counts training steps only; validation is timed apart.

Figures go to bench/results/train-<timestamp>.json and bench/results/train-latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DATA_FILE = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS_DIR = BENCH_DIR / "results"

VAL_FRACTION = 0.1  # the last 10% is validation, split exactly as nextchar.core.train does
DEFAULT_CHARS = {"rnn": 5_000_000, "gru": 1_000_000, "lstm": 1_000_000}
QUICK_CHARS = 100_000
RATIO_GOAL = {"rnn": 1.0, "gru": 0.8, "lstm": 0.8}  # the goal: nextchar/torch chars/s
BPC_GOAL_PCT = 2.0  # the goal: nextchar's bits/char within 2% of torch's
IMPLS = ("nextchar", "torch")
BUSY_WARNING = 0.1  # foreign CPU share above which throughput figures are flagged
ANCHOR_BPC = {("rnn", 256, 64, 64, 5_000_000): 2.654}  # PyTorch at exactly 5M chars, a reference run


# ---------------------------------------------------------------- data


def load_text(path: Path) -> str:
    """The corpus, or a clear exit: the benchmark is meaningless on any other data."""
    if not path.is_file():
        sys.exit(
            f"train_bench: data file not found: {path}\n"
            "  it is expected at ../shared/data/tinyshakespeare.txt next to the repository "
            "(or pass --data FILE)"
        )
    return path.read_text(encoding="utf-8")


def split_text(text: str) -> tuple[str, str]:
    """nextchar's rule (val = the last int(n * 0.1) chars), so both sides score the same text."""
    n_val = int(len(text) * VAL_FRACTION)
    return text[: len(text) - n_val], text[len(text) - n_val :]


# ---------------------------------------------------------------- workers (each in its own process)
# They import torch / nextchar themselves, so the parent process never loads either and
# every run starts from a clean interpreter.


def run_torch(data: str, cell: str, shape: dict[str, int], chars: int, log_every: int) -> dict[str, Any]:
    """Train and score the PyTorch reference on the same split and vocabulary as nextchar."""
    from nextchar.core.vocab import Vocab
    from torch_ref import RefConfig, train_reference

    text = Path(data).read_text(encoding="utf-8")
    vocab = Vocab.from_text(text)
    train_text, val_text = split_text(text)
    config = RefConfig(cell=cell, max_chars=chars, log_every=log_every, **shape)
    return train_reference(
        vocab.encode(train_text),
        vocab.encode(val_text),
        vocab.size,
        config,
        on_progress=_printer("torch", cell),
    )


def run_nextchar(data: str, cell: str, shape: dict[str, int], chars: int, log_every: int) -> dict[str, Any]:
    """Train nextchar through its public API and report the same figures as the reference.

    val_bpc is the validation after the last step (the budget), which is what the
    reference reports; nextchar's own summary keeps the best epoch's figure, recorded as
    best_val_bpc.
    """
    from importlib.metadata import version

    from nextchar.core.config import ModelConfig, TrainConfig
    from nextchar.core.train import train

    text = Path(data).read_text(encoding="utf-8")
    res = train(
        text,
        ModelConfig(cell=cell, hidden=shape["hidden"], layers=1),
        TrainConfig(
            seq_len=shape["seq_len"],
            batch=shape["batch"],
            epochs=1000,
            lr=2e-3,
            optimizer="adam",
            clip="norm",
            clip_value=5.0,
            val_fraction=VAL_FRACTION,
            seed=0,
            max_chars=chars,
            log_every=log_every,
        ),
        on_progress=_printer("nextchar", cell),
    )
    s = res.summary
    last_val = [r for r in res.history if r.get("val_bpc") is not None]
    return {
        "impl": "nextchar",
        "version": version("nextchar"),
        "steps": s.get("steps"),
        "train_chars": s["train_chars"],
        "train_seconds": s["train_seconds"],
        "chars_per_sec": s["chars_per_sec"],
        "val_bpc": last_val[-1]["val_bpc"] if last_val else s.get("val_bpc"),
        "best_val_bpc": s.get("val_bpc"),
        "epochs": s.get("epochs"),
        "wall_seconds": s.get("wall_seconds"),
    }


def _printer(impl: str, cell: str) -> Any:
    """A progress callback that prints one line per record to stderr, so a long run shows life."""

    def show(record: dict[str, Any]) -> None:
        val = record.get("val_bpc")
        print(
            f"  [{impl:>8} {cell:>4}] {record['chars']:>10,}/{record['total_chars']:,} chars"
            f"  train {record['train_bpc']:.3f} bpc"
            + (f"  val {val:.3f} bpc" if val is not None else "")
            + f"  {record['chars_per_sec']:>9,.0f} chars/s",
            file=sys.stderr,
            flush=True,
        )

    return show


def in_fresh_process(fn: Any, *args: Any) -> dict[str, Any]:
    """Run fn(*args) in a newly spawned interpreter; add how busy the rest of the machine was.

    The machine is shared and torch's spinning OpenMP threads slow down far more than
    NumPy under contention, so a ratio measured next to someone else's job is not a
    result: foreign_cpu_share (CPU used by other processes / all CPU, over the run) says
    whether it was quiet.
    """
    busy0, own0, wall0 = _machine_busy_seconds(), _children_cpu_seconds(), time.monotonic()
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        result: dict[str, Any] = pool.submit(fn, *args).result()
    busy1, own1, wall = _machine_busy_seconds(), _children_cpu_seconds(), time.monotonic() - wall0
    if busy0 is not None and busy1 is not None:
        foreign = (busy1 - busy0) - (own1 - own0)
        result["foreign_cpu_share"] = max(foreign, 0.0) / (wall * (os.cpu_count() or 1))
    return result


def _machine_busy_seconds() -> float | None:
    """CPU seconds every process has spent so far (Linux /proc/stat), or None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    """CPU seconds of this process's finished children (the training worker, once reaped)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------- one comparison


def compare(
    cell: str, shape: dict[str, int], chars: int, data: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Train both implementations of one configuration and put their figures side by side."""
    entry: dict[str, Any] = {"cell": cell, **shape, "budget_chars": chars}
    runners = {"torch": run_torch, "nextchar": run_nextchar}
    for impl in args.impls:
        print(
            f"== {impl} {cell} H={shape['hidden']} B={shape['batch']} T={shape['seq_len']}, {chars:,} chars",
            file=sys.stderr,
            flush=True,
        )
        entry[impl] = in_fresh_process(runners[impl], str(data), cell, shape, chars, args.log_every)
    entry.update(verdict(cell, shape, chars, entry))
    return entry


def verdict(cell: str, shape: dict[str, int], chars: int, entry: dict[str, Any]) -> dict[str, Any]:
    """The ratio and bits/char gap, judged against the goals above when both sides ran."""
    anchor = ANCHOR_BPC.get((cell, shape["hidden"], shape["batch"], shape["seq_len"], chars))
    out: dict[str, Any] = {"anchor_torch_val_bpc": anchor}
    if "torch" not in entry or "nextchar" not in entry:
        return out
    nc, ref = entry["nextchar"], entry["torch"]
    ratio = nc["chars_per_sec"] / ref["chars_per_sec"]
    gap = 100.0 * (nc["val_bpc"] - ref["val_bpc"]) / ref["val_bpc"]
    out.update(
        ratio=ratio,
        ratio_goal=RATIO_GOAL.get(cell),
        ratio_met=ratio >= RATIO_GOAL.get(cell, 1.0),
        bpc_gap_pct=gap,
        bpc_met=gap <= BPC_GOAL_PCT,
    )
    return out


# ---------------------------------------------------------------- output


def environment() -> dict[str, Any]:
    """What the figures depend on, so a result file can be judged later."""
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--", "core")),
    }


def _git(*argv: str) -> str | None:
    try:
        out = subprocess.run(["git", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def write_results(report: dict[str, Any], out_dir: Path) -> Path:
    """train-<timestamp>.json plus train-latest.json, each written to a temp file and renamed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"train-{report['timestamp']}.json"
    body = json.dumps(report, indent=2) + "\n"
    for target in (path, out_dir / "train-latest.json"):
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(body, encoding="utf-8")
        tmp.replace(target)
    return path


def table(results: list[dict[str, Any]]) -> str:
    """The short human summary: throughput of each, their ratio, validation bits/char of each."""
    head = (
        f"{'config':<22} {'chars':>10} {'nextchar c/s':>13} {'torch c/s':>10} {'ratio':>6}"
        f" {'nextchar bpc':>13} {'torch bpc':>10} {'gap':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        nc, ref = r.get("nextchar", {}), r.get("torch", {})
        name = f"{r['cell']} H{r['hidden']} B{r['batch']} T{r['seq_len']}"
        lines.append(
            f"{name:<22} {r['budget_chars']:>10,} {_num(nc, 'chars_per_sec'):>13}"
            f" {_num(ref, 'chars_per_sec'):>10} {_fmt(r.get('ratio'), '.2f', r.get('ratio_met')):>6}"
            f" {_fmt(nc.get('val_bpc'), '.3f'):>13} {_fmt(ref.get('val_bpc'), '.3f'):>10}"
            f" {_fmt(r.get('bpc_gap_pct'), '+.1f', r.get('bpc_met'), '%'):>7}"
        )
        if r.get("anchor_torch_val_bpc") is not None:
            lines.append(f"{'':<22} (reference run: torch {r['anchor_torch_val_bpc']} bpc at this budget)")
    busiest = max(
        (r[impl].get("foreign_cpu_share", 0.0) for r in results for impl in IMPLS if impl in r),
        default=0.0,
    )
    if busiest > BUSY_WARNING:
        lines.append(
            f"WARNING: other processes used up to {busiest:.0%} of the CPUs during a run; "
            "chars/s and the ratio are not trustworthy (bits/char still are)"
        )
    lines.append(
        "ratio = nextchar/torch chars/s (goal >= 1.0 rnn, >= 0.8 gru/lstm); "
        "gap = bpc difference vs torch (goal <= +2%); * = goal missed"
    )
    return "\n".join(lines)


def _num(d: dict[str, Any], key: str) -> str:
    return f"{d[key]:,.0f}" if key in d else "-"


def _fmt(value: float | None, spec: str, met: bool | None = None, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{unit}" + ("*" if met is False else "")


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--cells", nargs="+", choices=sorted(DEFAULT_CHARS), default=["rnn", "gru", "lstm"])
    p.add_argument(
        "--chars",
        type=int,
        help="training-character budget for every cell (default: rnn 5,000,000; gru and lstm 1,000,000)",
    )
    p.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK_CHARS:,} chars per cell")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument(
        "--impls",
        nargs="+",
        choices=IMPLS,
        default=list(IMPLS),
        help="which sides to run (both for a ratio)",
    )
    p.add_argument("--log-every", type=int, default=100, help="steps between progress lines")
    p.add_argument("--data", type=Path, default=DATA_FILE)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    if args.chars is not None and args.chars < 1:
        p.error("--chars must be positive")
    return args


def budget(cell: str, args: argparse.Namespace) -> int:
    if args.chars is not None:
        return int(args.chars)
    return QUICK_CHARS if args.quick else DEFAULT_CHARS[cell]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = args.data.resolve()
    text = load_text(data)
    train_text, val_text = split_text(text)
    shape = {"hidden": args.hidden, "batch": args.batch, "seq_len": args.seq_len}
    started = time.time()
    results = [compare(cell, shape, budget(cell, args), data, args) for cell in args.cells]
    report = {
        "timestamp": time.strftime("%Y%m%d-%H%M%S", time.localtime(started)),
        "wall_seconds": time.time() - started,
        "argv": sys.argv[1:] if argv is None else argv,
        "data": {
            "path": str(data),
            "chars": len(text),
            "train_chars": len(train_text),
            "val_chars": len(val_text),
        },
        "settings": {
            "optimizer": "adam",
            "lr": 2e-3,
            "clip": "global norm 5",
            "seed": 0,
            "torch_threads": 2,
            "val_fraction": VAL_FRACTION,
        },
        "environment": environment(),
        "results": results,
    }
    path = write_results(report, args.out)
    print(table(results))
    print(f"results: {path} (and {path.parent / 'train-latest.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
