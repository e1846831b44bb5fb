"""``nextchar``: the command line for the nextchar service (one Typer app, ``app``).

    nextchar serve                      # start the service on 127.0.0.1:50051
    nextchar train corpus.txt --epochs 5
    echo "hello world" | nextchar stream
    nextchar generate --prime "hello" --length 80
    nextchar loss default --format png --output loss.png

Every command that prints data takes ``--json``. Errors are one line on stderr
and a non-zero exit code; OneLineErrors is the one place that turns them into that.
Command groups live in nextchar.cli.models / .sessions, the long commands in
.train / .stream; this module wires them into ``app``. The command line is the one
package that knows both the client library and the server (``serve``, ``train --local``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from nextchar.cli.common import (
    CREDENTIALS,
    HELP,
    JsonOpt,
    ModelOpt,
    ServerOpt,
    TimeoutOpt,
    TopKOpt,
    connect,
    print_json,
    print_table,
)
from nextchar.cli.models import models_app
from nextchar.cli.options import config_options
from nextchar.cli.sessions import sessions_app
from nextchar.cli.stream import evaluate, print_predictions, stream
from nextchar.cli.train import train
from nextchar.client.defaults import DEFAULT_TARGET, DEFAULT_TIMEOUT
from nextchar.server.config import ServerConfig
from typer._click.exceptions import NoArgsIsHelpError
from typer.core import TyperGroup

EXIT_ERROR = 1


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
        return str(exc.message)
    if isinstance(exc, OSError | ValueError):  # unreadable files, invalid hyperparameters
        return str(exc)
    if os.environ.get("NEXTCHAR_DEBUG"):
        raise exc
    return f"unexpected {type(exc).__name__}: {exc} (NEXTCHAR_DEBUG=1 shows where)"


def _fail(message: str, code: int) -> int:
    typer.echo(f"nextchar: error: {' '.join(message.split())}", err=True)
    return code


app = typer.Typer(
    cls=OneLineErrors,
    help="Stateful next-character prediction: train, serve and stream char-RNNs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: no rich import (start-up time), flags without a <bool> metavar
    context_settings=HELP,
)


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        typer.echo(f"nextchar {version('nextchar')}")
        raise typer.Exit()


def pem_option(help: str, envvar: str | None = None) -> Any:
    """A typer.Option for an existing PEM file."""
    return typer.Option(envvar=envvar, dir_okay=False, exists=True, show_default=False, help=help)


@app.callback()
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


app.add_typer(models_app, name="models")
app.add_typer(sessions_app, name="sessions")
app.command()(train)
app.command()(stream)
app.command("eval")(evaluate)


@app.command()
@config_options(ServerConfig, env_prefix="NEXTCHAR_")
def serve(config: ServerConfig) -> None:
    """Run the nextchar service until SIGTERM or Ctrl-C, then drain and exit.

    Every option is a ServerConfig field, also settable as NEXTCHAR_<FIELD>."""
    from nextchar.server.app import serve as run_server

    run_server(config)


@app.command()
def predict(
    text: Annotated[str, typer.Argument(help="Text to feed, character by character.")],
    session_id: Annotated[str, typer.Option("--session", help="Feed a live session (advancing it).")] = "",
    model: ModelOpt = "",
    top_k: TopKOpt = 3,
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Predict the next character after every character of TEXT (from a fresh state unless --session)."""
    with connect(server, timeout) as client:
        if session_id:
            predictions = client.attach(session_id).feed(text, top_k=top_k)
        else:
            predictions = client.predict(text, model, top_k=top_k)
    print_predictions(predictions, as_json)


@app.command()
def generate(
    prime: Annotated[str, typer.Option("--prime", "-p", help="Text to start from.")] = "",
    length: Annotated[int, typer.Option("--length", "-n", min=1, help="Characters to generate.")] = 200,
    temperature: Annotated[
        float,
        typer.Option(
            "--temperature", "-t", min=0, max=100, help="Sampling temperature, [0, 100]; 0 = greedy (argmax)."
        ),
    ] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Sample among the k likeliest; 0 = off.")] = 0,
    top_p: Annotated[
        float, typer.Option(min=0, max=1, help="Nucleus sampling mass, [0, 1]; 1 = off, 0 = greedy.")
    ] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Random seed, for repeatable samples.")] = None,
    session_id: Annotated[
        str, typer.Option("--session", help="Generate from a live session, advancing it.")
    ] = "",
    model: ModelOpt = "",
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Sample text from a model, printed as it arrives."""
    sampling: dict[str, Any] = {"length": length, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    show = None if as_json else lambda piece: typer.echo(piece, nl=False)
    if show is not None:
        show(prime)  # the text reads on from what it continues
    with connect(server, timeout) as client:
        if session_id:
            result = client.attach(session_id).generate(prime=prime, seed=seed, on_piece=show, **sampling)
        else:
            result = client.generate(prime, model, seed=seed, on_piece=show, **sampling)
    if as_json:
        print_json(
            {"prime": prime, "text": result.text, "model": str(result.model), "session_id": result.session_id}
        )
    else:
        typer.echo()


@app.command()
def complete(
    prime: Annotated[str, typer.Option("--prime", "-p", help="Text to continue (from a fresh state).")] = "",
    session_id: Annotated[
        str,
        typer.Option("--session", help="Continue a live session from where it stands (it does not move)."),
    ] = "",
    n: Annotated[int, typer.Option("-n", min=1, max=16, help="Continuations to show.")] = 3,
    max_chars: Annotated[int, typer.Option(min=1, max=64, help="Longest continuation, in characters.")] = 12,
    model: ModelOpt = "",
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """The likeliest continuations up to the end of a word, with their probabilities."""
    with connect(server, timeout) as client:
        if session_id:
            found = client.attach(session_id).complete(n, max_chars=max_chars)
        else:
            found = client.complete(prime, model, n=n, max_chars=max_chars)
    if as_json:
        print_json({"prime": prime, "session_id": session_id, "completions": found})
        return
    for c in found:
        typer.echo(f"{c.prob:8.4f}  {prime}{c.text}{'' if c.complete else '…'}")


class HistoryFormat(StrEnum):
    csv = "csv"
    json = "json"
    png = "png"


@app.command()
def loss(
    model: Annotated[str, typer.Argument(help="MODEL or MODEL:VERSION (the newest version when omitted).")],
    fmt: Annotated[
        HistoryFormat | None,
        typer.Option("--format", "-f", help="csv, json or png; from --output's suffix if omitted."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", dir_okay=False, help="File to write; stdout for csv/json."),
    ] = None,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Export a model version's loss history as CSV, JSON or a PNG plot of train and validation loss."""
    suffix = output.suffix.lstrip(".").lower() if output else ""
    if fmt is None and output is not None and suffix not in HistoryFormat.__members__:
        raise typer.BadParameter(
            f"cannot tell the format from {output.name!r}: name it .csv, .json or .png, or give --format",
            param_hint="--output",
        )
    chosen = fmt.value if fmt else suffix or "csv"
    if chosen == "png" and output is None:
        raise typer.BadParameter("a PNG needs --output PATH", param_hint="--format")
    from nextchar.client.results import ModelRef
    from nextchar.core.history import export_history, to_csv, to_json

    ref = ModelRef.parse(model)
    with connect(server, timeout) as client:
        history = [p.to_dict() for p in client.loss_history(ref)]
    if not history:
        raise typer.BadParameter(f"model {ref} has no loss history", param_hint="MODEL")
    if output is None:
        typer.echo((to_csv if chosen == "csv" else to_json)(history), nl=chosen == "json")
        return
    export_history(history, chosen, output, title=f"nextchar {ref}: bits/char per epoch")
    typer.echo(f"wrote {len(history)} records of {ref} to {output} ({chosen})", err=True)


@app.command()
def health(
    as_json: JsonOpt = False, server: ServerOpt = DEFAULT_TARGET, timeout: TimeoutOpt = DEFAULT_TIMEOUT
) -> None:
    """Is the server serving? Exits 0 when it is, 1 when it is not (e.g. draining)."""
    with connect(server, timeout) as client:
        status = client.health()
        models = client.models() if status == "SERVING" else []
    default = next((str(m.model) for m in models if m.is_default), None)
    report = {"server": server, "status": status, "default_model": default, "models": len(models)}
    if as_json:
        print_json(report)
    else:
        print_table("health", ("", "value"), list(report.items()))
    if status != "SERVING":
        raise typer.Exit(EXIT_ERROR)
