"""Training benchmark: nextchar against a stock PyTorch char-RNN, side by side in one run.

Run: ``make bench-train`` (installs torch 2.13.0 first), or directly::

    .venv/bin/python bench/train_bench.py                      # 5M chars per cell (~8 min)
    .venv/bin/python bench/train_bench.py --cells gru --chars 1000000 --dropout 0.25
    .venv/bin/python bench/train_bench.py --quick              # 100k chars per cell: a smoke test

Throughput on a shared machine drifts by ±15% between runs (and this one has had spells
50% slower), so the figure that counts is the ratio nextchar/torch measured in the same
run; ``--rounds N`` alternates N runs of each side and takes the median of the rounds'
ratios, each round's two runs being neighbours in time. Quality at a fixed character budget
and seed is deterministic, so bits/char can be compared with a reference run too
(PyTorch nn.RNN H=256 B=64 T=64: 2.654 bits/char after 5M characters, ANCHOR_BPC).

Each training run happens in a fresh process: nextchar tunes glibc's malloc for the
whole process and torch keeps OpenMP threads around, and neither should tilt the other's
figures. Both sides share the data file, the 90/10 split, the vocabulary (V includes
nextchar's unknown slot), the cell, H, B, T, Adam lr 2e-3, global-norm clip 5, seed 0 and
the character budget (and, with --dropout, the same dropout: on what the layer hands to
the read-out, inverted, training only). chars/s counts training steps only; validation is
timed apart.

The measured processes run without this machine's OpenBLAS pin (bench_env; --keep-pin
keeps it), and each records the BLAS kernel and thread count that ran. The arithmetic
limit: fresh processes time float32 products of the step's big shapes, at the start and
the end of the run, and the best rate is what each cell's chars/s is set against, at
6·H·(G·H + V) flops per character (G gates; forward, backward and weight gradients of the
recurrent product and the read-out; the one-hot input is a gather).

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
from bench_env import PIN, blas_info, matmul_gflops, pin_of

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DATA_FILE = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS_DIR = BENCH_DIR / "results"

VAL_FRACTION = 0.1  # the last 10% is validation, split exactly as nextchar.core.train does
DEFAULT_CHARS = {"rnn": 5_000_000, "gru": 5_000_000, "lstm": 5_000_000}
QUICK_CHARS = 100_000
RATIO_GOAL = {"rnn": 2.8, "gru": 1.8, "lstm": 1.2}  # the goal: nextchar/torch chars/s, unpinned
GATES = {"rnn": 1, "gru": 3, "lstm": 4}
LIMIT_GOAL = {"rnn": 0.6}  # the goal: chars/s x flops per char / the machine's matrix-product rate
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


def run_torch(
    data: str, cell: str, shape: dict[str, int], chars: int, log_every: int, dropout: float
) -> dict[str, Any]:
    """Train and score the PyTorch reference on the same split and vocabulary as nextchar."""
    from nextchar.core.vocab import Vocab
    from torch_ref import RefConfig, train_reference

    text = Path(data).read_text(encoding="utf-8")
    vocab = Vocab.from_text(text)
    train_text, val_text = split_text(text)
    config = RefConfig(cell=cell, max_chars=chars, log_every=log_every, dropout=dropout, **shape)
    result = train_reference(
        vocab.encode(train_text),
        vocab.encode(val_text),
        vocab.size,
        config,
        on_progress=_printer("torch", cell),
    )
    return {**result, **blas_info()}  # NumPy's BLAS here; torch's own threads are result["threads"]


def run_nextchar(
    data: str, cell: str, shape: dict[str, int], chars: int, log_every: int, dropout: float
) -> dict[str, Any]:
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
            dropout=dropout,
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
        "vocab_size": res.model.vocab.size,
        **blas_info(),
    }


def run_matmul(shape: dict[str, int]) -> dict[str, Any]:
    """The machine's float32 matrix-product rate on the training step's big shapes, in this process's
    BLAS (as unpinned as the training runs'): the window's (T*B, H) @ (H, H) and the weight
    gradient's (H, T*B) @ (T*B, H)."""
    H, TB = shape["hidden"], shape["batch"] * shape["seq_len"]
    return {
        "window_gflops": matmul_gflops(TB, H, H),
        "weight_grad_gflops": matmul_gflops(H, TB, H),
        **blas_info(),
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
    entry: dict[str, Any] = {"cell": cell, **shape, "budget_chars": chars, "dropout": args.dropout}
    runners = {"torch": run_torch, "nextchar": run_nextchar}
    runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in args.impls}
    for round_ in range(args.rounds):
        # alternate who goes first, so a slow spell of the machine falls on both sides alike
        for impl in args.impls if round_ % 2 == 0 else args.impls[::-1]:
            print(
                f"== {impl} {cell} H={shape['hidden']} B={shape['batch']} T={shape['seq_len']}, "
                f"{chars:,} chars (round {round_ + 1} of {args.rounds})",
                file=sys.stderr,
                flush=True,
            )
            runs[impl].append(
                in_fresh_process(runners[impl], str(data), cell, shape, chars, args.log_every, args.dropout)
            )
    for impl, done in runs.items():
        speeds = [run["chars_per_sec"] for run in done]
        entry[impl] = {
            **sorted(done, key=lambda run: run["chars_per_sec"])[len(done) // 2],
            "rounds_chars_per_sec": speeds,
        }
    entry.update(verdict(cell, shape, chars, entry))
    return entry


def verdict(cell: str, shape: dict[str, int], chars: int, entry: dict[str, Any]) -> dict[str, Any]:
    """The ratio and bits/char gap, judged against the goals above when both sides ran."""
    key = (cell, shape["hidden"], shape["batch"], shape["seq_len"], chars)
    anchor = None if entry["dropout"] else ANCHOR_BPC.get(key)
    out: dict[str, Any] = {"anchor_torch_val_bpc": anchor}
    if "torch" not in entry or "nextchar" not in entry:
        return out
    nc, ref = entry["nextchar"], entry["torch"]
    # each round's own ratio (its two runs were neighbours in time), then their median
    rounds = [a / b for a, b in zip(nc["rounds_chars_per_sec"], ref["rounds_chars_per_sec"], strict=True)]
    ratio = float(np.median(rounds))
    gap = 100.0 * (nc["val_bpc"] - ref["val_bpc"]) / ref["val_bpc"]
    out.update(
        ratio=ratio,
        ratio_rounds=rounds,
        ratio_goal=RATIO_GOAL.get(cell),
        ratio_met=ratio >= RATIO_GOAL.get(cell, 1.0),
        bpc_gap_pct=gap,
        bpc_met=gap <= BPC_GOAL_PCT,
    )
    return out


def flops_per_char(cell: str, hidden: int, vocab: int) -> int:
    """6·H·(G·H + V): the forward product, its backward and its weight gradient (2 flops per
    multiply-add each), for the recurrent weights (H, G·H) and the read-out (H, V)."""
    return 6 * hidden * (GATES[cell] * hidden + vocab)


def arithmetic_limit(entry: dict[str, Any], gflops: float) -> dict[str, Any]:
    """Each side's chars/s as a fraction of what the machine's matrix-product rate allows."""
    nc = entry.get("nextchar")
    vocab = nc["vocab_size"] if nc else None
    if vocab is None:
        return {}
    flops = flops_per_char(entry["cell"], entry["hidden"], vocab)
    out: dict[str, Any] = {"flops_per_char": flops, "limit_chars_per_sec": gflops * 1e9 / flops}
    for impl in IMPLS:
        if impl in entry:
            out[f"{impl}_limit_fraction"] = entry[impl]["chars_per_sec"] * flops / (gflops * 1e9)
    goal = LIMIT_GOAL.get(entry["cell"])
    if goal is not None:
        out.update(limit_goal=goal, limit_met=out["nextchar_limit_fraction"] >= goal)
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


def table(results: list[dict[str, Any]], blas: dict[str, Any]) -> str:
    """The short human summary: throughput of each, their ratio, validation bits/char of each, and
    nextchar's fraction of the arithmetic limit."""
    head = (
        f"{'config':<22} {'chars':>10} {'nextchar c/s':>13} {'torch c/s':>10} {'ratio':>6}"
        f" {'nextchar bpc':>13} {'torch bpc':>10} {'gap':>7} {'limit':>6}"
    )
    nc_blas: dict[str, Any] = next((r["nextchar"] for r in results if "nextchar" in r), {})
    torch_threads = next((r["torch"].get("threads") for r in results if "torch" in r), None)
    lines = [
        f"BLAS: nextchar ran OpenBLAS kernel {nc_blas.get('blas_kernel', '-')} on "
        f"{nc_blas.get('blas_threads', '-')} thread(s), torch {torch_threads} thread(s); "
        f"pin removed: {blas['pin_removed'] or 'none set'}",
        f"arithmetic limit: float32 matrix products at {blas['gflops']:.0f} GFLOP/s (best of "
        f"{', '.join(f'{g:.0f}' for g in blas['gflops_runs'])})",
        head,
        "-" * len(head),
    ]
    for r in results:
        nc, ref = r.get("nextchar", {}), r.get("torch", {})
        name = f"{r['cell']} H{r['hidden']} B{r['batch']} T{r['seq_len']}"
        lines.append(
            f"{name:<22} {r['budget_chars']:>10,} {_num(nc, 'chars_per_sec'):>13}"
            f" {_num(ref, 'chars_per_sec'):>10} {_fmt(r.get('ratio'), '.2f', r.get('ratio_met')):>6}"
            f" {_fmt(nc.get('val_bpc'), '.3f'):>13} {_fmt(ref.get('val_bpc'), '.3f'):>10}"
            f" {_fmt(r.get('bpc_gap_pct'), '+.1f', r.get('bpc_met'), '%'):>7}"
            f" {_fmt(r.get('nextchar_limit_fraction'), '.0%', r.get('limit_met')):>6}"
        )
        if len(r.get("ratio_rounds") or []) > 1:
            lines.append(
                f"{'':<22} (ratio of each round: {', '.join(f'{x:.2f}' for x in r['ratio_rounds'])})"
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
    goals = ", ".join(f"{cell} >= {goal}" for cell, goal in RATIO_GOAL.items())
    lines.append(
        f"ratio = nextchar/torch chars/s (goal {goals}); gap = bpc difference vs torch (goal <= +2%);\n"
        "limit = nextchar chars/s x 6·H·(G·H+V) flops per char / the matrix-product rate "
        f"(goal rnn >= {LIMIT_GOAL['rnn']:.0%}); * = goal missed"
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
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="alternating runs of each side per cell; the ratio is the median of the rounds' ratios",
    )
    p.add_argument("--log-every", type=int, default=100, help="steps between progress lines")
    p.add_argument("--dropout", type=float, default=0.0, help="the same dropout on both sides (0: none)")
    p.add_argument(
        "--keep-pin",
        action="store_true",
        help=f"keep this machine's OpenBLAS pin ({', '.join(PIN)}) for the measured processes",
    )
    p.add_argument("--data", type=Path, default=DATA_FILE)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    if args.chars is not None and args.chars < 1:
        p.error("--chars must be positive")
    if args.rounds < 1:
        p.error("--rounds must be positive")
    if not 0.0 <= args.dropout < 1.0:
        p.error("--dropout must be in [0, 1)")
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
    pin = pin_of(os.environ)
    if not args.keep_pin:  # the spawned workers inherit this environment; this process measures nothing
        for name in pin:
            del os.environ[name]
    started = time.time()
    rates = [in_fresh_process(run_matmul, shape)]
    results = [compare(cell, shape, budget(cell, args), data, args) for cell in args.cells]
    rates.append(in_fresh_process(run_matmul, shape))
    gflops_runs = [max(r["window_gflops"], r["weight_grad_gflops"]) for r in rates]
    blas = {
        "pin_removed": {} if args.keep_pin else pin,
        "pin_kept": pin if args.keep_pin else {},
        "gflops": max(gflops_runs),
        "gflops_runs": gflops_runs,
        "matmul_runs": rates,
    }
    for entry in results:
        entry.update(arithmetic_limit(entry, blas["gflops"]))
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
            "dropout": args.dropout,
        },
        "environment": environment(),
        "blas": blas,
        "results": results,
    }
    path = write_results(report, args.out)
    print(table(results, blas))
    print(f"results: {path} (and {path.parent / 'train-latest.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
