"""Server logging: text or JSON lines on stderr, every record tagged with its session id.

Each gRPC call runs in its own asyncio task, so a ``ContextVar`` set where a call
resolves its session (``bind_session``) tags every record that call logs, without
passing the id down through every function. A record given
``extra={"session_id": ...}`` keeps that id (session expiry happens outside any
call). JSON lines are for log shippers (Loki, Elasticsearch, CloudWatch): one
object per line, keys ``time``, ``level``, ``logger``, ``message`` and, where there
is one, ``session_id``.

What clients cause (refused calls, wrong tokens, internal errors) is logged through a
``FloodGate``: a client that sends thousands of bad requests a second must not turn
each into a log line, filling the disk and taking the loop's time from everyone else.
gRPC's own Python layer gets a gate too: it logs an ERROR with a traceback for every
header value that is not UTF-8, before any call reaches our token check, so one
unauthenticated client sending such headers over raw HTTP/2 wrote 10 MB of log in 15 s.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

SESSION_ID: ContextVar[str] = ContextVar("nextchar_session_id", default="")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def bind_session(session_id: str) -> None:
    """Tag the rest of the current call's log records with session_id."""
    SESSION_ID.set(session_id)


class SessionIdFilter(logging.Filter):
    """Gives every record a ``session_id`` attribute: its own ``extra``, else the call's, else ""."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "session_id", ""):
            record.session_id = SESSION_ID.get()
        return True


class TextFormatter(logging.Formatter):
    """The classic one-line format, with ``session=<id>`` appended when there is one."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        session_id = getattr(record, "session_id", "")
        return f"{line} session={session_id}" if session_id else line


class JsonFormatter(logging.Formatter):
    """One JSON object per record; a traceback, if any, goes in ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        session_id = getattr(record, "session_id", "")
        if session_id:
            out["session_id"] = session_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


@dataclass
class _Bucket:
    tokens: float
    at: float  # when tokens was last refilled
    dropped: int = 0
    since: float = 0.0  # when the first record not logged was dropped


class FloodGate(logging.Filter):
    """Passes at most ``burst`` records of one kind at once, then ``rate`` a second; counts the rest.

    It gates the records of one logger (and its children: ``logging.Filter``'s name rule).
    A kind is a record's message template (``record.msg``), so a flood of one refusal
    does not silence another. The next record of a kind that passes says how many like
    it were not logged, and ``flush`` (the server's sweep calls it) reports the kinds
    whose floods ended with records still untold.
    """

    def __init__(
        self, logger: str, rate: float = 2.0, burst: int = 50, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(logger)  # passes any other logger's records untouched
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()  # records may come from any thread

    def filter(self, record: logging.LogRecord) -> bool:
        if not super().filter(record):
            return True
        now = self.clock()
        with self._lock:
            bucket = self._buckets.setdefault(str(record.msg), _Bucket(float(self.burst), now))
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
            if bucket.tokens < 1.0:
                if not bucket.dropped:
                    bucket.since = now
                bucket.dropped += 1
                return False
            bucket.tokens -= 1.0
            dropped, bucket.dropped = bucket.dropped, 0
        if dropped:
            record.msg = f"{record.msg} (and {dropped} more like it not logged)"
        return True

    def flush(self, logger: logging.Logger) -> None:
        """Log, for every kind with records not logged since its last line, how many and since when."""
        now = self.clock()
        with self._lock:
            untold = [(msg, b.dropped, now - b.since) for msg, b in self._buckets.items() if b.dropped]
            for msg, _, _ in untold:
                self._buckets[msg].dropped = 0
        for msg, dropped, seconds in untold:
            logger.warning("%d log lines like %r were not logged in the last %.0f s", dropped, msg, seconds)


CALLS_LOGGER = "nextchar.server.calls"  # what clients cause: refusals, wrong tokens, internal errors
# in the handler of a process that configure_logging set up: our calls' records, gRPC's
# (its "Invalid encoding on %s" per header that is not UTF-8, among others), and aiohttp's
# (the HTTP API's: a malformed request line or WebSocket frame logs one per connection)
GATES = (FloodGate(CALLS_LOGGER), FloodGate("grpc"), FloodGate("aiohttp"))


def flush_gates(logger: logging.Logger) -> None:
    """Tell, through logger, how many lines each gate's floods left untold (the server's sweep)."""
    for gate in GATES:
        gate.flush(logger)


def log_handler(fmt: str, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing to stream (stderr) in fmt ("text" or "json"), tagging records with their session id."""
    handler = logging.StreamHandler(stream)
    for gate in GATES:
        handler.addFilter(gate)
    handler.addFilter(SessionIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    return handler


def configure_logging(fmt: str = "text", level: str = "info") -> None:
    """Replace the root logger's handlers with one log_handler(fmt) at level (the server process only)."""
    root = logging.getLogger()
    root.handlers[:] = [log_handler(fmt)]
    root.setLevel(level.upper())
