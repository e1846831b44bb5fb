"""What every CLI command shares: option types, the client it connects with, and output helpers.

Options are ``Annotated`` aliases so each command declares ``server: ServerOpt =
DEFAULT_TARGET`` and gets the same flag, environment variable and help text.
Data goes to stdout (JSON with ``--json``, rich tables otherwise); errors go to
stderr as one line (see cli.OneLineErrors).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, is_dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer
from nextchar.server.config import ServerConfig

if TYPE_CHECKING:  # imported where used: a command that only prints its help loads neither
    from nextchar.client.channel import Tls
    from nextchar.client.library import NextCharClient
    from rich.console import Console

ServerOpt = Annotated[
    str,
    typer.Option(
        "--server",
        "-s",
        envvar="NEXTCHAR_SERVER",
        help="Server address HOST:PORT; several, comma-separated, are balanced round-robin.",
    ),
]
TimeoutOpt = Annotated[
    float, typer.Option(min=0.1, envvar="NEXTCHAR_TIMEOUT", help="Seconds each call may take.")
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print JSON (JSON Lines for streams) instead of tables.")
]
ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Model NAME or NAME:VERSION; the server's default when omitted.")
]
TopKOpt = Annotated[int, typer.Option("--top-k", "-k", min=1, help="Candidates shown per character.")]
AdaptOpt = Annotated[
    bool | None,
    typer.Option(
        "--adapt/--no-adapt",
        help="Learn the writer: predictions from the model plus weights stepped from this text as it "
        "comes (docs/adaptation.md). Default: the server's setting.",
        show_default=False,
    ),
]

EXIT_ERROR = 1  # a command that failed (usage errors exit 2, as Click does; Ctrl-C 130)
HELP = {"help_option_names": ["-h", "--help"]}  # every command's context settings
SERVER_DEFAULTS = ServerConfig()  # what `nextchar serve` uses, and where `train --local` writes


@functools.cache
def console() -> Console:
    """Where tables go. Piped output has no terminal width to fit: tables take their natural width."""
    from rich.console import Console

    out = Console(highlight=False, soft_wrap=True)
    return out if out.is_terminal else Console(highlight=False, soft_wrap=True, width=200)


@dataclass
class Credentials:
    """How the CLI authenticates: the app's global --token / --tls* options, set before any command runs."""

    token: str = ""
    tls: Tls | None = None


CREDENTIALS = Credentials()  # the one process-wide setting; cli.main fills it from the command line


def connect(server: str, timeout: float) -> NextCharClient:
    from nextchar.client.library import NextCharClient

    return NextCharClient(server, timeout=timeout, token=CREDENTIALS.token, tls=CREDENTIALS.tls)


def to_jsonable(value: Any) -> Any:
    """Dataclasses become dicts; NaN/inf become null, so every line is strict JSON."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def print_json(value: Any) -> None:
    typer.echo(json.dumps(to_jsonable(value), ensure_ascii=False))


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    console().print(table)


def show_char(char: str) -> str:
    """A character printable on one line: whitespace and controls escaped, space shown as ␠."""
    if char == " ":
        return "␠"
    shown = json.dumps(char, ensure_ascii=False)[1:-1]
    return shown if char.isprintable() or shown != char else repr(char)[1:-1]


def fmt_float(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"
