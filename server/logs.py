"""Server logging: text or JSON lines on stderr, every record tagged with its session id.

Each gRPC call runs in its own asyncio task, so a ``ContextVar`` set where a call
resolves its session (``bind_session``) tags every record that call logs, without
passing the id down through every function. A record given
``extra={"session_id": ...}`` keeps that id (session expiry happens outside any
call). JSON lines are for log shippers (Loki, Elasticsearch, CloudWatch): one
object per line, keys ``time``, ``level``, ``logger``, ``message`` and, where there
is one, ``session_id``.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
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


def log_handler(fmt: str, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing to stream (stderr) in fmt ("text" or "json"), tagging records with their session id."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(SessionIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    return handler


def configure_logging(fmt: str = "text", level: str = "info") -> None:
    """Replace the root logger's handlers with one log_handler(fmt) at level (the server process only)."""
    root = logging.getLogger()
    root.handlers[:] = [log_handler(fmt)]
    root.setLevel(level.upper())
