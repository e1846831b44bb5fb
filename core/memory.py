"""Keep freed large arrays in the process heap instead of returning them to the OS.

glibc serves every allocation above its mmap threshold (128 KiB at first) with a
fresh mmap, so each (T, B, G*H) temporary of a training step is page-faulted in
anew and unmapped again: at H=256 that is a quarter of a step's time. Raising the
threshold and the trim limit lets the heap recycle those pages. Measured on the
training step: rnn 23 -> 17 ms, lstm 87 -> 72 ms per 64x64 chunk.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc refuses larger values on 64-bit
_TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Tune glibc's malloc once per process; returns False (and changes nothing) elsewhere."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    return bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok)
