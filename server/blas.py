"""One BLAS thread per server process.

OpenBLAS's default threads spin inside a server and cost ~28% of chunked
throughput on a 2-core machine (bench/serve_bench.py); the scheduler's products are
small enough that one thread is faster. ``OPENBLAS_NUM_THREADS`` only works if set
before NumPy loads OpenBLAS, and ``serve()`` may be called by a CLI that imported
NumPy long before, so this sets the variable (for this process if NumPy is not
loaded yet, and for spawned training workers) AND, if OpenBLAS is already loaded,
calls its ``set_num_threads`` through ctypes — what threadpoolctl does, without
adding a dependency for one function call.
"""

from __future__ import annotations

import ctypes
import os
import sys

_SETTERS = (
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads_64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)
_GETTERS = tuple(name.replace("set_", "get_") for name in _SETTERS)


def _loaded_openblas() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return []
    return sorted(paths)


def limit_blas_threads(n: int = 1) -> int | None:
    """Make OpenBLAS use n threads; returns the thread count it reports, or None if it cannot tell."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ[var] = str(n)
    if "numpy" not in sys.modules:
        return n  # the variable is read when NumPy loads OpenBLAS
    reported: int | None = None
    for path in _loaded_openblas():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for setter, getter in zip(_SETTERS, _GETTERS, strict=True):
            if hasattr(lib, setter):
                getattr(lib, setter)(ctypes.c_int(n))
                if hasattr(lib, getter):
                    reported = int(getattr(lib, getter)())
                break
    return reported
