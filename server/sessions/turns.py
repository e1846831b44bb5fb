"""Turns: one change at a time per session, in the order they were asked for.

A change reads the session's value, computes from it, and commits the result
(nextchar.server.sessions.manager). Two changes of one session computed at once
would both start from the same value and one would lose the compare-and-swap, so
each change waits for its turn: a client's chunks sent on two calls at once are
applied one after the other, in arrival order, each from the value the one
before left. Sessions nobody is changing cost nothing here.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Turns:
    """Every method runs on the event loop's thread: ``take`` (or ``await acquire``), then
    ``release`` in a finally."""

    def __init__(self) -> None:
        # key -> the callers waiting for it (an empty deque: held, nobody waiting)
        self._held: dict[str, deque[asyncio.Future[None]]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def take(self, key: str) -> bool:
        """Take key's turn if nobody holds it (no await: the usual case); False if it is held."""
        if key in self._held:
            return False
        self._held[key] = deque()
        return True

    async def acquire(self, key: str) -> None:
        if self.take(key):
            return
        waiting = self._held[key]
        future = asyncio.get_running_loop().create_future()
        waiting.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # handed the turn as it was cancelled
                self.release(key)
            raise

    def release(self, key: str) -> None:
        waiting = self._held[key]
        while waiting:
            future = waiting.popleft()
            if not future.done():
                future.set_result(None)  # the turn passes on, still held
                return
        del self._held[key]
