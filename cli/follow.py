"""Following a training job on the server to its end: ``nextchar train`` and ``jobs watch``.

The job runs in a trainer process; this only watches its events, showing them in a
progress view (nextchar.cli.progress), then says what was registered and which epoch's
weights were kept. Ctrl-C asks whether to cancel the job only when this command started
it, and cancels only on an exact answer (``c``/``cancel``; ``l``/``leave`` or Enter
leaves it): a command typed ahead at the prompt by mistake once cancelled a 40-epoch job.
A second Ctrl-C, or no terminal to ask on, leaves the job running and says how to find
it again. ``jobs watch`` only re-attached: Ctrl-C there stops watching.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import typer
from nextchar.cli.common import fmt_float, print_json
from nextchar.cli.progress import progress_view

if TYPE_CHECKING:
    from nextchar.client.library import NextCharClient
    from nextchar.client.results import Progress
    from nextchar.client.training import TrainingRun


def follow(client: NextCharClient, run: TrainingRun, name: str, as_json: bool, *, started_here: bool) -> None:
    """Watch the job to its end, then say what was registered. Ctrl-C asks whether to cancel
    it or leave it running when this command started it (started_here); a watch that only
    re-attached stops watching and touches nothing."""
    try:
        with progress_view(f"training {name}", as_json) as view:
            if run.job is not None:  # the status start_training waited for: queued, or running
                view.status(run.job)
            for event in run:
                view.status(event.job)
                if event.progress is not None:
                    view.update(event.progress)
        job = run.wait()  # the stream has ended: the job's last status
    except KeyboardInterrupt:
        if started_here:
            _interrupted(run)
        else:
            run.detach()
            typer.echo(f"\nstopped watching; {_runs_on(run.job_id)}", err=True)
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


ANSWERS = {"": "leave", "l": "leave", "leave": "leave", "c": "cancel", "cancel": "cancel"}


def _runs_on(job_id: str) -> str:
    return (
        f"training job {job_id} keeps running on the server: nextchar jobs watch {job_id} follows it, "
        f"nextchar jobs cancel {job_id} stops it"
    )


def _interrupted(run: TrainingRun) -> None:
    """Ctrl-C while following a job this command started: cancel only on an exact answer. Without
    a terminal to answer on, or on a second Ctrl-C (or end of input) at the question, the job
    is left running, and the last line says so and how to find it again."""
    job_id = run.job_id
    question = f"\ntraining job {job_id}: cancel it, or leave it running? [c]ancel / [l]eave (l)"
    choice = _ask(question) if sys.stdin.isatty() else "leave"
    if choice == "cancel":
        run.cancel()
        typer.echo(f"training job {job_id} cancelled; nothing is registered", err=True)
    else:
        run.detach()
        typer.echo(_runs_on(job_id), err=True)


def _ask(question: str) -> str:
    """An answer from ANSWERS, asked again until one comes; "leave" when the question is interrupted."""
    while True:
        try:
            answer = typer.prompt(question, default="", show_default=False, err=True)
        except typer.Abort:  # Ctrl-C or Ctrl-D at the question
            typer.echo("", err=True)
            return "leave"
        choice = ANSWERS.get(answer.strip().lower())
        if choice is not None:
            return choice
        typer.echo(f"{answer.strip()!r} is no answer: type c (cancel) or l (leave)", err=True)
