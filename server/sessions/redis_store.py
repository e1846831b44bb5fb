"""RedisSessionStore: sessions in one Redis, shared by several replicas, so any replica serves any session.

``nextchar serve --store redis://HOST:PORT/DB`` on every replica (docs/deploy.md).
Layout, all keys under ``nextchar:``::

    s:{id}     hash    v (version), model, mv (its model version), created, used (ms),
                       snap (the session's value: a SessionSnapshot, snapshot.py's codec, the
                       rewind trail included), by (the replica that last advanced it);
                       an adaptive session's adapter deltas apart, dl (its adapter's) and bdl
                       (the one at its trail's start), written only when they changed (once
                       per adaptation step: the rest of the value changes every message);
                       PEXPIRE = idle timeout, capped by what is left of the lifetime, renewed on use
    created    zset    id -> created ms: ListSessions pages, the cap (ZCARD)
    deadline   zset    id -> expiry ms: the sweeper finds expired ids here and tells idle from lifetime
    gone:{id}  string  why a session ended (idle, lifetime, closed, evicted), for an hour
    clock      counter every version is drawn from it, so a re-created id never reuses one

Ordering: a replica keeps its hot sessions in memory and computes from them, but
a reply leaves only after the COMMIT script (EVALSHA) accepted the change: it
compares the hash's version with the one the replica computed from, and bumps it.
A mismatch means another replica advanced the session: this replica reloads and
computes the change again (StaleSession), so two replicas never both advance one
session and no prediction is computed from an outdated state. The commits asked for
in one turn of the event loop (a batch's sessions, answered together) share one
pipelined round trip. The version is bumped on every message; the value
itself is written when ``write_every`` characters have accumulated (1 = every
message; docs/deploy.md says what a crash loses in each mode).

Redis unreachable: every call fails fast (2 s timeouts, no retries: a retried
write could land twice) with UNAVAILABLE naming the store; the connection pool
reconnects on the next call, so nothing needs a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from nextchar.server.catalog import Catalog
from nextchar.server.errors import FailedPrecondition, ServiceError, Unavailable, shown
from nextchar.server.registry import ModelVersion
from nextchar.server.sessions import snapshot
from nextchar.server.sessions.session import Session
from nextchar.server.sessions.store import (
    StaleSession,
    evicted_reason,
    expiry_reason,
    full,
    gone,
    idle_reason,
    lifetime_reason,
    replaced,
    taken,
)
from nextchar.server.sessions.value import SessionValue
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

PREFIX = "nextchar:"
CREATED, DEADLINE, CLOCK = PREFIX + "created", PREFIX + "deadline", PREFIX + "clock"
TOMBSTONE_MS = 3_600_000  # how long the reason a session ended is remembered
TIMEOUT = 2.0  # seconds a Redis call may take before the client is told UNAVAILABLE
SCAN = 1000  # ids per round trip when listing, sweeping or evicting

_TOUCH = """
local function touch(key, id, created, now, idle, life)
  local t = idle
  if life > 0 then t = math.min(t, created + life - now) end
  t = math.max(t, 1)
  redis.call('PEXPIRE', key, t)
  redis.call('ZADD', KEYS[2], now + t, id)
end
"""

# KEYS: s:{id}, deadline, created, gone:{id}, clock; ARGV: id, cap, idle, life, now, evict idle (ms),
# eviction reason, tombstone ms, key prefix, field, value, ... Returns {version} ({0}: the id is taken,
# {-2}: the cap is reached and no session has been idle long enough), or {version, the id evicted
# to make room}. The session idle the longest is the one whose deadline comes first.
CREATE = (
    _TOUCH
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {0} end
local now = tonumber(ARGV[5])
local evicted = nil
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[2]) then
  local idlest = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if not idlest then return {-2} end
  local ikey = ARGV[9] .. 's:' .. idlest
  local used = tonumber(redis.call('HGET', ikey, 'used') or '0')
  if now - used < tonumber(ARGV[6]) then return {-2} end
  redis.call('DEL', ikey)
  redis.call('ZREM', KEYS[2], idlest)
  redis.call('ZREM', KEYS[3], idlest)
  redis.call('SET', ARGV[9] .. 'gone:' .. idlest, ARGV[7], 'PX', ARGV[8])
  evicted = idlest
end
local v = redis.call('INCR', KEYS[5])
redis.call('HSET', KEYS[1], 'v', v, 'created', now, 'used', now, unpack(ARGV, 10))
touch(KEYS[1], ARGV[1], now, now, tonumber(ARGV[3]), tonumber(ARGV[4]))
redis.call('ZADD', KEYS[3], now, ARGV[1])
redis.call('DEL', KEYS[4])
if evicted then return {v, evicted} end
return {v}
"""
)

# KEYS: s:{id}, deadline, clock; ARGV: id, expected version, idle, life, now, field, value, ...
# Returns the new version, 0 when another replica advanced the session, -1 when it is gone.
COMMIT = (
    _TOUCH
    + """
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return -1 end
if v ~= ARGV[2] then return 0 end
v = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], 'v', v, 'used', ARGV[5], unpack(ARGV, 6))
local created = tonumber(redis.call('HGET', KEYS[1], 'created'))
touch(KEYS[1], ARGV[1], created, tonumber(ARGV[5]), tonumber(ARGV[3]), tonumber(ARGV[4]))
return v
"""
)

# KEYS: s:{id}, deadline; ARGV: id, idle, life, now. The hash (empty when gone), its TTL renewed.
LOAD = (
    _TOUCH
    + """
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return h end
redis.call('HSET', KEYS[1], 'used', ARGV[4])
local created = tonumber(redis.call('HGET', KEYS[1], 'created'))
touch(KEYS[1], ARGV[1], created, tonumber(ARGV[4]), tonumber(ARGV[2]), tonumber(ARGV[3]))
return h
"""
)

# KEYS: s:{id}, deadline, created, gone:{id}; ARGV: id, reason, tombstone ms, force.
# A session already gone is left to the caller, unless force (Redis expired it: record why).
REMOVE = """
local n = redis.call('DEL', KEYS[1])
if n == 0 and ARGV[4] ~= '1' then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('SET', KEYS[4], ARGV[2], 'PX', ARGV[3])
return n
"""


class Script:
    """A Lua script run by EVALSHA, loaded again when Redis lost its script cache (a restart)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


CREATE_S, COMMIT_S, LOAD_S, REMOVE_S = Script(CREATE), Script(COMMIT), Script(LOAD), Script(REMOVE)


def display_url(url: str) -> str:
    """The store's URL without credentials, for error messages and logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"


def now_ms() -> int:
    return int(time.time() * 1000)


def key(session_id: str) -> str:
    return f"{PREFIX}s:{session_id}"


def tombstone(session_id: str) -> str:
    return f"{PREFIX}gone:{session_id}"


@dataclass(slots=True, eq=False)
class Stored:
    """Where one session object this replica handed out stands against the stored copy."""

    version: int  # the stored copy's version this object's value is; -1 = unknown (re-read first)
    dirty: int = 0  # characters consumed since the value was last written
    deltas: object = None  # the adapter deltas (a tuple, by identity) the stored copy holds
    base_deltas: object = None  # and the trail's base adapter's


class RedisSessionStore:
    """The SessionStore protocol on Redis, with this replica's hot sessions kept in memory."""

    def __init__(
        self,
        url: str,
        catalog: Catalog,
        idle_timeout: float,
        lifetime: float = 0.0,
        write_every: int = 1,
        on_remove: Callable[[str, str], None] | None = None,
        on_round_trip: Callable[[float], None] | None = None,
        replica: Callable[[], str] = lambda: "",
        rewind_chars: int = 0,
        evict_idle: float = 60.0,
    ) -> None:
        self.url = display_url(url)
        self.redis = aioredis.Redis.from_url(
            url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, retry=Retry(NoBackoff(), 0)
        )
        self.catalog = catalog
        self.idle_timeout, self.lifetime = idle_timeout, lifetime
        self.idle_ms, self.life_ms = int(idle_timeout * 1000), int(lifetime * 1000)
        self.write_every = write_every  # characters between state writes; the version moves every message
        self.on_remove = on_remove
        self.on_round_trip = on_round_trip  # seconds of each Redis round trip (the store_rtt metric)
        self.replica = (
            replica  # host:port, recorded in "by" with each write (which replica advanced a session)
        )
        self.rewind_chars = rewind_chars  # the trail each session keeps (nextchar.server.sessions.trail)
        self.evict_idle = evict_idle  # seconds idle before a session may make room at the cap
        self.evict_ms = int(evict_idle * 1000)
        self._hot: dict[str, Session] = {}  # this replica's sessions in memory, by id
        # every session object read from or added to the store, for as long as it lives, with
        # the stored version its value is
        self._stored: weakref.WeakKeyDictionary[Session, Stored] = weakref.WeakKeyDictionary()
        self.conflicts = 0  # changes refused because another replica had advanced the session
        self._commits: list[tuple[list[Any], asyncio.Future[Any]]] = []  # for the next round trip
        self._commits_asked = asyncio.Event()  # set when _commits has some
        self._sender: asyncio.Task[None] | None = None  # _send_commits, from the first commit on
        self._closing = False

    # ------------------------------------------------------------ Redis calls

    @contextlib.asynccontextmanager
    async def _reaching(self) -> AsyncIterator[None]:
        """Every round trip goes through here: timed, and a Redis failure becomes UNAVAILABLE."""
        start = time.perf_counter()
        try:
            yield
        except RedisError as exc:
            raise Unavailable(f"session store {self.url} unavailable: {exc}; retry shortly") from None
        finally:
            if self.on_round_trip is not None:
                self.on_round_trip(time.perf_counter() - start)

    async def _eval(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        async with self._reaching():
            try:
                return await cast(Any, self.redis.evalsha(script.sha, len(keys), *keys, *args))
            except NoScriptError:  # Redis restarted and lost its script cache
                await cast(Any, self.redis.script_load(script.source))
                return await cast(Any, self.redis.evalsha(script.sha, len(keys), *keys, *args))

    async def _load_script(self, script: Script) -> None:
        async with self._reaching():
            await cast(Any, self.redis.script_load(script.source))

    async def _pipeline(self, calls: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
        """One round trip for many commands; errors come back in place, not raised."""
        async with self._reaching():
            pipe = self.redis.pipeline(transaction=False)
            for command, args in calls:
                pipe.execute_command(command, *args)
            return await pipe.execute(raise_on_error=False)

    def __str__(self) -> str:
        return self.url

    async def ping(self) -> bool:
        try:
            return bool(await cast(Any, self.redis.ping()))
        except RedisError:
            return False

    async def close(self) -> None:
        """Write back the sessions not written yet (write_every > 1), then disconnect."""
        with contextlib.suppress(ServiceError):
            await self._flush(list(self._hot.values()))
        self._closing = True
        if self._sender is not None:
            self._commits_asked.set()
            await asyncio.gather(self._sender, return_exceptions=True)  # the commits asked are sent
        await self.redis.aclose()

    # ------------------------------------------------------------ sessions from and to hashes

    def _fields(self, session: Session, value: SessionValue, stored: Stored) -> list[Any]:
        """The hash fields that write value (and the deltas the stored copy lacks) over stored."""
        fields = ["snap", snapshot.encode(session.model, value, deltas_apart=True), "by", self.replica()]
        adapter, base = value.adapter, value.base
        if adapter is not None and adapter.deltas is not stored.deltas:
            fields += ["dl", snapshot.encode_deltas(adapter)]
        if base is not None and value.trail.marks and base.deltas is not stored.base_deltas:
            fields += ["bdl", snapshot.encode_deltas(base)]
        return fields

    @staticmethod
    def _written(stored: Stored, value: SessionValue) -> None:
        """The stored copy holds value's deltas now."""
        stored.deltas = value.adapter.deltas if value.adapter is not None else None
        stored.base_deltas = value.base.deltas if value.base is not None else None

    async def _decode(self, session_id: str, h: dict[bytes, bytes]) -> tuple[ModelVersion, SessionValue]:
        try:
            snap = snapshot.parse(h[b"snap"])
        except (KeyError, snapshot.SnapshotMismatch) as exc:
            raise FailedPrecondition(
                f"session {shown(session_id)}: the stored copy is not one this server reads ({exc}); "
                "give every replica the same nextchar version"
            ) from None
        mv = await self.catalog.resolve(snap.model.name, snap.model.version)
        if not snapshot.same_model(mv, snap.model_checksum):
            raise FailedPrecondition(
                f"session {shown(session_id)}: model {mv.name} v{mv.version} on this replica differs from the one "
                "the session was created with; give every replica the same model files"
            )
        net = await self.catalog.network(mv)
        try:
            value = snapshot.stored(
                net, mv.adapt_rule(net), snap, self.rewind_chars, h.get(b"dl"), h.get(b"bdl")
            )
            return mv, value
        except snapshot.SnapshotMismatch as exc:
            raise FailedPrecondition(
                f"session {shown(session_id)}: the stored state does not fit its model: {exc}"
            ) from None

    async def _adopt(self, session: Session, stored: Stored, h: dict[bytes, bytes]) -> None:
        """Take the stored copy: the model, value and version change together, never apart."""
        session.model, session.value = await self._decode(session.id, h)
        session.created = int(h[b"created"]) / 1000
        stored.version, stored.dirty = int(h[b"v"]), 0
        self._written(stored, session.value)

    async def _session(self, session_id: str, h: dict[bytes, bytes]) -> Session:
        session = Session(session_id, *await self._decode(session_id, h))
        session.created = int(h[b"created"]) / 1000
        return session

    async def _load(self, session_id: str) -> dict[bytes, bytes] | None:
        flat = await self._eval(
            LOAD_S, [key(session_id), DEADLINE], [session_id, self.idle_ms, self.life_ms, now_ms()]
        )
        return dict(zip(flat[::2], flat[1::2], strict=True)) if flat else None

    def _expiry_reason(self, created: float, deadline: float | None) -> str:
        """Redis expired the hash: its last TTL ran to the end of the lifetime, or it idled out."""
        if self.life_ms and deadline is not None and deadline >= created + self.life_ms:
            return lifetime_reason(self.lifetime)
        return idle_reason(self.idle_timeout)

    async def _gone(self, session_id: str) -> ServiceError:
        """Why session_id is not in Redis: a tombstone, else an expiry nobody has recorded yet."""
        self._hot.pop(session_id, None)
        reason, created, deadline = await self._pipeline(
            [
                ("GET", [tombstone(session_id)]),
                ("ZSCORE", [CREATED, session_id]),
                ("ZSCORE", [DEADLINE, session_id]),
            ]
        )
        if reason is not None:
            return gone(session_id, reason.decode())
        if created is None:
            return gone(session_id, None)
        why = self._expiry_reason(float(created), None if deadline is None else float(deadline))
        await self._remove(session_id, why, force=True)
        return gone(session_id, why)

    async def _remove(self, session_id: str, reason: str, *, force: bool = False) -> bool:
        n = await self._eval(
            REMOVE_S,
            [key(session_id), DEADLINE, CREATED, tombstone(session_id)],
            [session_id, reason, TOMBSTONE_MS, "1" if force else "0"],
        )
        if (n or force) and self.on_remove is not None:
            self.on_remove(session_id, reason)
        return bool(n)

    # ------------------------------------------------------------ the SessionStore protocol

    def resident(self, session_id: str) -> Session | None:
        session = self._hot.get(session_id)
        now = time.time()
        if session is None or expiry_reason(session, now, self.idle_timeout, self.lifetime):
            return None
        session.last_used = now  # (as touch)
        return session  # the commit after the next change checks it is still current

    def commit_now(
        self, session: Session, expected: SessionValue, new: SessionValue, *, full: bool = False
    ) -> bool:
        return False  # every change goes through the COMMIT script

    async def get(self, session_id: str, *, fresh: bool = False) -> Session:
        session = self._hot.get(session_id)
        if session is not None and not fresh:
            why = expiry_reason(session, time.time(), self.idle_timeout, self.lifetime)
            if why is None:
                return session  # the commit after the next change checks it is still current
            if why == lifetime_reason(self.lifetime):  # idle here: other replicas may have used it
                await self.remove(session_id, why)
                raise gone(session_id, why)
        if session is None:
            h = await self._load(session_id)
            if h is None:
                raise await self._gone(session_id)
            loaded = await self._session(session_id, h)
            session = self._hot.get(session_id)  # a concurrent call may have loaded it meanwhile
            if session is None:
                session = self._hot[session_id] = loaded
                self._stored[session] = stored = Stored(int(h[b"v"]))
                self._written(stored, session.value)
            return session
        await self.refresh(session)
        return session

    async def add(self, session: Session, cap: int) -> None:
        stored = Stored(0)
        fields = [
            "model",
            session.model.name,
            "mv",
            session.model.version,
            *self._fields(session, session.value, stored),
        ]
        now, reason = now_ms(), evicted_reason(cap)
        created = await self._eval(
            CREATE_S,
            [key(session.id), DEADLINE, CREATED, tombstone(session.id), CLOCK],
            [
                session.id,
                cap,
                self.idle_ms,
                self.life_ms,
                now,
                self.evict_ms,
                reason,
                TOMBSTONE_MS,
                PREFIX,
                *fields,
            ],
        )
        v = int(created[0])
        if v == 0:
            raise taken(session.id)
        if v < 0:
            raise full(cap, self.evict_idle)
        if len(created) > 1:  # made room: the idlest session is gone, here too
            evicted = created[1].decode()
            self._hot.pop(evicted, None)
            if self.on_remove is not None:
                self.on_remove(evicted, reason)
        session.created = session.last_used = now / 1000
        self._hot[session.id] = session
        stored.version = v
        self._written(stored, session.value)
        self._stored[session] = stored

    async def remove(self, session_id: str, reason: str) -> None:
        # not loaded first: a session of a model version just deleted could not be
        self._hot.pop(session_id, None)  # changes computing for it are refused at their commit
        if not await self._remove(session_id, reason):
            raise await self._gone(session_id)

    async def refresh(self, session: Session) -> None:
        """Adopt the stored copy into session if another replica moved it on."""
        stored = self._stored.get(session)
        if stored is None:  # a copy made for a listing: nothing to adopt into
            return
        h = await self._load(session.id)
        if h is None:
            raise await self._gone(session.id)
        if int(h[b"v"]) != stored.version:  # equal: this copy is current, maybe ahead (dirty)
            await self._adopt(session, stored, h)

    async def page(self, start: int, size: int) -> list[Session]:
        async with self._reaching():
            ids = [i.decode() for i in await cast(Any, self.redis.zrange(CREATED, start, start + size - 1))]
        hashes = await self._pipeline([("HGETALL", [key(i)]) for i in ids])
        out = []
        for session_id, h in zip(ids, hashes, strict=True):
            if isinstance(h, Exception) or not h:
                continue  # expired since the index was read
            with contextlib.suppress(ServiceError):  # a model this replica lacks: list the rest
                session = await self._session(session_id, h)
                session.last_used = int(h[b"used"]) / 1000
                out.append(session)
        return out

    async def count(self) -> int:
        async with self._reaching():
            return int(await cast(Any, self.redis.zcard(CREATED)))

    async def of_model(self, model: ModelVersion) -> list[str]:
        out: list[str] = []
        start = 0
        while True:
            async with self._reaching():
                ids = [
                    i.decode() for i in await cast(Any, self.redis.zrange(CREATED, start, start + SCAN - 1))
                ]
            refs = await self._pipeline([("HMGET", [key(i), "model", "mv"]) for i in ids])
            want = [model.name.encode(), str(model.version).encode()]
            out += [i for i, ref in zip(ids, refs, strict=True) if ref == want]
            if len(ids) < SCAN:
                return out
            start += SCAN

    async def sweep(self, now: float) -> int:
        """Forget hot copies idle here (their state is in Redis), and record why Redis expired sessions."""
        idle = [s for s in self._hot.values() if now - s.last_used > self.idle_timeout]
        await self._flush(idle)
        for session in idle:
            self._hot.pop(session.id, None)
        async with self._reaching():
            due = await cast(
                Any,
                self.redis.zrangebyscore(
                    DEADLINE, "-inf", int(now * 1000), start=0, num=SCAN, withscores=True
                ),
            )
        ids = [i.decode() for i, _ in due]
        checks = await self._pipeline(
            [c for i in ids for c in (("EXISTS", [key(i)]), ("ZSCORE", [CREATED, i]))]
        )
        swept = 0
        for (session_id, deadline), exists, created in zip(due, checks[::2], checks[1::2], strict=True):
            if exists == 0 and not isinstance(created, Exception):
                created_ms = float(created) if created is not None else 0.0
                await self._remove(session_id.decode(), self._expiry_reason(created_ms, deadline), force=True)
                swept += 1
        return swept

    def touch(self, session: Session) -> None:
        """Used now (in this replica's memory; Redis hears it with the next change)."""
        session.last_used = time.time()

    def contains(self, session_id: str) -> bool:
        return session_id in self._hot

    def __len__(self) -> int:
        return len(self._hot)

    def held(self) -> Iterable[Session]:
        return self._hot.values()

    def adaptive_held(self) -> int:
        """Counted when asked (an adaptive session's creation, a scrape): the hot sessions change
        in too many places (loads, sweeps, other replicas' removals) to keep a count in step."""
        return sum(1 for s in self._hot.values() if s.value.adapter is not None)

    # ------------------------------------------------------------ changes

    async def commit(
        self, session: Session, expected: SessionValue, new: SessionValue, *, full: bool = False
    ) -> None:
        """Swap new in if the stored copy is still at the version expected is: written with the
        version when full or write_every characters have accumulated, else only the version
        moves (which is what orders the replicas)."""
        stored = self._stored.get(session)
        if stored is None or self._hot.get(session.id) is not session:
            raise replaced(session.id)
        if session.value is not expected:
            raise StaleSession(f"session {shown(session.id)} changed while the request computed")
        chars = max(0, new.offset - expected.offset)
        write = full or stored.dirty + chars >= self.write_every
        args = [session.id, stored.version, self.idle_ms, self.life_ms, now_ms()]
        args += self._fields(session, new, stored) if write else ["by", self.replica()]
        try:
            r = await self._commit_call([key(session.id), DEADLINE, CLOCK], args)
        except Unavailable:
            stored.version = -1  # the write may have landed: re-read before the next change
            raise
        if isinstance(r, Exception):
            stored.version = -1
            raise Unavailable(f"session store {self.url}: {r}")
        if r == 0:
            self.conflicts += 1
            raise StaleSession(f"session {shown(session.id)} was advanced by another replica")
        if r < 0:
            raise await self._gone(session.id)
        stored.version, stored.dirty = int(r), 0 if write else stored.dirty + chars
        if write:
            self._written(stored, new)
        session.value = new

    async def _commit_call(self, keys: list[str], args: list[Any]) -> Any:
        """The COMMIT script's answer for one change (a Redis error comes back as the value). The
        changes asked for in one turn of the event loop (a batch's sessions, answered together)
        share one round trip, and their replies leave together: a batch's streams come back
        together and the next batch is as wide (sending the turn's first change at once let its
        stream run ahead of the rest and cut the next batches narrower)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._commits.append((["EVALSHA", COMMIT_S.sha, len(keys), *keys, *args], future))
        if self._sender is None or self._sender.done():
            self._sender = loop.create_task(self._send_commits())
        self._commits_asked.set()
        return await future

    async def _send_commits(self) -> None:
        """The store's one sender of commits, from its first commit to its close: wakes on the
        loop turn after a commit is asked (so that turn's other commits go along) and sends
        every commit asked since its last round trip in one more. One long-lived task, not one
        per round trip: that cost each message four more loop callbacks (a task made, stepped,
        woken and discarded). A round trip asked for while one is out waits for it (Redis runs
        them one after the other anyway)."""
        while not (self._closing and not self._commits):
            await self._commits_asked.wait()
            self._commits_asked.clear()
            calls, self._commits = self._commits, []
            try:
                await self._run_commits(calls)
            finally:  # cancelled (the loop ending): no caller waits for ever
                for _, future in calls:
                    if not future.done():
                        future.set_exception(Unavailable(f"session store {self.url}: closed"))

    async def _run_commits(self, calls: list[tuple[list[Any], asyncio.Future[Any]]]) -> None:
        pipeline = [(command[0], command[1:]) for command, _ in calls]
        try:
            results = await self._pipeline(pipeline)
            if any(isinstance(r, NoScriptError) for r in results):  # Redis restarted: nothing ran
                await self._load_script(COMMIT_S)
                results = await self._pipeline(pipeline)
        except Exception as exc:  # Unavailable: every change of this round trip hears it
            for _, future in calls:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), r in zip(calls, results, strict=True):
            if not future.done():
                future.set_result(r)

    async def _flush(self, sessions: Sequence[Session]) -> None:
        """Write the values of sessions that advanced since their last write (write_every > 1), in
        one round trip; a session another replica moved on meanwhile keeps that replica's."""
        dirty = [s for s in sessions if (stored := self._stored.get(s)) is not None and stored.dirty]
        outcomes = await asyncio.gather(
            *(self.commit(s, s.value, s.value, full=True) for s in dirty), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, Unavailable):
                raise outcome
