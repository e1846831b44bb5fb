"""The calls clients hold open (streams, uploads, WebSockets), and the bound on how many.

Each open call holds memory of the server (about 14 KB for an idle PredictStream), so
their number is bounded by ``limit``. Past it, the call idle the longest is closed to
make room for the new one: its handler is cancelled, and the cancel reaches it as
ResourceExhausted, which its method answers like any refusal. Refusing the new call
instead would let a client that holds idle calls lock every other client out; this
way an idle holder loses its oldest call, and a call that keeps sending (``touch``)
is never the one closed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from nextchar.server.errors import ResourceExhausted


class OpenCalls:
    """The open calls, the longest idle first; every method runs on the event loop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.on_evicted: Callable[[], None] = lambda: None  # a call closed for room (metrics)
        self.idle = asyncio.Event()  # set whenever the last open call ends (the drain waits for it)
        self._open: collections.OrderedDict[asyncio.Task[Any], None] = collections.OrderedDict()
        self._evicted: set[asyncio.Task[Any]] = set()  # cancelled for room, not by their client

    def __len__(self) -> int:
        return len(self._open)

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Count the running call (the current task) among the open ones while it runs; closes the
        longest idle one if that makes them more than limit."""
        task = asyncio.current_task()
        assert task is not None
        self._open[task] = None
        while len(self._open) > self.limit:
            idlest = next(iter(self._open))
            del self._open[idlest]  # no longer counted; it ends as the cancel lands
            self._evicted.add(idlest)
            idlest.cancel()
            self.on_evicted()
        try:
            yield
        except asyncio.CancelledError:
            if task not in self._evicted:
                raise
            raise ResourceExhausted(
                f"{self.limit} calls were open on this server (max_streams): this one, idle the "
                "longest, was closed to make room; open a new one to go on",
                limit="max_streams",
            ) from None
        finally:
            self._open.pop(task, None)
            self._evicted.discard(task)
            if not self._open:
                self.idle.set()

    def touch(self, task: asyncio.Task[Any]) -> None:
        """The call just had a message: the last to be closed for room."""
        if task in self._open:
            self._open.move_to_end(task)
