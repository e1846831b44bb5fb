"""``nextchar train``: train a model on the server (or in this process with ``--local``).

The server trains in a worker process, so this command only watches: Ctrl-C asks
whether to cancel the job or leave it running, and ``--detach`` returns at once.
``--local`` runs nextchar.core.train here and registers the result through the
server's own Registry, so the files land exactly where ``nextchar serve`` reads them.
The model and training options come from ModelConfig and TrainConfig (nextchar.cli.options).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from nextchar.cli.common import (
    SERVER_DEFAULTS,
    JsonOpt,
    ServerOpt,
    TimeoutOpt,
    connect,
    fmt_float,
    print_json,
)
from nextchar.cli.options import config_options
from nextchar.client.defaults import DEFAULT_TARGET, DEFAULT_TIMEOUT
from nextchar.client.texts import TextFiles
from nextchar.core.config import ModelConfig, TrainConfig

if TYPE_CHECKING:
    from nextchar.client.library import NextCharClient
    from nextchar.client.results import Progress
    from nextchar.client.training import TrainingRun


class TrainingBar:
    """A live bar on stderr: progress through the characters, loss, bits/char, chars/s and ETA."""

    def __init__(self, title: str, enabled: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, TaskProgressColumn, TextColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[stats]}"),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self.task = self.bar.add_task(title, total=None, stats="starting")

    def update(self, p: Progress) -> None:
        val = f"  val {fmt_float(p.val_bpc, 2)}" if p.val_bpc is not None else ""
        eta = f"{p.eta_seconds:.0f} s" if p.eta_seconds is not None else "?"
        stats = (
            f"epoch {p.epoch}  loss {fmt_float(p.train_loss)}  {fmt_float(p.train_bpc, 2)} bits/char{val}"
            f"  {p.chars_per_sec:,.0f} chars/s  ETA {eta}"
        )
        self.bar.update(self.task, total=p.total_chars, completed=p.chars, stats=stats)

    def __enter__(self) -> TrainingBar:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()


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
        str, typer.Option("--name", "-n", help="Model name to register a new version of.")
    ] = "default",
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
    source = text if text is not None else TextFiles.of(files or [])
    if local:
        corpus = source if isinstance(source, str) else source.read()
        _train_here(corpus, name, model_config, train_config, promote, model_dir, as_json)
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
        follow(client, run, name, as_json)


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


def follow(client: NextCharClient, run: TrainingRun, name: str, as_json: bool) -> None:
    """Watch the job to its end, then say what was registered; Ctrl-C asks whether to cancel
    it or leave it running."""
    try:
        with TrainingBar(f"training {name}", enabled=not as_json) as bar:
            job = run.wait(print_json if as_json else bar.update)
    except KeyboardInterrupt:
        _interrupted(run)
        raise typer.Exit(130) from None
    if job.state != "succeeded" or job.result is None:
        from nextchar.client.errors import TrainingFailed

        raise TrainingFailed(
            f"training job {job.job_id} {job.state}: {job.error or 'no reason given'}", job=job
        )
    info = client.model(job.result).info
    if as_json:
        print_json({"job_id": job.job_id, "model": info})
        return
    bpc = fmt_float(info.bits_per_char)
    typer.echo(f"registered {info.model}{' (default)' if info.is_default else ''}: {bpc} bits/char")
    kept = kept_epoch([p for p in client.loss_history(job.result) if p.kind == "epoch"])
    if kept:
        typer.echo(kept)


def kept_epoch(epochs: list[Progress]) -> str:
    """Which epoch's weights a run kept (the best validation) against its last epoch."""
    scored = [p for p in epochs if p.val_bpc is not None]
    if not scored:
        return ""
    best, last = min(scored, key=lambda p: p.val_bpc or 0.0), scored[-1]
    if best is last:
        return f"kept the last epoch's weights ({last.epoch}: the best validation, {fmt_float(last.val_bpc)} bits/char)"
    return (
        f"kept epoch {best.epoch}'s weights (the best validation, {fmt_float(best.val_bpc)} bits/char); "
        f"the last, epoch {last.epoch}, had {fmt_float(last.val_bpc)}"
    )


def _interrupted(run: TrainingRun) -> None:
    job_id = run.job_id
    leave = not sys.stdin.isatty() or not typer.prompt(
        f"\ntraining job {job_id}: [c]ancel it, or [l]eave it running?", default="l"
    ).lower().startswith("c")
    if leave:
        run.detach()
        typer.echo(f"training job {job_id} keeps running on the server", err=True)
    else:
        run.cancel()
        typer.echo(f"training job {job_id} cancelled; nothing is registered", err=True)


def _train_here(
    text: str,
    name: str,
    model_config: ModelConfig,
    train_config: TrainConfig,
    promote: bool,
    model_dir: Path,
    as_json: bool,
) -> None:
    from nextchar.client.results import Progress
    from nextchar.core.train import TrainingDiverged
    from nextchar.core.train import train as train_locally
    from nextchar.server.registry import Registry

    registry = Registry(model_dir)
    registry.load_all()
    try:
        with TrainingBar(f"training {name} locally", enabled=not as_json) as bar:
            show = print_json if as_json else bar.update
            result = train_locally(
                text, model_config, train_config, on_progress=lambda r: show(Progress.from_dict(r))
            )
    except TrainingDiverged as exc:
        raise typer.BadParameter(f"{exc}; nothing was saved", param_hint="--lr") from None
    except KeyboardInterrupt:
        typer.echo("training cancelled; nothing was saved", err=True)
        raise typer.Exit(130) from None
    mv = registry.register(
        name, result.model, history=result.history, summary=result.summary, promote=promote
    )
    default = registry.default
    is_default = default is not None and (default.name, default.version) == (mv.name, mv.version)
    if as_json:
        print_json(
            {"model": {"name": mv.name, "version": mv.version}, "path": str(mv.path), "default": is_default}
        )
    else:
        typer.echo(f"registered {mv.name}:v{mv.version} in {mv.path}{' (default)' if is_default else ''}")
