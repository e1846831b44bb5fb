"""``nextchar sessions list|show|fork|close``: the server's live sessions."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

import typer
from nextchar.cli.common import (
    HELP,
    JsonOpt,
    ServerOpt,
    TimeoutOpt,
    connect,
    print_json,
    print_table,
    show_char,
)
from nextchar.client.defaults import DEFAULT_TARGET, DEFAULT_TIMEOUT

if TYPE_CHECKING:
    from nextchar.client.results import SessionInfo

SessionArg = Annotated[str, typer.Argument(help="Session id.")]

sessions_app = typer.Typer(
    help="List, describe, fork, rewind and close live sessions.",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings=HELP,
)


def _ago(t: float) -> str:
    return f"{max(time.time() - t, 0):.0f} s ago"


def _until(t: float) -> str:
    return "never" if not t else f"in {max(t - time.time(), 0):.0f} s"


def _row(s: SessionInfo) -> tuple[object, ...]:
    return (
        s.session_id,
        s.model,
        s.offset,
        _ago(s.created_at),
        _ago(s.last_used_at),
        _until(s.idle_expires_at),
        s.rewind_limit,
    )


COLUMNS = ("session", "model", "offset", "created", "last used", "idle expiry", "can rewind")


def _print_sessions(title: str, sessions: list[SessionInfo], as_json: bool) -> None:
    """A table for people; with --json, the list."""
    if as_json:
        print_json(sessions)
    else:
        print_table(title, COLUMNS, [_row(s) for s in sessions])


def _print_session(title: str, session: SessionInfo, as_json: bool) -> None:
    """A one-row table for people; with --json, the session's object."""
    if as_json:
        print_json(session)
    else:
        print_table(title, COLUMNS, [_row(session)])


@sessions_app.command("list")
def list_sessions(
    as_json: JsonOpt = False, server: ServerOpt = DEFAULT_TARGET, timeout: TimeoutOpt = DEFAULT_TIMEOUT
) -> None:
    """Every live session, oldest first."""
    with connect(server, timeout) as client:
        _print_sessions("sessions", client.sessions(), as_json)


@sessions_app.command("show")
def show(
    session_id: SessionArg,
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """One live session: model, offset, expiry."""
    with connect(server, timeout) as client:
        _print_session(f"session {session_id}", client.attach(session_id).info, as_json)


@sessions_app.command("fork")
def fork(
    session_id: SessionArg,
    new_id: Annotated[
        str, typer.Option("--id", help="Id for the new session; the server picks one when omitted.")
    ] = "",
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Start a new session from a copy of this one's state."""
    with connect(server, timeout) as client:
        twin = client.attach(session_id).fork(new_id)
        _print_session(f"fork of {session_id}", twin.info, as_json)


@sessions_app.command("rewind")
def rewind(
    session_id: SessionArg,
    chars: Annotated[int, typer.Argument(min=1, help="Characters to take back.")] = 1,
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Take back a session's last characters, as if it had never received them."""
    with connect(server, timeout) as client:
        session = client.attach(session_id)
        after = session.rewind(chars)
    if as_json:
        print_json({"session": session.info, "next": after})
    else:
        guesses = "  ".join(f"{show_char(c.char)} {c.prob:.3f}" for c in after)
        typer.echo(f"session {session_id} at offset {session.offset}; next: {guesses}")


@sessions_app.command("close")
def close(
    session_id: SessionArg,
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Close a session; later use of its id answers that it was closed."""
    with connect(server, timeout) as client:
        session = client.attach(session_id)
        session.close()
    if as_json:
        print_json({"closed": session_id, "offset": session.offset})
    else:
        typer.echo(f"closed session {session_id} at offset {session.offset}")
