"""Catalog: the model registry as the event loop must see it, with no file or Redis read on the loop.

The registry (nextchar.server.registry) is thread-safe and blocking: resolving a
name it does not know yet rescans its files (a shared registry reads Redis), and a
version whose network was released loads its file again (a read and a SHA-256).
Here both run in a thread, and only when they must: a version already known with
its network held is answered at once. One load per version is in flight at a time;
callers asking meanwhile wait for it.
"""

from __future__ import annotations

import asyncio
import functools

from nextchar.core.model import CharRNN
from nextchar.server.errors import NotFound
from nextchar.server.registry import ModelVersion, Registry


class Catalog:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._loading: dict[ModelVersion, asyncio.Future[CharRNN]] = {}

    async def resolve(self, name: str, version: int, *, need_available: bool = True) -> ModelVersion:
        """name "" = the default model; version 0 = the newest available version of name."""
        try:
            mv = self.registry.lookup(name, version)
        except NotFound:  # maybe written since the last scan: look on disk (or in Redis) in a thread
            resolve = functools.partial(self.registry.resolve, name, version, need_available=False)
            mv = await asyncio.to_thread(resolve)
        if need_available:
            await self.network(mv)
        return mv

    @staticmethod
    def held(mv: ModelVersion) -> CharRNN | None:
        """mv's network if it is held (touched: the idle sweep keeps it), else None: no await
        on the hot path of a message."""
        net = mv.net
        if net is not None:
            mv.touch()
        return net

    async def network(self, mv: ModelVersion) -> CharRNN:
        """mv's network, loaded again in a thread if it was released (FAILED_PRECONDITION when its
        file no longer loads)."""
        net = mv.net
        if net is not None:
            mv.touch()
            return net
        loading = self._loading.get(mv)
        if loading is None:
            loading = asyncio.ensure_future(asyncio.to_thread(mv.require))
            self._loading[mv] = loading
            loading.add_done_callback(lambda _: self._loading.pop(mv, None))
        return await asyncio.shield(loading)
