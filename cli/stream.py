"""``nextchar stream`` and ``nextchar eval``: text through a session, predictions as they come.

On a terminal, ``stream`` is interactive: every key typed is sent at once and a
full-screen view (nextchar.cli.typing_view) shows what the model makes of it. From
a pipe or ``--file`` it prints one line per character (or JSON Lines) and a summary
with accuracy and bits/char, the same figures ``eval`` reports for a whole file.
"""

from __future__ import annotations

import codecs
import io
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer
from nextchar.cli.common import (
    AdaptOpt,
    JsonOpt,
    ModelOpt,
    ServerOpt,
    TimeoutOpt,
    TopKOpt,
    connect,
    fmt_float,
    print_json,
    print_table,
    show_char,
)
from nextchar.client.defaults import DEFAULT_TARGET, DEFAULT_TIMEOUT
from nextchar.client.texts import TextFiles

READ_BYTES = 4096  # one read of a pipe or the terminal: a paste of this size arrives at once

if TYPE_CHECKING:
    from nextchar.client.library import NextCharClient
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
        if not len(p) and p.next:  # a rewind: the guess is now for the character after the new end
            self._guess, self._guess_offset = p.next[0].char, p.start_offset
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
            "adaptive": session.info.adaptive,
        }


def pieces(source: io.BufferedIOBase, size: int) -> Iterator[str]:
    """The text arriving on source, as it arrives: whatever one read returns (``read1``: a
    pipe's writer may pause mid-line), decoded as UTF-8 (a character split between reads
    waits for its rest; bytes that are not UTF-8 become U+FFFD), at most size characters a piece."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    while True:
        data = source.read1(READ_BYTES)
        text = decoder.decode(data, final=not data)
        for start in range(0, len(text), size):
            yield text[start : start + size]
        if not data:
            return


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
    adapt: AdaptOpt = None,
    top_k: TopKOpt = 3,
    chunk: ChunkOpt = 64,
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Stream text into a session and show the predicted next characters as they come.

    Interactive on a terminal: a full-screen view where every key and paste is sent as
    typed, the text is shaded by surprisal, the likeliest next characters and words are
    shown, Tab accepts the best word, Backspace takes the last character back (the session
    rewinds); Ctrl-D or Ctrl-C ends, with a summary. From a pipe or --file: characters are
    sent as they arrive, one line per character (or JSON Lines with --json), then a summary
    with top-1 accuracy and bits/char. A dropped connection is resumed where it stopped.
    """
    if file is not None:  # refused as train and eval refuse it: empty, or not UTF-8 (a binary)
        TextFiles.of(file).count()
    with connect(server, timeout) as client:
        session = client.attach(session_id) if session_id else client.session(model, adapt=adapt)
        try:
            # the view for a person at a terminal; lines for `| tee log`, and JSON when asked for
            if file is None and sys.stdin.isatty() and sys.stdout.isatty() and not as_json:
                from nextchar.cli.typing_view import TypingView

                TypingView(session, top_k, chunk).run()
                return
            with file.open("rb") if file else nullcontext(sys.stdin.buffer) as source:
                stats = StreamStats()
                for p in session.stream(pieces(cast(io.BufferedIOBase, source), chunk), top_k=top_k):
                    stats.add(p)
                    print_predictions(p, as_json)
                print_summary(stats.summary(session), as_json)
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


def print_summary(summary: dict[str, object], as_json: bool) -> None:
    if as_json:
        print_json({"summary": summary})
        return
    rows = [
        (key.replace("_", " "), fmt_float(v) if isinstance(v, float) else v) for key, v in summary.items()
    ]
    print_table("summary", ("", "value"), rows)


def evaluate(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="UTF-8 text to score.")],
    model: ModelOpt = "",
    chunk: ChunkOpt = 1024,
    adapt: Annotated[
        bool,
        typer.Option(
            "--adapt",
            help="Also score it with a session that learns the text as it goes (docs/adaptation.md): "
            "static and adapted figures side by side.",
        ),
    ] = False,
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Score a model on a text: bits/char and top-1 accuracy, one hidden state carried through it.

    With --adapt the text goes through two sessions of the model, one static and one that adapts,
    and both are shown, with the change."""
    text = TextFiles.of(file)
    text.count()  # the whole file checked before anything is scored; then read as it is sent
    with connect(server, timeout) as client:
        if not adapt:
            print_summary({"file": str(file), **score(client, model, text, chunk, None)}, as_json)
            return
        static = score(client, model, text, chunk, False)
        adapted = score(client, model, text, chunk, True)
    change = relative(static["bits_per_char"], adapted["bits_per_char"])
    if as_json:
        print_json({"summary": {"file": str(file), "static": static, "adapted": adapted, "change": change}})
        return

    def figure(value: object) -> str:
        return fmt_float(value) if isinstance(value, float) else "-"

    rows = [
        (name, f"{s['chars']:,}", figure(s["bits_per_char"]), figure(s["accuracy"]))
        for name, s in (("static", static), ("adapted", adapted))
    ]
    rows.append(("change", "", f"{change:+.1%}" if change is not None else "-", ""))
    print_table(f"{file} on {static['model']}", ("", "chars", "bits/char", "accuracy"), rows)


def score(
    client: NextCharClient, model: str, text: TextFiles, chunk: int, adapt: bool | None
) -> dict[str, object]:
    """text streamed through a new session of model (adaptive or not; None: the server's default):
    its StreamStats summary."""
    with client.session(model, adapt=adapt) as session:
        stats = StreamStats()
        for p in session.stream(text.chunks(chunk), top_k=1):
            stats.add(p)
        return stats.summary(session)


def relative(static: object, adapted: object) -> float | None:
    """The adapted bits/char against the static, as a fraction (-0.2: 20% fewer)."""
    if isinstance(static, float) and isinstance(adapted, float) and static:
        return adapted / static - 1
    return None
