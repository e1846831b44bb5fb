"""``nextchar jobs list|show|watch|cancel|resume``: the server's training jobs.

Jobs are durable: they outlive the ``train`` that started them and the server
itself, wait in a queue for a trainer, and resume from their checkpoints after a
restart. ``watch`` re-attaches to one (its records so far, then live), as the
``train`` that started it would have shown it.
"""

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
    fmt_float,
    print_json,
    print_table,
)
from nextchar.client.defaults import DEFAULT_TARGET, DEFAULT_TIMEOUT

if TYPE_CHECKING:
    from nextchar.client.results import Job

JobArg = Annotated[str, typer.Argument(help="Job id (nextchar jobs list shows them).")]

jobs_app = typer.Typer(
    help="List, show, watch, cancel and resume training jobs.",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings=HELP,
)
COLUMNS = ("job", "model", "state", "epoch", "progress", "bits/char", "started", "note")


def _row(job: Job) -> tuple[object, ...]:
    p = job.latest
    progress = f"{p.chars / p.total_chars:.0%}" if p and p.total_chars else "-"
    note = job.error or (f"place {job.queue_position} in the queue" if job.queue_position else "")
    if job.result is not None:
        note = f"registered {job.result}"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.started_at)) if job.started_at else "-"
    bpc = fmt_float(p.val_bpc if p and p.val_bpc is not None else p.train_bpc if p else None)
    return (job.job_id, job.model_name, job.state, p.epoch if p else "-", progress, bpc, started, note)


@jobs_app.command("list")
def list_jobs(
    as_json: JsonOpt = False, server: ServerOpt = DEFAULT_TARGET, timeout: TimeoutOpt = DEFAULT_TIMEOUT
) -> None:
    """Every job the server knows, oldest first: queued, running and ended."""
    with connect(server, timeout) as client:
        jobs = client.jobs()
    if as_json:
        print_json(jobs)
    else:
        print_table("training jobs", COLUMNS, [_row(j) for j in jobs])


@jobs_app.command("show")
def show(
    job_id: JobArg,
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """One job: its state, what it trains and how, how far it got, and what it registered or why it ended."""
    with connect(server, timeout) as client:
        job = client.job(job_id)
    if as_json:
        print_json(job)
        return
    p = job.latest
    rows: list[tuple[str, object]] = [
        (column, value) for column, value in zip(COLUMNS[1:], _row(job)[1:], strict=True) if value
    ]
    if p is not None and p.total_chars:
        rows.append(("characters", f"{p.chars:,} of {p.total_chars:,} (step {p.step:,})"))
    rows.append(("attempts", job.attempts))
    rows += [
        (key.replace("_", "-"), value) for key, value in {**job.model_config, **job.train_config}.items()
    ]
    print_table(f"job {job_id}", ("", "value"), rows)


@jobs_app.command("watch")
def watch(
    job_id: JobArg,
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Follow a job to its end, as the train that started it would; Ctrl-C stops watching (the
    job runs on: nextchar jobs cancel stops it)."""
    from nextchar.cli.follow import follow

    with connect(server, timeout) as client:
        run = client.watch_job(job_id)
        follow(client, run, client.job(job_id).model_name, as_json, started_here=False)


@jobs_app.command("cancel")
def cancel(
    job_id: JobArg,
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Stop a queued or running job; it registers nothing."""
    with connect(server, timeout) as client:
        job = client.cancel_job(job_id)
    said = {"cancelled": "cancelled", "running": "cancelling"}.get(job.state, f"already {job.state}")
    _report(job, as_json, f"job {job_id}: {said}")


@jobs_app.command("resume")
def resume(
    job_id: JobArg,
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Queue a failed job again: it goes on from its last checkpoint."""
    with connect(server, timeout) as client:
        job = client.resume_job(job_id)
    _report(
        job, as_json, f"job {job_id}: queued again, place {job.queue_position}; nextchar jobs watch {job_id}"
    )


def _report(job: Job, as_json: bool, line: str) -> None:
    """What a job command answers: the job as JSON, or a line for a person."""
    if as_json:
        print_json(job)
    else:
        typer.echo(line)
