"""Whether the session store can serve calls: health (``grpc.health.v1``) follows it.

Reachable is not enough. A Redis over its ``maxmemory`` with ``noeviction`` (or a
read-only replica, or one refusing writes after a failed save) still answers PING,
while every session call fails UNAVAILABLE because each one writes: health stayed
SERVING and a load balancer kept sending traffic to a replica that could serve none
of it. So a shared store is also asked to take a write, a key of its own that expires
by itself; once writes succeed again, health comes back. The write is as big as a big
session's: Redis counts a command's own bytes when it checks ``maxmemory``, and a
store just under its limit took a 100-byte write while refusing every session write
(a few KiB: state, prediction and rewind trail).
"""

from __future__ import annotations

import secrets
from typing import Any, cast

import redis.asyncio as aioredis
from nextchar.server.blobs import TIMEOUT
from nextchar.server.sessions.store import SessionStore
from redis.exceptions import RedisError

PROBE_TTL_MS = 10_000  # the probe key outlives a few checks, and leaves nothing behind for long
# bytes of the probe's value: more than a session write of the shipped models (~7 KiB at H=256)
# or of a 1,024-unit one, so a store that refuses sessions for want of memory refuses the probe
PROBE = b"\0" * (64 * 1024)


class StoreHealth:
    """check() says why the store cannot serve calls now, or "" when it can.

    url: the shared store's (``config.store``), whose writes are probed; "" for a store in
    this process's memory, which is as writable as the process. The probe's key is this
    process's own (``nextchar:health:<random>``): replicas listening on 0.0.0.0:50051 on
    different hosts share an address.
    """

    def __init__(self, store: SessionStore, url: str) -> None:
        self.store = store
        self.key = f"nextchar:health:{secrets.token_hex(8)}"
        self.redis = (
            aioredis.Redis.from_url(url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
            if url
            else None
        )

    async def check(self) -> str:
        if not await self.store.ping():
            return "is unreachable"
        if self.redis is None:
            return ""
        try:
            await cast(Any, self.redis.set(self.key, PROBE, px=PROBE_TTL_MS))
        except RedisError as exc:
            return f"refuses writes ({exc})"
        return ""

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
