"""SessionStore: where sessions live, and the rules every store shares (ids, caps, why a session is gone).

Two stores implement the protocol: InMemorySessionStore (this process) and
RedisSessionStore (shared by several replicas). Callers never ask which one they
have: a store that needs nothing for a write-back (the in-memory one) accepts it
at once. Methods are coroutines because a shared store answers over the network;
the in-memory store's never suspend.

Removed ids leave a tombstone, so a late client is told WHY its session is gone
(idle, lifetime, closed, evicted) instead of just "not found".
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from typing import Protocol

from nextchar.server.errors import (
    Aborted,
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    shown,
)
from nextchar.server.registry import ModelVersion
from nextchar.server.sessions.session import Session
from nextchar.server.sessions.value import SessionValue

ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
GONE_REASONS = ("idle", "lifetime", "closed", "evicted")


class StaleSession(Aborted):
    """A store refused a change: the session's value is no longer the one the change was
    computed from (another replica advanced it). The change is computed again from the
    stored copy (SessionManager), or ABORTED."""


def replaced(session_id: str) -> Aborted:
    """The refusal of a change whose session was closed (or expired) while it computed."""
    return Aborted(f"session {shown(session_id)} was reset or closed during the request")


def idle_reason(idle_timeout: float) -> str:
    return f"idle for more than {idle_timeout:g} s"


def lifetime_reason(lifetime: float) -> str:
    return f"lifetime of {lifetime:g} s ended"


def expiry_reason(session: Session, now: float, idle_timeout: float, lifetime: float) -> str | None:
    """Why session has expired by now (idle too long, or past its lifetime), or None."""
    if lifetime and now - session.created > lifetime:
        return lifetime_reason(lifetime)
    if now - session.last_used > idle_timeout:
        return idle_reason(idle_timeout)
    return None


def reason_label(reason: str) -> str:
    """The one-word kind of a removal reason ("idle for more than 60 s" -> "idle")."""
    word = reason.split(maxsplit=1)[0].rstrip(":") if reason else ""
    return word if word in GONE_REASONS else "other"


def gone(session_id: str, reason: str | None) -> NotFound:
    """The NotFound a client gets for a session id: with the reason when one is remembered
    (in words, and as the detail ``reason``: idle, lifetime, closed, evicted or other)."""
    if reason is None:
        return NotFound(f"session {shown(session_id)}: no such session", subject="session")
    return NotFound(
        f"session {shown(session_id)}: expired or gone ({reason})",
        subject="session",
        reason=reason_label(reason),
    )


def check_id(session_id: str) -> str:
    """A session id as the client gave it, refused unless it could name a session."""
    if not session_id:
        raise InvalidArgument("session_id: required")
    if not ID_RE.match(session_id):
        raise InvalidArgument(f"session_id: {shown(session_id)} is not 1-128 characters of [A-Za-z0-9._:-]")
    return session_id


def new_id(requested: str = "") -> str:
    # 128 random bits from the OS: a server-assigned id is the session's only key (docs/api.md)
    return check_id(requested) if requested else secrets.token_hex(16)


def taken(session_id: str) -> AlreadyExists:
    return AlreadyExists(f"session_id: {shown(session_id)} is already in use")


def full(cap: int, evict_idle: float) -> ResourceExhausted:
    """At the cap with no session idle long enough to make room for a new one."""
    return ResourceExhausted(
        f"session cap of {cap} reached and no session has been idle {evict_idle:g} s to make room; "
        "close idle sessions or retry later",
        limit="max_sessions",
    )


def evicted_reason(cap: int) -> str:
    """Why a session was removed to make room for a new one at the cap."""
    return f"evicted: the server was at its session cap ({cap}) and this session was idle the longest"


class SessionStore(Protocol):
    """Where sessions live. Implementations enforce expiry, and the cap in ``add`` (atomically,
    when several replicas share the store): at the cap, the session idle the longest makes room
    for the new one if it has been idle ``evict_idle`` seconds, else the new one is refused. So a
    client that fills the cap with sessions it never uses locks nobody out for longer than
    that: its sessions are the idle ones."""

    # raises NotFound naming the reason; fresh: re-read a shared copy another replica may have advanced
    async def get(self, session_id: str, *, fresh: bool = False) -> Session: ...
    # get's answer, touched, when it needs no round trip (a copy held here, not expired), else
    # None: the hot path of a stream's message asks this first and awaits get only when it must
    def resident(self, session_id: str) -> Session | None: ...
    def touch(self, session: Session) -> None: ...  # used now: the last a new session at the cap evicts
    async def add(self, session: Session, cap: int) -> None: ...  # AlreadyExists, ResourceExhausted
    # NotFound naming the reason; changes computing for it are refused when they commit
    async def remove(self, session_id: str, reason: str) -> None: ...
    # compare-and-swap: make new the session's value if expected still is (a shared store writes
    # it through, the whole value when full, else as write_every says); StaleSession when the value
    # moved on, Aborted when the session was removed, Unavailable when the store cannot be reached
    async def commit(
        self, session: Session, expected: SessionValue, new: SessionValue, *, full: bool = False
    ) -> None: ...
    # commit at once when the store needs no round trip for it (True), raising as commit does;
    # False: nothing was done, await commit
    def commit_now(
        self, session: Session, expected: SessionValue, new: SessionValue, *, full: bool = False
    ) -> bool: ...
    async def refresh(self, session: Session) -> None: ...  # adopt the shared copy if it moved on
    async def page(self, start: int, size: int) -> list[Session]: ...
    async def count(self) -> int: ...  # sessions in the store (all replicas')
    async def of_model(self, model: ModelVersion) -> list[str]: ...  # ids of the sessions on model
    async def sweep(self, now: float) -> int: ...  # remove expired sessions; returns how many
    async def ping(self) -> bool: ...  # reachable (health follows it)
    async def close(self) -> None: ...  # write back what is not written yet
    def contains(self, session_id: str) -> bool: ...  # held in this process's memory
    def __len__(self) -> int: ...  # sessions held in this process's memory
    def held(self) -> Iterable[Session]: ...  # those sessions (a scrape reads their adapters)
    def adaptive_held(self) -> int: ...  # how many of them adapt (max_adaptive_sessions counts these)
