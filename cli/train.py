"""``nextchar train``: train a model on the server (or in this process with ``--local``).

The server trains in a worker process, so this command only watches (nextchar.cli.follow:
Ctrl-C asks whether to cancel the job or leave it running), and ``--detach`` returns at
once. ``--local`` runs nextchar.core.train here and registers the result through the
server's own Registry, so the files land exactly where ``nextchar serve`` reads them; with
``--store`` (a server sharing models through Redis) it publishes them there. The model is
named by ``--name`` or by its file (``corpus.txt``: ``corpus``), never by a default that a
toy run would quietly take over. What the run will cost is said first (nextchar.cli.plan).
The model and training options come from ModelConfig and TrainConfig (nextchar.cli.options).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from nextchar.cli.common import (
    SERVER_DEFAULTS,
    JsonOpt,
    ServerOpt,
    TimeoutOpt,
    connect,
    print_json,
)
from nextchar.cli.follow import follow
from nextchar.cli.options import config_options
from nextchar.cli.plan import plan
from nextchar.cli.progress import progress_view
from nextchar.client.defaults import DEFAULT_TARGET, DEFAULT_TIMEOUT
from nextchar.client.texts import TextFiles
from nextchar.core.config import ModelConfig, TrainConfig

if TYPE_CHECKING:
    from nextchar.client.training import TrainingRun
    from nextchar.server.registry import Registry


@config_options(ModelConfig, TrainConfig)
def train(
    files: Annotated[
        list[Path] | None,
        typer.Argument(
            exists=True, dir_okay=False, help="Training text files (UTF-8), concatenated in order."
        ),
    ] = None,
    text: Annotated[str | None, typer.Option("--text", help="Train on this text instead of files.")] = None,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            "-n",
            show_default=False,
            help="Model name to register a new version of; the file's name (corpus.txt: corpus) when omitted.",
        ),
    ] = None,
    promote: Annotated[bool, typer.Option(help="Make the new version the default model.")] = False,
    detach: Annotated[bool, typer.Option(help="Start the job and return at once; it keeps running.")] = False,
    local: Annotated[
        bool,
        typer.Option(
            help="Train in this process, no server; a running server picks the new version up when asked for it."
        ),
    ] = False,
    model_dir: Annotated[
        Path, typer.Option(envvar="NEXTCHAR_MODEL_DIR", help="Model registry directory for --local.")
    ] = SERVER_DEFAULTS.model_dir,
    store: Annotated[
        str,
        typer.Option(
            envvar="NEXTCHAR_STORE",
            show_default=False,
            help="With --local: the redis://HOST:PORT/DB a server shares its models through (its --store).",
        ),
    ] = "",
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
    *,
    model_config: ModelConfig,
    train_config: TrainConfig,
) -> None:
    """Train a character model on text files (or --text) and register it as a new version.

    The model and training options are ModelConfig's and TrainConfig's fields."""
    if files and text is not None:
        raise typer.BadParameter("give training FILES or --text, not both", param_hint="FILES")
    if text == "":
        raise typer.BadParameter("the text is empty", param_hint="--text")
    if text is None and not files:
        raise typer.BadParameter("give training FILES (or --text TEXT)", param_hint="FILES")
    name = model_name(name, files or [])
    source = text if text is not None else TextFiles.of(files or [])
    if not as_json:
        for line in plan(source, name, model_config, train_config):
            typer.echo(line, err=True)
    if local:
        registry = local_registry(model_dir, store)  # refused before hours of training, not after
        corpus = source if isinstance(source, str) else source.read()
        _train_here(corpus, name, model_config, train_config, promote, registry, as_json)
        return
    with connect(server, timeout) as client:
        try:
            run = client.start_training(  # files are read as they are uploaded, never whole
                source if isinstance(source, str) else source.paths,
                name=name,
                model_config=model_config,
                train_config=train_config,
                promote=promote,
            )
        except KeyboardInterrupt:  # before the server's first event: it may have queued the job
            typer.echo(
                "interrupted before the server named the training job: if it queued it, the job "
                "keeps running on the server (nextchar jobs lists it)",
                err=True,
            )
            raise typer.Exit(130) from None
        if detach:
            _report_detached(run, as_json)
            return
        if not as_json:
            typer.echo(
                f"training job {run.job_id} (follow it again with: nextchar jobs watch {run.job_id})",
                err=True,
            )
        follow(client, run, name, as_json, started_here=True)


def model_name(name: str | None, files: list[Path]) -> str:
    """--name, else the one training file's stem when it is a valid model name: a name is never
    made up (a silent ``default`` turned a toy run into the model a plain ``stream`` gets)."""
    from nextchar.server.registry import NAME_RE

    if name is not None:
        return name
    stem = files[0].stem if len(files) == 1 else ""
    if NAME_RE.match(stem):
        return stem
    why = f"{stem!r} is not a model name" if stem else "there is no one file to name it after"
    raise typer.BadParameter(
        f"name the model with --name NAME (1-64 characters of a-z 0-9 _ . -): {why}", param_hint="--name"
    )


def _report_detached(run: TrainingRun, as_json: bool) -> None:
    job_id = run.job_id
    job = run.job
    run.detach()
    state = job.state if job else "queued"
    if as_json:
        print_json({"job_id": job_id, "state": state})
    else:
        place = f", place {job.queue_position} in the queue" if job and job.queue_position else ""
        typer.echo(f"training job {job_id} is {state} on the server{place}; nextchar jobs watch {job_id}")


def local_registry(model_dir: Path, store: str) -> Registry:
    """The registry a local run registers into: model_dir's, or with a store the shared one (the
    server's replicas see it there). A model_dir a server uses as its cache of a store's models
    is refused without the store: a version written only there is one no server sees."""
    from nextchar.server.registry import Registry
    from nextchar.server.shared_models import shared_store_of

    if not store:
        shared = shared_store_of(model_dir)
        if shared:
            raise typer.BadParameter(
                f"{model_dir} holds the models of {shared} (a server's --store): a version written "
                "only here is one no server sees; give that store (--store redis://HOST:PORT/DB or "
                "NEXTCHAR_STORE), or train on the server without --local",
                param_hint="--store",
            )
        registry = Registry(model_dir)
    else:
        from nextchar.server.app import shared_parts
        from nextchar.server.config import TrainerConfig

        registry = shared_parts(TrainerConfig(store=store, model_dir=model_dir))[0]
    registry.load_all()
    return registry


def _train_here(
    text: str,
    name: str,
    model_config: ModelConfig,
    train_config: TrainConfig,
    promote: bool,
    registry: Registry,
    as_json: bool,
) -> None:
    from nextchar.client.results import Progress
    from nextchar.core.train import TrainingDiverged
    from nextchar.core.train import train as train_locally

    try:
        with progress_view(f"training {name} locally", as_json) as view:
            result = train_locally(
                text, model_config, train_config, on_progress=lambda r: view.update(Progress.from_dict(r))
            )
    except TrainingDiverged as exc:
        raise typer.BadParameter(f"{exc}; nothing was saved", param_hint="--lr") from None
    except KeyboardInterrupt:
        typer.echo("training cancelled; nothing was saved", err=True)
        raise typer.Exit(130) from None
    mv = registry.register(
        name,
        result.model,
        history=result.history,
        summary=result.summary,
        promote=promote,
        adapt=result.adapt,
    )
    default = registry.default
    is_default = default is not None and (default.name, default.version) == (mv.name, mv.version)
    if as_json:
        print_json(
            {"model": {"name": mv.name, "version": mv.version}, "path": str(mv.path), "default": is_default}
        )
    else:
        typer.echo(f"registered {mv.name}:v{mv.version} in {mv.path}{' (default)' if is_default else ''}")
