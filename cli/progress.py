"""How a training run's progress is shown: a live bar on a terminal, plain lines elsewhere.

``train`` and ``jobs watch`` (and ``train --local``) hand every progress record and
job status to one of these. On a terminal a rich bar redraws in place; without one
(``> log``, ``| tail``) a bar prints nothing until it stops and then a garbled last
frame, so a plain line per epoch (and one when the job is queued) is written instead,
each flushed as it happens. ``--json`` prints the records themselves.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import typer
from nextchar.cli.common import fmt_float, print_json

if TYPE_CHECKING:
    from nextchar.client.results import Job, Progress


class ProgressView:
    """What a view is shown: progress records and job statuses; as a context, its start and end."""

    def update(self, p: Progress) -> None:
        raise NotImplementedError

    def status(self, job: Job) -> None:
        """A job's status (a training job on the server; a local run has none)."""

    def __enter__(self) -> ProgressView:
        return self

    def __exit__(self, *exc: object) -> None:
        """Nothing to undo, but for a bar."""


def stats(p: Progress) -> str:
    """One record as a person reads it: epoch, loss, bits/char, throughput and time left."""
    val = f"  val {fmt_float(p.val_bpc, 2)}" if p.val_bpc is not None else ""
    eta = f"{p.eta_seconds:.0f} s" if p.eta_seconds is not None else "?"
    rate = f"{p.chars_per_sec:,.0f}" if p.chars_per_sec is not None else "?"
    return (
        f"epoch {p.epoch}  loss {fmt_float(p.train_loss)}  {fmt_float(p.train_bpc, 2)} bits/char{val}"
        f"  {rate} chars/s  ETA {eta}"
    )


# a record of kind "tune": the training is done, the run measures its adaptation (nextchar.core.train)
TUNING = "trained; tuning the adaptation rate on the validation text"


def queued(job: Job) -> str:
    return f"queued, place {job.queue_position}" if job.queue_position else "queued"


class TrainingBar(ProgressView):
    """A live bar on stderr: progress through the characters, loss, bits/char, chars/s and ETA."""

    def __init__(self, title: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, TaskProgressColumn, TextColumn
        from rich.progress import Progress as RichProgress

        self.title = title
        self.bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[stats]}"),
            console=Console(stderr=True),
        )
        self.task = self.bar.add_task(title, total=None, stats="starting")

    def update(self, p: Progress) -> None:
        shown = TUNING if p.kind == "tune" else stats(p)
        self.bar.update(self.task, total=p.total_chars, completed=p.chars, stats=shown)

    def status(self, job: Job) -> None:
        waiting = f"{self.title}: {queued(job)}" if job.state == "queued" else self.title
        self.bar.update(self.task, description=waiting)

    def __enter__(self) -> TrainingBar:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()


class EpochLines(ProgressView):
    """Without a terminal: a line on stderr per epoch, and one each time the queue place changes."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.waiting = ""  # the last queue status said

    def update(self, p: Progress) -> None:
        if p.kind == "epoch":
            done = f" ({p.chars / p.total_chars:.0%})" if p.total_chars else ""
            self._say(f"{stats(p)}{done}")
        elif p.kind == "tune":
            self._say(TUNING)

    def status(self, job: Job) -> None:
        waiting = queued(job) if job.state == "queued" else ""
        if waiting and waiting != self.waiting:
            self._say(waiting)
        self.waiting = waiting

    def _say(self, line: str) -> None:
        typer.echo(f"{self.title}: {line}", err=True)  # echo flushes: each line when it happens


class JsonRecords(ProgressView):
    """--json: every progress record as a JSON line on stdout; statuses are not records."""

    def update(self, p: Progress) -> None:
        print_json(p)


def progress_view(title: str, as_json: bool) -> ProgressView:
    """The view for where the output goes: JSON records, a bar on a terminal, or plain lines."""
    if as_json:
        return JsonRecords()
    return TrainingBar(title) if sys.stderr.isatty() else EpochLines(title)
