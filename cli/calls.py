"""The one-shot commands: serve, trainer, predict, generate, complete, loss and health.

Each is a plain function; nextchar.cli.app registers them (and the longer commands
of .train, .stream, .models and .sessions) on the ``nextchar`` app.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from nextchar.cli.common import (
    EXIT_ERROR,
    AdaptOpt,
    JsonOpt,
    ModelOpt,
    ServerOpt,
    TimeoutOpt,
    TopKOpt,
    connect,
    print_json,
    print_table,
)
from nextchar.cli.options import config_options
from nextchar.cli.stream import print_predictions
from nextchar.client.defaults import DEFAULT_TARGET, DEFAULT_TIMEOUT
from nextchar.server.config import ServerConfig, TrainerConfig


@config_options(ServerConfig, env_prefix="NEXTCHAR_")
def serve(config: ServerConfig) -> None:
    """Run the nextchar service until SIGTERM or Ctrl-C, then drain and exit.

    Every option is a ServerConfig field, also settable as NEXTCHAR_<FIELD>."""
    from nextchar.server.app import serve as run_server

    run_server(config)


@config_options(TrainerConfig, env_prefix="NEXTCHAR_")
def trainer(config: TrainerConfig) -> None:
    """Train jobs from a shared store's queue (on any machine) until SIGTERM or Ctrl-C.

    A trainer only trains: it takes queued jobs, reports their progress into the store,
    and registers the models they make; SIGTERM pauses its jobs back into the queue."""
    from nextchar.server.app import run_trainer

    run_trainer(config)


def predict(
    text: Annotated[str, typer.Argument(help="Text to feed, character by character.")],
    session_id: Annotated[str, typer.Option("--session", help="Feed a live session (advancing it).")] = "",
    model: ModelOpt = "",
    top_k: TopKOpt = 3,
    adapt: AdaptOpt = None,
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Predict the next character after every character of TEXT (from a fresh state unless --session;
    with --adapt, adapting to TEXT as it goes)."""
    with connect(server, timeout) as client:
        if session_id:
            predictions = client.attach(session_id).feed(text, top_k=top_k)
        else:
            predictions = client.predict(text, model, top_k=top_k, adapt=adapt)
    print_predictions(predictions, as_json)


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
    loop = repeating_tail(result.text) if temperature == 0 or top_p == 0 else None
    if loop is not None and not as_json:
        start, unit = loop
        typer.echo(
            f"greedy decoding repeats {json.dumps(unit, ensure_ascii=False)} from character {start} on: "
            "it always takes the likeliest next character, and this model's likeliest path is a loop; "
            "sampling varies it (--temperature 0.8, or --top-k 5)",
            err=True,
        )


LOOP_CHARS = 24  # a tail this long that repeats a unit at least 3 times is a loop, not a pattern
LONGEST_UNIT = 80  # characters: a loop of a longer unit is not looked for
LOOKED_AT = 4096  # characters at the end of the text: a loop shows there


def repeating_tail(text: str) -> tuple[int, str] | None:
    """(where it starts, the unit) when the text ends in a loop: one unit, the shortest, repeated
    at least 3 times over LOOP_CHARS or more (a greedy decoding's fixed cycle); else None."""
    tail = text[-LOOKED_AT:]
    n = len(tail)
    for p in range(1, min(LONGEST_UNIT, n // 3) + 1):
        matched = 0  # trailing characters equal to the one p before them
        while matched < n - p and tail[n - 1 - matched] == tail[n - 1 - matched - p]:
            matched += 1
        if matched >= 2 * p and matched + p >= LOOP_CHARS:
            start = len(text) - matched - p
            return start, text[start : start + p]
    return None


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
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Export a model version's loss history as CSV, JSON or a PNG plot of train and validation loss."""
    if as_json:  # as every data command takes it: the same as --format json
        if fmt not in (None, HistoryFormat.json):
            raise typer.BadParameter(f"--json and --format {fmt.value} disagree", param_hint="--json")
        fmt = HistoryFormat.json
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
