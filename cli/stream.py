"""``nextchar stream`` and ``nextchar eval``: text through a session, predictions as they come.

On a terminal, ``stream`` is interactive: every key typed is sent at once and the
line shows what the model expects next. From a pipe or ``--file`` it prints one
line per character (or JSON Lines) and a summary with accuracy and bits/char, the
same figures ``eval`` reports for a whole file.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from nextchar.cli.common import (
    JsonOpt,
    ModelOpt,
    ServerOpt,
    TimeoutOpt,
    TopKOpt,
    connect,
    console,
    fmt_float,
    print_json,
    print_table,
    show_char,
)
from nextchar.client.defaults import DEFAULT_TARGET, DEFAULT_TIMEOUT

if TYPE_CHECKING:
    from nextchar.client.results import Predictions
    from nextchar.client.session import Session

ChunkOpt = Annotated[int, typer.Option("--chunk", min=1, help="Characters per message sent to the server.")]


@dataclass
class StreamStats:
    """Top-1 accuracy and bits/char over a stream, scored the way nextchar.core.evaluate scores a text.

    The first character of a session (offset 0) has no context, so it is not scored;
    characters whose predictions were lost in a resumed drop are not scored either.
    """

    chars: int = 0
    scored: int = 0
    bits: float = 0.0
    judged: int = 0
    correct: int = 0
    _guess: str = ""  # the top-1 prediction for the character at _guess_offset
    _guess_offset: int = -1

    def add(self, p: Predictions) -> None:
        guesses, surprisal = p.next_chars, p.surprisal_bits
        for i, char in enumerate(p.text[: len(p)]):
            offset = p.start_offset + i
            if offset > 0:
                self.scored += 1
                self.bits += surprisal[i]
            if offset == self._guess_offset:
                self.judged += 1
                self.correct += char == self._guess
            self._guess, self._guess_offset = guesses[i], offset + 1
        self.chars += len(p)

    def summary(self, session: Session) -> dict[str, object]:
        return {
            "session_id": session.id,
            "model": str(session.model),
            "chars": self.chars,
            "bits_per_char": self.bits / self.scored if self.scored else None,
            "accuracy": self.correct / self.judged if self.judged else None,
            "resumes": session.resumes,
            "lost_chars": session.lost_chars,
        }


def chunked(lines: Iterable[str], size: int) -> Iterator[str]:
    """Lines (or any text pieces) cut to at most size characters, none empty."""
    for line in lines:
        for start in range(0, len(line), size):
            yield line[start : start + size]


def stream(
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", exists=True, dir_okay=False, help="Read the text from FILE, not stdin."),
    ] = None,
    session_id: Annotated[
        str, typer.Option("--session", help="Attach to this live session instead of opening a new one.")
    ] = "",
    keep: Annotated[bool, typer.Option(help="Leave a session this command opened alive at the end.")] = False,
    model: ModelOpt = "",
    top_k: TopKOpt = 3,
    chunk: ChunkOpt = 64,
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Stream text into a session and show the predicted next characters as they come.

    Interactive on a terminal (each key is sent as you type; Ctrl-D ends). From a pipe
    or --file: one line per character (or JSON Lines with --json) and a summary with
    top-1 accuracy and bits/char. A dropped connection is resumed where it stopped.
    """
    with connect(server, timeout) as client:
        session = client.attach(session_id) if session_id else client.session(model)
        try:
            if file is None and sys.stdin.isatty():
                _interactive(session, top_k)
                return
            with file.open() if file else nullcontext(sys.stdin) as text:
                stats = StreamStats()
                for p in session.stream(chunked(text, chunk), top_k=top_k):
                    stats.add(p)
                    print_predictions(p, as_json)
                _print_summary(stats.summary(session), as_json)
        finally:
            if not (session_id or keep):
                session.close()


def print_predictions(p: Predictions, as_json: bool) -> None:
    for cp in p:
        if as_json:
            top = [{"char": c.char, "prob": c.prob} for c in cp.top]
            print_json(
                {
                    "offset": cp.offset,
                    "char": cp.char,
                    "surprisal_bits": cp.surprisal_bits,
                    "top": top,
                    "unknown": cp.unknown,
                }
            )
        else:
            guesses = "  ".join(f"{show_char(c.char)} {c.prob:.3f}" for c in cp.top)
            flag = "  (unknown to the model)" if cp.unknown else ""
            typer.echo(
                f"{cp.offset:>7}  {show_char(cp.char):<4} {cp.surprisal_bits:6.2f} bits  next: {guesses}{flag}"
            )


def _print_summary(summary: dict[str, object], as_json: bool) -> None:
    if as_json:
        print_json({"summary": summary})
        return
    rows = [
        (key.replace("_", " "), fmt_float(v) if isinstance(v, float) else v) for key, v in summary.items()
    ]
    print_table("summary", ("", "value"), rows)


def _interactive(session: Session, top_k: int) -> None:
    """Per keystroke: send the key, redraw the line with the typed tail and the next-character guesses."""
    typed: list[str] = []

    def keys() -> Iterator[str]:
        while True:
            try:
                key = typer.getchar()
            except (EOFError, KeyboardInterrupt):
                return
            if key == "\x1b":
                return
            key = "\n" if key == "\r" else key
            if key.isprintable() or key == "\n":
                typed.append(key)
                yield key

    console().print("[dim]type; each key is sent as you type (Ctrl-D or Esc ends)[/dim]")
    for p in session.stream(keys(), top_k=top_k):
        guesses = "  ".join(f"{show_char(c.char)} {c.prob:.0%}" for c in p[-1].top)
        tail = "".join(typed)[-40:].replace("\n", "⏎")
        sys.stdout.write(f"\r\x1b[K{tail}  →  {guesses}")
        sys.stdout.flush()
    sys.stdout.write("\n")


def evaluate(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="UTF-8 text to score.")],
    model: ModelOpt = "",
    chunk: ChunkOpt = 1024,
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Score a model on a text: bits/char and top-1 accuracy, one hidden state carried through it."""
    text = file.read_text()
    with connect(server, timeout) as client, client.session(model) as session:
        stats = StreamStats()
        for p in session.stream(chunked([text], chunk), top_k=1):
            stats.add(p)
        _print_summary({"file": str(file), **stats.summary(session)}, as_json)
