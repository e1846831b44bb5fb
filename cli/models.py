"""``nextchar models list|show|promote|delete``: the server's model registry."""

from __future__ import annotations

from typing import Annotated

import typer
from nextchar.cli.common import (
    HELP,
    JsonOpt,
    ServerOpt,
    TimeoutOpt,
    connect,
    fmt_float,
    print_json,
    print_table,
)
from nextchar.client.defaults import DEFAULT_TARGET, DEFAULT_TIMEOUT

ModelArg = Annotated[
    str,
    typer.Argument(
        help="NAME or NAME:VERSION (a NAME alone: its newest version); the default model when omitted."
    ),
]

models_app = typer.Typer(
    help="List, describe, promote and delete model versions.",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings=HELP,
)


@models_app.command("list")
def list_models(
    as_json: JsonOpt = False, server: ServerOpt = DEFAULT_TARGET, timeout: TimeoutOpt = DEFAULT_TIMEOUT
) -> None:
    """Every model version on the server, available or not; * marks the default."""
    with connect(server, timeout) as client:
        models = client.models()
    if as_json:
        print_json(models)
        return
    rows = [
        (
            ("* " if m.is_default else "  ") + str(m.model),
            "yes" if m.available else f"no: {m.reason}",
            m.cell,
            m.hidden,
            m.layers,
            m.vocab_size,
            fmt_float(m.bits_per_char),
            f"{m.file_bytes / 1024:.0f} KiB",
        )
        for m in models
    ]
    print_table(
        "models", ("model", "available", "cell", "hidden", "layers", "vocab", "bits/char", "size"), rows
    )


@models_app.command("show")
def show(
    model: ModelArg = "",
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Config, vocabulary, training summary and file metadata of one version."""
    with connect(server, timeout) as client:
        details = client.model(model)
    if as_json:
        print_json(details)
        return
    info = details.info
    rows: list[tuple[str, object]] = [
        ("model", f"{info.model}{' (default)' if info.is_default else ''}"),
        ("available", "yes" if info.available else f"no: {info.reason}"),
        ("vocab", repr(details.vocab)),
        ("bits/char", fmt_float(info.bits_per_char)),
        *((f"config.{k}", v) for k, v in details.config.items()),
        *(
            (f"summary.{k}", fmt_float(v) if isinstance(v, float) else v)
            for k, v in details.summary.items()
            if k != "config"
        ),
        *((f"train.{k}", v) for k, v in details.summary.get("config", {}).items()),
    ]
    print_table(str(info.model), ("", "value"), rows)


@models_app.command("promote")
def promote(
    model: Annotated[str, typer.Argument(help="NAME or NAME:VERSION to make the default for new sessions.")],
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Make a version the default for new sessions; live sessions keep theirs."""
    with connect(server, timeout) as client:
        default, previous = client.promote(model)
    if as_json:
        print_json({"default": default, "previous": previous})
    else:
        typer.echo(f"default model: {default} (was {previous or 'none'})")


@models_app.command("delete")
def delete(
    model: Annotated[str, typer.Argument(help="NAME:VERSION to delete (the version is required).")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Delete a version from disk; its live sessions are closed. The default cannot be deleted."""
    from nextchar.client.results import ModelRef

    ref = ModelRef.parse(model)
    if not ref.version:
        raise typer.BadParameter("give the version to delete, e.g. NAME:3", param_hint="MODEL")
    if not yes and not typer.confirm(f"delete model {ref} from the server's disk?"):
        typer.echo(f"kept {ref}", err=True)  # a decision, not a failure
        return
    with connect(server, timeout) as client:
        deleted = client.delete_model(ref)
    if as_json:
        print_json({"deleted": deleted})
    else:
        typer.echo(f"deleted {deleted}")
