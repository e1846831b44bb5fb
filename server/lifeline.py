"""Child processes die with their server: a SIGKILLed server must not leave trainers or compute processes behind.

Linux delivers a chosen signal to a process when its parent dies (``prctl``
``PR_SET_PDEATHSIG``); each child asks for SIGKILL as its first act. If the parent
died before the request was made, the child sees its parent id changed and exits
at once. Elsewhere (no prctl) children still end when their pipe to the server
closes, only later. This module imports nothing heavy: children import it first.

A child also ignores SIGINT: Ctrl-C at a terminal reaches the whole foreground
process group, and it is the server that decides how its children end (it drains,
then closes them), not a KeyboardInterrupt traceback in each child.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> bool:
    """Have this process SIGKILLed when its parent dies (and deaf to Ctrl-C); False where the OS
    cannot do the first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True) if name else None
        armed = libc is not None and libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        armed = False
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)
    return armed
