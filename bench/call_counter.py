"""Run ``nextchar.cli`` (a server) counting the Python calls its event loop makes, on signal.

Run: ``python bench/call_counter.py OUT.json serve ...`` (what ``python -m nextchar.cli`` takes).
SIGUSR1 starts counting (and stops it, the second time); SIGUSR2 writes the counts to OUT.json:
``{"calls": {"file:function": n, "C:name": n}}``. Signal handlers run in the main thread, which
is the server's event loop, so the counts are that thread's: every Python function entered
(a coroutine each time it resumes) and every C function called from Python.

A count is exact where a timing is noisy (±10% between runs on a shared machine): bench/serve_calls.py
compares two builds by their calls per message.
"""

from __future__ import annotations

import collections
import json
import runpy
import signal
import sys
from types import FrameType
from typing import Any

counts: collections.Counter[str] = collections.Counter()
counting = False


def where(path: str) -> str:
    """A code file as the counts name it: nextchar's from the package root, others by their
    library path (asyncio/events.py, grpc/aio/_server.py)."""
    for root in ("nextchar/", "site-packages/", "/lib/python"):
        if root in path:
            tail = path.rsplit(root, 1)[1]
            return tail.split("/", 1)[1] if root == "/lib/python" and "/" in tail else tail
    return path


def count(frame: FrameType, event: str, arg: Any) -> None:
    if event == "call":
        code = frame.f_code
        counts[f"{where(code.co_filename)}:{code.co_name}"] += 1
    elif event == "c_call":
        counts[f"C:{getattr(arg, '__qualname__', repr(arg))}"] += 1


def toggle(*_: object) -> None:
    global counting
    counting = not counting
    sys.setprofile(count if counting else None)


def dump(*_: object) -> None:
    with open(OUT, "w") as f:
        json.dump({"calls": dict(counts)}, f)


if __name__ == "__main__":
    OUT = sys.argv[1]
    signal.signal(signal.SIGUSR1, toggle)
    signal.signal(signal.SIGUSR2, dump)
    sys.argv = ["nextchar.cli", *sys.argv[2:]]
    runpy.run_module("nextchar.cli", run_name="__main__")
