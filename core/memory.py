"""Keep freed large arrays in the process heap instead of returning them to the OS.

glibc serves every allocation above its mmap threshold (128 KiB at first) with a
fresh mmap, so each (T, B, G*H) temporary of a training step is page-faulted in
anew and unmapped again: at H=256 that is about a quarter of a step's time. Raising
the threshold and the trim limit lets the heap recycle those pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc refuses larger values on 64-bit
_TRIM_THRESHOLD = 1024 * 1024 * 1024


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def keep_freed_memory(trim_threshold: int = _TRIM_THRESHOLD) -> bool:
    """Tune glibc's malloc once per process; returns False (and changes nothing) elsewhere.

    trim_threshold: free memory at the heap's top beyond this goes back to the OS. A
    trainer keeps up to 1 GiB (its step's temporaries come back every step); a server
    keeps less, so that memory a burst of big requests took is returned.
    """
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    return bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1 and ok)


def one_heap() -> bool:
    """Serve every thread's allocations from glibc's main heap (one arena); call before threads start.

    By default each thread that meets a locked arena gets one of its own (up to 8 per
    core). In a server, gRPC's transport threads then hold request buffers in arenas of
    their own, where memory one burst of big requests took is neither reused by the other
    threads nor given back, so the server stays at its peak for good; with one arena it
    returns to where it was, and serving is no slower. Returns False (changing nothing)
    off glibc.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, 1) == 1)


def resident_bytes() -> int:
    """This process's resident memory (Linux /proc); 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def return_freed_memory() -> bool:
    """Give the OS the free pages anywhere in the heap (``malloc_trim``), not only at its top."""
    trim = getattr(_libc(), "malloc_trim", None)
    return bool(trim is not None and trim(0))
