"""What every benchmark shares about the BLAS it runs on: the machine's OpenBLAS pin, and what really ran.

This machine kind's environment sets ``OPENBLAS_CORETYPE`` (and ``OPENBLAS_L2_SIZE``),
which holds NumPy's OpenBLAS to an AVX2 kernel on an AVX-512 processor (float32 matrix
products ~240 GFLOP/s pinned, ~445 unpinned on 2 cores). The pin exists because older
OpenBLAS builds miscompute on some processors, so the tests and CI keep it; a user's
machine has none, so the benchmarks run their measured processes without it (both
sides of a comparison alike) and record the kernel and thread count that ran.

Import this before NumPy where the process itself is measured: ``unpin_this_process``
re-executes the interpreter, and OpenBLAS reads the variables when it loads.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PIN = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")  # this machine's; a user's has neither


def without_pin(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of env for a measured child process: the pin's variables removed, all else kept."""
    return {k: v for k, v in env.items() if k not in PIN}


def pin_of(env: Mapping[str, str]) -> dict[str, str]:
    """The pin's variables that env sets (recorded in results, so a file says what was removed)."""
    return {k: env[k] for k in PIN if k in env}


def unpin_this_process() -> None:
    """Run this script again without the pin, if it is set; call before NumPy loads OpenBLAS."""
    if pin_of(os.environ):
        os.execve(sys.executable, [sys.executable, *sys.argv], without_pin(os.environ))


def _openblas() -> ctypes.CDLL | None:
    """The OpenBLAS this process has loaded (NumPy's), found in /proc/self/maps; None if none is."""
    try:
        path = next(
            line.split()[-1]
            for line in Path("/proc/self/maps").read_text().splitlines()
            if "openblas" in Path(line.split()[-1]).name and ".so" in line
        )
        return ctypes.CDLL(path)
    except (StopIteration, OSError):
        return None


def _call(lib: ctypes.CDLL, names: tuple[str, ...], restype: Any) -> Any:
    for name in names:
        if hasattr(lib, name):
            fn = getattr(lib, name)
            fn.restype = restype
            return fn()
    return None


def blas_kernel() -> str:
    """The OpenBLAS kernel NumPy runs (the pin's effect, e.g. 'Haswell' pinned, 'SkylakeX' not)."""
    lib = _openblas()
    name = (
        None
        if lib is None
        else _call(
            lib,
            ("scipy_openblas_get_corename64_", "openblas_get_corename64_", "openblas_get_corename"),
            ctypes.c_char_p,
        )
    )
    return "unknown" if name is None else str(name.decode())


def blas_threads() -> int | None:
    """The number of threads NumPy's OpenBLAS runs a matrix product on."""
    lib = _openblas()
    names = ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads")
    n = None if lib is None else _call(lib, names, ctypes.c_int)
    return None if n is None else int(n)


def blas_info() -> dict[str, Any]:
    """Kernel and threads of this process's BLAS, plus what of the pin its environment still sets."""
    return {"blas_kernel": blas_kernel(), "blas_threads": blas_threads(), "pin_in_env": pin_of(os.environ)}


def matmul_gflops(m: int, k: int, n: int, seconds: float = 0.5) -> float:
    """float32 GFLOP/s of one (m, k) @ (k, n) product, the best of repeated timings (the rate the
    machine reaches on this shape, not its average under someone else's load)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    out = np.empty((m, n), dtype=np.float32)
    for _ in range(3):
        np.matmul(a, b, out=out)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t)
    return 2.0 * m * k * n / best / 1e9
