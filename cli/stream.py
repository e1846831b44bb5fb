"""``nextchar stream`` and ``nextchar eval``: text through a session, predictions as they come.

On a terminal, ``stream`` is interactive: every key typed is sent at once and the
line shows what the model expects next. From a pipe or ``--file`` it prints one
line per character (or JSON Lines) and a summary with accuracy and bits/char, the
same figures ``eval`` reports for a whole file.
"""

from __future__ import annotations

import codecs
import io
import os
import queue
import sys
import termios
import threading
import tty
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer
from nextchar.cli.common import (
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
TAIL = 40  # characters of the typed text shown before the guesses
BACKSPACE, END = "\x7f", "\x04"

if TYPE_CHECKING:
    from nextchar.client.results import Predictions
    from nextchar.client.session import Item, Session

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
    top_k: TopKOpt = 3,
    chunk: ChunkOpt = 64,
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Stream text into a session and show the predicted next characters as they come.

    Interactive on a terminal: every key and paste is sent as typed, Backspace takes the
    last character back (the session rewinds), the likeliest next words are shown; Ctrl-D
    ends. From a pipe or --file: characters are sent as they arrive, one line per character
    (or JSON Lines with --json), then a summary with top-1 accuracy and bits/char. A dropped
    connection is resumed where it stopped.
    """
    if file is not None:  # refused as train and eval refuse it: empty, or not UTF-8 (a binary)
        TextFiles.of(file).count()
    with connect(server, timeout) as client:
        session = client.attach(session_id) if session_id else client.session(model)
        try:
            if file is None and sys.stdin.isatty():
                Typing(session, top_k).run()
                return
            with file.open("rb") if file else nullcontext(sys.stdin.buffer) as source:
                stats = StreamStats()
                for p in session.stream(pieces(cast(io.BufferedIOBase, source), chunk), top_k=top_k):
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


class Typing:
    """``nextchar stream`` on a terminal: a line that behaves like a text field.

    A thread reads the terminal in cbreak mode (every byte at once, so a paste arrives
    whole, newlines included) and turns keys into edits; the stream sends one edit per
    reply (lockstep), so Backspaces are never sent further back than the last reply said
    the session can go (``rewind_limit``), and keys typed meanwhile are sent together.
    Arrow keys and other escape sequences are ignored. A lost server ends the command at
    once, on a line of its own; the summary is printed on the way out.
    """

    def __init__(self, session: Session, top_k: int) -> None:
        self.session, self.top_k = session, top_k
        self.keys: queue.Queue[str | None] = queue.Queue()  # typed text, BACKSPACE, None at the end
        self.ready = threading.Event()  # the last edit sent has its reply
        self.typed: list[str] = []  # what the session holds, as far as this line shows it
        self.limit = 0  # characters the session can take back (the last reply's rewind_limit)
        self.rewinds = 0
        self.stats = StreamStats()
        self.flag = ""  # unknown characters of the last edit

    def run(self) -> None:
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)  # keys at once, no echo; Ctrl-C still interrupts
        threading.Thread(target=self._read_keys, args=(fd,), daemon=True, name="nextchar-keys").start()
        sys.stdout.write("type; every key is sent as you type, Backspace takes it back (Ctrl-D ends)\n")
        sys.stdout.flush()
        self.session.resume_attempts = 0  # a lost server is reported at once, not after retries
        try:
            self.ready.set()
            for p in self.session.stream(self._edits(), top_k=self.top_k):
                self._show(p)
                self.ready.set()
        except KeyboardInterrupt:
            pass  # Ctrl-C ends the line like Ctrl-D
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
            sys.stdout.write("\n")  # a lost server's error, or the summary, on a line of its own
            sys.stdout.flush()
        _print_summary({**self.stats.summary(self.session), "rewinds": self.rewinds}, False)

    def _read_keys(self, fd: int) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        while data := os.read(fd, READ_BYTES):
            for key in keys_of(decoder.decode(data)):
                if key == END:
                    self.keys.put(None)
                    return
                self.keys.put(key)
        self.keys.put(None)

    def _edits(self) -> Iterator[Item]:
        """One edit per reply: the rewind the Backspaces typed ask for, or the text typed."""
        from nextchar.client.results import Rewind

        pending: list[str] = []  # typed, not sent
        back, ended = 0, False  # Backspaces past pending, not sent
        while not ended or pending or back:
            self.ready.wait()
            if not ended:
                key = self.keys.get() if not (pending or back) else self._next_key()
                while key:  # "": nothing more typed yet; None: the end
                    if key != BACKSPACE:
                        pending.append(key)
                    elif pending:
                        pending.pop()
                    elif back < min(self.limit, len(self.typed)):
                        back += 1
                    else:
                        sys.stdout.write("\a")  # nothing more to take back
                    key = self._next_key()
                ended = key is None
            self.ready.clear()
            if back:  # before the text typed after the Backspaces
                self.rewinds += back
                del self.typed[len(self.typed) - back :]
                yield Rewind(back)
                back = 0
            elif pending:
                self.typed += pending
                yield "".join(pending)
                pending = []
            else:
                self.ready.set()

    def _next_key(self) -> str | None:
        """A key typed already ("" when none is waiting)."""
        try:
            return self.keys.get_nowait()
        except queue.Empty:
            return ""

    def _show(self, p: Predictions) -> None:
        self.stats.add(p)
        self.limit = p.rewind_limit
        if p.unknown_chars:
            self.flag = f"  (unknown to the model: {' '.join(show_char(c) for c in p.unknown_chars)})"
        elif len(p):
            self.flag = ""
        guesses = "  ".join(f"{show_char(c.char)} {c.prob:.0%}" for c in p.next)
        words = self._completions() if self.keys.empty() else ""
        tail = "".join(self.typed)[-TAIL:].replace("\n", "⏎")
        sys.stdout.write(f"\r\x1b[K{tail}  →  {guesses}   {words}{self.flag}")
        sys.stdout.flush()

    def _completions(self) -> str:
        from nextchar.client.errors import NextCharError

        try:
            return "  ".join(repr(c.text) for c in self.session.complete(3))
        except NextCharError:  # a server without Complete: the line goes on without words
            return ""


def keys_of(text: str) -> Iterator[str]:
    """Keys from what the terminal sent: characters to send, BACKSPACE, END; escape
    sequences (arrows, function keys, bracketed-paste marks) and other controls dropped."""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\x1b":
            i = _past_escape(text, i)
            continue
        i += 1
        if ch == "\x04":
            yield END
            return
        if ch in "\x7f\x08":
            yield BACKSPACE
        elif ch == "\r":
            yield "\n"
        elif ch.isprintable() or ch in "\n\t":
            yield ch


def _past_escape(text: str, i: int) -> int:
    """The index after the escape sequence at text[i] (CSI ``ESC [ ... final``, SS3 ``ESC O x``)."""
    if text.startswith("\x1b[", i):
        j = i + 2
        while j < len(text) and not "@" <= text[j] <= "~":
            j += 1
        return j + 1
    if text.startswith("\x1bO", i):
        return i + 3
    return i + 1 if i + 1 >= len(text) else i + 2  # ESC alone, or ESC + one key (Alt-key)


def evaluate(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="UTF-8 text to score.")],
    model: ModelOpt = "",
    chunk: ChunkOpt = 1024,
    as_json: JsonOpt = False,
    server: ServerOpt = DEFAULT_TARGET,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Score a model on a text: bits/char and top-1 accuracy, one hidden state carried through it."""
    text = TextFiles.of(file)
    text.count()  # the whole file checked before anything is scored; then read as it is sent
    with connect(server, timeout) as client, client.session(model) as session:
        stats = StreamStats()
        for p in session.stream(text.chunks(chunk), top_k=1):
            stats.add(p)
        _print_summary({"file": str(file), **stats.summary(session)}, as_json)
