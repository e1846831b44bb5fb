"""``nextchar``: the command line for the nextchar service (one Typer app, ``app``; ``run`` is the script).

    nextchar serve                      # start the service on 127.0.0.1:50051
    nextchar trainer --store redis://…  # a process that only trains jobs from the shared queue
    nextchar train corpus.txt --epochs 5
    echo "hello world" | nextchar stream
    nextchar generate --prime "hello" --length 80
    nextchar loss default --format png --output loss.png

Every command that prints data takes ``--json``. Errors are one line on stderr
and a non-zero exit code; OneLineErrors is the one place that turns them into that.
Command groups live in nextchar.cli.models / .sessions, the long commands in
.train / .stream, the one-shot ones in .calls; this module wires them into the app,
importing only the command a call names (COMMANDS, make_app). The command line is the one
package that knows both the client library and the server (``serve``, ``train --local``).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from nextchar.cli.common import CREDENTIALS, EXIT_ERROR, HELP
from typer._click.exceptions import NoArgsIsHelpError
from typer.core import TyperGroup


class OneLineErrors(TyperGroup):
    """The CLI's error boundary: any failure becomes ``nextchar: error: ...`` on stderr and an exit code.

    Usage errors exit 2 (as Click does), interrupted commands 130, everything else 1.
    Set NEXTCHAR_DEBUG=1 to see the traceback of an unexpected error instead.
    """

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            code = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except NoArgsIsHelpError as exc:  # bare `nextchar` (or a bare group): its help is the answer
            typer.echo(exc.format_message())
            code = 0
        except typer.TyperException as exc:  # Click's usage errors, BadParameter, ...
            code = _fail(exc.format_message(), exc.exit_code)
        except (typer.Abort, KeyboardInterrupt):  # Ctrl-C: no traceback, the shell's code for it
            typer.echo("", err=True)
            code = 130
        except Exception as exc:
            code = _fail(_one_line(exc), EXIT_ERROR)
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


def _one_line(exc: Exception) -> str:
    """What a failed command says. A NextCharError can only come from a command that loaded
    the client library (and gRPC), so this does not import it to recognise one."""
    errors = sys.modules.get("nextchar.client.errors")
    if errors is not None and isinstance(exc, errors.NextCharError):
        if isinstance(exc, errors.Unavailable) and exc.message.startswith(
            ("cannot reach", "lost the connection")
        ):
            return f"{exc.message}; is the server running? start one with `nextchar serve` (or `make run`)"
        if isinstance(exc, errors.ModelNotFound):
            return f"{exc.message}; `nextchar models list` shows the models this server has"
        return str(exc.message)
    if isinstance(exc, OSError | ValueError):  # unreadable files, invalid hyperparameters
        return str(exc)
    if os.environ.get("NEXTCHAR_DEBUG"):
        raise exc
    return f"unexpected {type(exc).__name__}: {exc} (NEXTCHAR_DEBUG=1 shows where)"


def _fail(message: str, code: int) -> int:
    typer.echo(f"nextchar: error: {' '.join(message.split())}", err=True)
    return code


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        typer.echo(f"nextchar {version('nextchar')}")
        raise typer.Exit()


def pem_option(help: str, envvar: str | None = None) -> Any:
    """A typer.Option for an existing PEM file."""
    return typer.Option(envvar=envvar, dir_okay=False, exists=True, show_default=False, help=help)


def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    token: Annotated[
        str, typer.Option(envvar="NEXTCHAR_TOKEN", show_default=False, help="Bearer token for the server.")
    ] = "",
    tls: Annotated[
        bool, typer.Option("--tls", help="Connect with TLS (the system's trusted roots).")
    ] = False,
    tls_ca: Annotated[
        Path | None, pem_option("Connect with TLS, trusting this CA.", "NEXTCHAR_TLS_CA")
    ] = None,
    client_cert: Annotated[
        Path | None, pem_option("Client certificate (PEM) for mutual TLS.", "NEXTCHAR_CLIENT_CERT")
    ] = None,
    client_key: Annotated[Path | None, pem_option("Its private key (PEM).", "NEXTCHAR_CLIENT_KEY")] = None,
) -> None:
    """Stateful next-character prediction: train, serve and stream char-RNNs.

    Connection options go before the command: nextchar --token T --tls-ca ca.pem stream
    """
    CREDENTIALS.token = token
    use_tls = tls or tls_ca is not None or client_cert is not None
    if use_tls:
        from nextchar.client.channel import Tls

        CREDENTIALS.tls = Tls.from_files(tls_ca, client_cert, client_key)


# name -> (module, function or sub-app): registered in this order, imported only when used
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("nextchar.cli.train", "train"),
    "stream": ("nextchar.cli.stream", "stream"),
    "eval": ("nextchar.cli.stream", "evaluate"),
    "serve": ("nextchar.cli.calls", "serve"),
    "trainer": ("nextchar.cli.calls", "trainer"),
    "predict": ("nextchar.cli.calls", "predict"),
    "generate": ("nextchar.cli.calls", "generate"),
    "complete": ("nextchar.cli.calls", "complete"),
    "loss": ("nextchar.cli.calls", "loss"),
    "health": ("nextchar.cli.calls", "health"),
    "models": ("nextchar.cli.models", "models_app"),
    "sessions": ("nextchar.cli.sessions", "sessions_app"),
    "jobs": ("nextchar.cli.jobs", "jobs_app"),
}


def make_app(only: str | None = None) -> typer.Typer:
    """The ``nextchar`` app with every command, or with the one named (what a call that names
    a command needs: the others' modules are not imported nor their options built, ~35 ms)."""
    cli = typer.Typer(
        cls=OneLineErrors,
        help="Stateful next-character prediction: train, serve and stream char-RNNs.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,  # plain help: no rich import (start-up time), flags without a <bool> metavar
        context_settings=HELP,
    )
    cli.callback()(main)
    for name, (module, attribute) in COMMANDS.items():
        if only is None or name == only:
            target = getattr(importlib.import_module(module), attribute)
            if isinstance(target, typer.Typer):
                cli.add_typer(target, name=name)
            else:
                cli.command(name)(target)
    return cli


def __getattr__(name: str) -> typer.Typer:
    """``app``, with every command, built on first use (the tests, the help): importing this
    module for ``run`` builds nothing."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    full = globals()["app"] = make_app()
    return full


def run() -> None:
    """The ``nextchar`` console script: builds only the command the arguments name."""
    make_app(command_named(sys.argv[1:]))(prog_name="nextchar")


VALUE_OPTIONS = (
    "--token",
    "--tls-ca",
    "--client-cert",
    "--client-key",
)  # the app's options that take a value


def command_named(args: Sequence[str]) -> str | None:
    """The command the arguments name (the first word that is not an app option or its value),
    or None when they name none (bare ``nextchar``, ``--help``) or one that does not exist."""
    words = iter(args)
    for word in words:
        if word in VALUE_OPTIONS:
            next(words, None)
        elif not word.startswith("-"):
            return word if word in COMMANDS else None
    return None
