"""``nextchar train``: train a model on the server (or in this process with ``--local``).

The server trains in a worker process, so this command only watches: Ctrl-C asks
whether to cancel the job or leave it running, and ``--detach`` returns at once.
``--local`` runs nextchar.core.train here and registers the result through the
server's own Registry, so the files land exactly where ``nextchar serve`` reads them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from nextchar.client.channel import DEFAULT_TARGET
from nextchar.client.cli_common import (
    SERVER_DEFAULTS,
    JsonOpt,
    ServerOpt,
    TimeoutOpt,
    connect,
    fmt_float,
    print_json,
)
from nextchar.client.errors import TrainingFailed
from nextchar.client.library import DEFAULT_TIMEOUT, NextCharClient
from nextchar.client.results import Progress
from nextchar.client.training import TrainingRun
from nextchar.core.model import ModelConfig
from nextchar.core.train import TrainConfig, TrainingDiverged
from nextchar.core.train import train as train_locally
from nextchar.server.registry import Registry
from rich.console import Console
from rich.progress import BarColumn, TaskProgressColumn, TextColumn
from rich.progress import Progress as RichProgress

MC, TC = ModelConfig(), TrainConfig()  # the defaults shown in --help are the core's own


class TrainingBar:
    """A live bar on stderr: progress through the characters, loss, bits/char, chars/s and ETA."""

    def __init__(self, title: str, enabled: bool) -> None:
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


def train(
    files: Annotated[
        list[Path] | None,
        typer.Argument(
            exists=True, dir_okay=False, help="Training text files (UTF-8), concatenated in order."
        ),
    ] = None,
    text: Annotated[str, typer.Option("--text", help="Train on this text instead of files.")] = "",
    name: Annotated[
        str, typer.Option("--name", "-n", help="Model name to register a new version of.")
    ] = "default",
    cell: Annotated[str, typer.Option(help="rnn, gru or lstm.")] = MC.cell,
    hidden: Annotated[int, typer.Option(help="Hidden units per layer, 1..4096.")] = MC.hidden,
    layers: Annotated[int, typer.Option(help="Recurrent layers, 1..3.")] = MC.layers,
    loss: Annotated[str, typer.Option(help="ce (cross-entropy) or sigmoid_mse (the notebook's).")] = MC.loss,
    seq_len: Annotated[int, typer.Option(help="BPTT window T.")] = TC.seq_len,
    batch: Annotated[int, typer.Option(help="Parallel streams B.")] = TC.batch,
    epochs: Annotated[int, typer.Option(help="Passes over the text.")] = TC.epochs,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = TC.lr,
    optimizer: Annotated[str, typer.Option(help="adam, adagrad or sgd.")] = TC.optimizer,
    clip: Annotated[str, typer.Option(help="Gradient clipping: norm, value or none.")] = TC.clip,
    clip_value: Annotated[float, typer.Option(help="Clip threshold.")] = TC.clip_value,
    val_fraction: Annotated[
        float, typer.Option(help="Held-out tail for validation, [0, 0.5).")
    ] = TC.val_fraction,
    patience: Annotated[
        int, typer.Option(help="Epochs without improvement before stopping; 0 = off.")
    ] = TC.patience,
    seed: Annotated[int, typer.Option(help="Initialisation seed.")] = TC.seed,
    log_every: Annotated[int, typer.Option(help="Steps between progress records.")] = TC.log_every,
    max_seconds: Annotated[
        float, typer.Option(help="Wall-clock budget in seconds; 0 = none.")
    ] = TC.max_seconds,
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
) -> None:
    """Train a character model on text files (or --text) and register it as a new version."""
    if bool(files) == bool(text):
        raise typer.BadParameter("give training FILES or --text, not both or neither", param_hint="FILES")
    corpus = text or "".join(path.read_text() for path in files or [])
    model_config = ModelConfig(cell=cell, hidden=hidden, layers=layers, loss=loss)
    train_config = TrainConfig(
        seq_len=seq_len,
        batch=batch,
        epochs=epochs,
        lr=lr,
        optimizer=optimizer,
        clip=clip,
        clip_value=clip_value,
        val_fraction=val_fraction,
        patience=patience,
        seed=seed,
        log_every=log_every,
        max_seconds=max_seconds,
    )
    if local:
        _train_here(corpus, name, model_config, train_config, promote, model_dir, as_json)
        return
    with connect(server, timeout) as client:
        run = client.start_training(
            corpus, name=name, model_config=model_config, train_config=train_config, promote=promote
        )
        if detach:
            _report_detached(run, as_json)
            return
        _follow(client, run, name, as_json)


def _report_detached(run: TrainingRun, as_json: bool) -> None:
    job_id = run.job_id
    run.detach()
    if as_json:
        print_json({"job_id": job_id, "state": "running"})
    else:
        typer.echo(f"training job {job_id} is running on the server")


def _follow(client: NextCharClient, run: TrainingRun, name: str, as_json: bool) -> None:
    """Watch the job to its end; Ctrl-C asks whether to cancel it or leave it running."""
    try:
        with TrainingBar(f"training {name}", enabled=not as_json) as bar:
            job = run.wait(print_json if as_json else bar.update)
    except KeyboardInterrupt:
        _interrupted(run)
        raise typer.Exit(130) from None
    if job.state != "succeeded" or job.result is None:
        raise TrainingFailed(
            f"training job {job.job_id} {job.state}: {job.error or 'no reason given'}", job=job
        )
    info = client.model(job.result).info
    if as_json:
        print_json({"job_id": job.job_id, "model": info})
    else:
        bpc = fmt_float(info.bits_per_char)
        typer.echo(f"registered {info.model}{' (default)' if info.is_default else ''}: {bpc} bits/char")


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
