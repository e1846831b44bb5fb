"""The calls clients hold open (streams, uploads, WebSockets), and the bound on how many.

Each open call holds memory of the server (about 14 KB for an idle PredictStream), so
their number is bounded by ``limit``. Past it, a call is closed to make room for the
new one: its handler is cancelled, and the cancel reaches it as ResourceExhausted,
which its method answers like any refusal. Refusing the new call instead would let a
client that holds idle calls lock every other client out; this way an idle holder
loses its oldest call, and a call that keeps sending (``touch``) is closed after
every idle one of its connection.

The call closed is the longest idle **of the connection holding the most calls**
(ties: the connection whose idlest call is the oldest). Closing the longest idle call
of all was unfair under a flood: a client opening calls faster than the server reads
their first messages (20,000 streams that never send, on 4 connections) made every
call of a well-behaved client that arrived meanwhile, its first message still unread,
older than the flood's newest, and closed it (``make bench-abuse``: all 100 fresh
streams of a well-behaved client closed). A connection is the client as this server
can tell it (``client``: the gRPC peer, or the WebSocket's address and port, set for
the call with ``calls_client``); a call with none is a connection of its own.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

from nextchar.server.errors import ResourceExhausted

# the connection the running call came on (set by the protocol's edge before the call's method runs)
calls_client: contextvars.ContextVar[str] = contextvars.ContextVar("calls_client", default="")
_unknown = itertools.count()  # calls whose client is unknown: each a connection of its own


class OpenCalls:
    """The open calls, by connection, each connection's the longest idle first; every method
    runs on the event loop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.on_evicted: Callable[[], None] = lambda: None  # a call closed for room (metrics)
        self.idle = asyncio.Event()  # set whenever the last open call ends (the drain waits for it)
        # connection -> its calls, the longest idle first, each with the tick of its last activity
        self._clients: dict[str, collections.OrderedDict[asyncio.Task[Any], int]] = {}
        self._client_of: dict[asyncio.Task[Any], str] = {}
        self._tick = itertools.count()
        self._evicted: set[asyncio.Task[Any]] = set()  # cancelled for room, not by their client

    def __len__(self) -> int:
        return len(self._client_of)

    def _remove(self, task: asyncio.Task[Any]) -> None:
        client = self._client_of.pop(task, None)
        if client is None:
            return
        calls = self._clients[client]
        calls.pop(task, None)
        if not calls:
            del self._clients[client]

    def _idlest(self) -> asyncio.Task[Any]:
        """The call to close: the longest idle of the connection holding the most calls."""
        calls = max(self._clients.values(), key=lambda c: (len(c), -next(iter(c.values()))))
        return next(iter(calls))

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Count the running call (the current task) among the open ones while it runs; closes
        one (see the module's docstring) if that makes them more than limit."""
        task = asyncio.current_task()
        assert task is not None
        client = calls_client.get() or f"?{next(_unknown)}"
        self._client_of[task] = client
        self._clients.setdefault(client, collections.OrderedDict())[task] = next(self._tick)
        while len(self._client_of) > self.limit:
            idlest = self._idlest()
            self._remove(idlest)  # no longer counted; it ends as the cancel lands
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
                "longest on the connection holding the most, was closed to make room; open a new "
                "one to go on",
                limit="max_streams",
            ) from None
        finally:
            self._remove(task)
            self._evicted.discard(task)
            if not self._client_of:
                self.idle.set()

    def touch(self, task: asyncio.Task[Any]) -> None:
        """The call just had a message: the last of its connection's to be closed for room."""
        client = self._client_of.get(task)
        if client is not None:
            calls = self._clients[client]
            calls[task] = next(self._tick)
            calls.move_to_end(task)
