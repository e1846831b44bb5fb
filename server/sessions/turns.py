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
from types import TracebackType


class Turns:
    """Every method runs on the event loop's thread."""

    def __init__(self) -> None:
        # key -> the callers waiting for it (an empty deque: held, nobody waiting)
        self._held: dict[str, deque[asyncio.Future[None]]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def __call__(self, key: str) -> Turn:
        return Turn(self, key)

    async def acquire(self, key: str) -> None:
        waiting = self._held.get(key)
        if waiting is None:
            self._held[key] = deque()
            return
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


class Turn:
    """``async with turns(key):`` holds key's turn for the block."""

    __slots__ = ("key", "turns")

    def __init__(self, turns: Turns, key: str) -> None:
        self.turns, self.key = turns, key

    async def __aenter__(self) -> None:
        await self.turns.acquire(self.key)

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.turns.release(self.key)
