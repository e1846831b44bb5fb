"""Child processes die with their server: a SIGKILLed server must not leave trainers or compute processes behind.

Linux delivers a chosen signal to a process when its parent dies (``prctl``
``PR_SET_PDEATHSIG``); each child asks for SIGKILL as its first act. If the parent
died before the request was made, the child sees its parent id changed and exits
at once. Elsewhere (no prctl) children still end when their pipe to the server
closes, only later. This module imports nothing heavy: children import it first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> bool:
    """Have this process SIGKILLed when its parent dies; False where the OS cannot do that."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True) if name else None
        armed = libc is not None and libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        armed = False
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)
    return armed
