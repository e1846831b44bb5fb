"""``nextchar stream`` on a terminal: a small full-screen view of a session being typed into.

Every key is sent as it is typed; the screen shows what the session holds and what
the model makes of it (the shipped model, after a paste)::

     nextchar stream · default:v1 · offset 144 · 1.98 bits/char · Backspace: 144 back
    ROMEO:
    But soft, what light through yonder window breaks?
    It is the east, and Juliet is the sun.

    JULIET:
    O Romeo, Romeo, wherefore art thou Rom▌

    next   e 78%   a 18%   o 2%
    words  Romeo 37%   Rome 12%   Roman 8%
    Tab: Romeo · Backspace takes back · Ctrl-D ends   surprise ■■■■■ 0 → 8+ bits

The text is shaded by surprisal, character by character (green: expected, red: a
surprise), and wraps, so a paste keeps its context. The status line says which model
answers, the session's offset, the running bits/char and how far Backspace can go
(the server's rewind limit). Below: the likeliest next characters (those under 0.5%
left out) and the likeliest whole words (the server's Complete); Tab sends the best
one as if typed. Ctrl-D, Ctrl-C and a server lost mid-stream all leave the view and
print the text and the summary.

rich draws it (already the CLI's table printer); input needs no more than the few
keys of nextchar.cli.keys, read by a thread in cbreak mode. The stream runs in
lockstep, one edit per reply: Backspaces are never sent further back than the last
reply said the session can go, keys typed meanwhile are sent together, and the
completions shown are always those of the text on screen.
"""

from __future__ import annotations

import itertools
import os
import queue
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Iterator
from typing import TYPE_CHECKING

from nextchar.cli.common import show_char
from nextchar.cli.keys import BRACKETED_PASTE_OFF, BRACKETED_PASTE_ON, Key, KeyReader
from nextchar.cli.stream import READ_BYTES, StreamStats, print_summary
from nextchar.client.errors import NextCharError
from nextchar.client.results import Completion, Rewind
from nextchar.core.completion import is_word_char
from rich.color import Color
from rich.console import Console, Group
from rich.live import Live
from rich.style import Style
from rich.text import Span, Text

if TYPE_CHECKING:
    from nextchar.client.results import Candidate, Predictions
    from nextchar.client.session import Item, Session

HOT_BITS = 8.0  # a character this surprising, or more, is shown fully red
HIDDEN_BELOW = 0.005  # a next-character candidate that would read "0%" is left out
WORDS = 3  # completions asked for after each reply
KEPT_ON_EXIT = 2000  # characters of the typed text printed when the view closes
FOOTER_ROWS = 4  # the blank line, next, words, help
PASTE_FRAME_SECONDS = 0.1  # a screenful of shaded text takes 2-20 ms to draw; a paste comes in pieces


class TypingView:
    """The view's state and its loop; ``run`` returns when the person or the server ends it."""

    def __init__(self, session: Session, top_k: int, chunk: int) -> None:
        self.session, self.top_k, self.chunk = session, top_k, chunk  # chunk: characters per message
        self.keys: queue.Queue[str | Key] = queue.Queue()  # Key.END once, last
        self.ready = threading.Event()  # the last edit sent has its reply: the state below is current
        self.base = session.offset  # the session's offset when the view opened: typed[0] is here
        self.typed: list[str] = []  # what the session holds since base, as the server acknowledged
        self.shades: list[int | None] = []  # each one's surprisal as a step of SHADES (None: unscored)
        self.limit = 0  # characters the session can take back (the last reply's rewind_limit)
        self.rewinds = 0
        self.stats = StreamStats()
        self.next: tuple[Candidate, ...] = ()
        self.words: list[Completion] = []  # completions of the text on screen ([] while keys wait)
        self.unsent = 0  # characters typed or pasted that wait for the reply to the edit sent
        self.unknown = ""  # characters of the last edit the model does not know
        self.console = Console(highlight=False)
        # Between replies nothing above changes: a resized terminal is redrawn at once then.
        # (Signal handlers run in the main thread, which may be half way through a reply.)
        self.waiting = False
        self.resized = False  # since the last drawing began
        self.drawn_at = 0.0  # when (time.monotonic)

    def run(self) -> None:
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
        self.session.resume_attempts = 0  # a lost server is reported at once, not after retries
        try:
            tty.setcbreak(fd)  # keys at once, no echo; Ctrl-C still interrupts
            threading.Thread(target=self._read_keys, args=(fd,), daemon=True, name="nextchar-keys").start()
            with Live(
                get_renderable=self._frame,
                console=self.console,
                screen=True,
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=False,
            ) as live:
                self._write(BRACKETED_PASTE_ON)
                resized = signal.signal(signal.SIGWINCH, lambda *_: self._redraw(live))
                try:
                    self.words = self._completions()  # a word to start with, before any key
                    self._draw(live)
                    self.waiting = True
                    self.ready.set()
                    for p in self.session.stream(self._edits(), top_k=self.top_k):
                        self.waiting = False
                        self._take(p)
                        if not self.unsent or time.monotonic() - self.drawn_at >= PASTE_FRAME_SECONDS:
                            self._draw(live)  # a long paste is drawn a few times a second, not per piece
                        self.waiting = True
                        if self.resized:  # during the drawing, which may have had the old size
                            self._draw(live)
                        self.ready.set()
                except KeyboardInterrupt:
                    pass  # Ctrl-C ends the view like Ctrl-D
                finally:
                    signal.signal(signal.SIGWINCH, resized)
                    self._write(BRACKETED_PASTE_OFF)
        finally:  # the summary on every way out, a lost server's error after it
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
            self._print_text()
            print_summary({**self.stats.summary(self.session), "rewinds": self.rewinds}, False)

    def _draw(self, live: Live) -> None:
        self.resized, self.drawn_at = False, time.monotonic()
        live.refresh()

    def _redraw(self, live: Live) -> None:
        """SIGWINCH: the new size drawn now, or once the reply being taken in is drawn."""
        self.resized = True
        if self.waiting:
            self.waiting = False  # a second signal in the middle of this drawing waits for its end
            self._draw(live)
            self.waiting = True

    # ------------------------------------------------------------ keys to edits (the stream's thread)

    def _read_keys(self, fd: int) -> None:
        reader = KeyReader()
        while data := os.read(fd, READ_BYTES):
            for key in reader.feed(data):
                self.keys.put(key)
                if key is Key.END:
                    return
        self.keys.put(Key.END)

    def _edits(self) -> Iterator[Item]:
        """One edit per reply: the rewind the Backspaces typed ask for, the text typed, or the
        completion a Tab accepted (once what was typed before it has its reply)."""
        pending: list[str] = []  # typed, not sent
        back, ended, tab = 0, False, False  # Backspaces past pending, not sent; the end; a Tab to do
        while not ended or pending or back:
            self.ready.wait()
            key: str | Key | None = None  # a Tab waits for the reply to what came before it
            if not (ended or tab):
                key = self._next_key() if pending or back else self.keys.get()
            while key is not None:
                if key is Key.END:
                    ended = True
                    break
                if key is Key.TAB:
                    tab = True
                    break
                if key is not Key.BACKSPACE:
                    pending.append(key)
                elif pending:
                    pending.pop()
                elif back < min(self.limit, len(self.typed)):
                    back += 1
                else:
                    self._write("\a")  # nothing more to take back
                key = self._next_key()
            self.ready.clear()
            if back:  # before the text typed after the Backspaces
                self.rewinds += back
                self.unsent = len(pending)
                yield Rewind(back)
                back = 0
            elif pending:  # a long paste goes in pieces the server takes, one per reply
                piece = "".join(pending[: self.chunk])
                del pending[: self.chunk]
                self.unsent = len(pending)
                yield piece
            elif tab and (best := self._best_word()):
                tab = False
                yield best
            else:
                if tab:
                    self._write("\a")  # no completion to accept
                tab = False
                self.ready.set()

    def _next_key(self) -> str | Key | None:
        """A key typed already (None when none is waiting)."""
        try:
            return self.keys.get_nowait()
        except queue.Empty:
            return None

    def _best_word(self) -> str:
        """The best completion of the text as it stands: the one on screen, or asked for now
        when keys typed ahead kept the view from asking."""
        words = self.words or self._completions()
        return words[0].text if words else ""

    # ------------------------------------------------------------ replies to state (the main thread)

    def _take(self, p: Predictions) -> None:
        self.stats.add(p)
        kept = p.start_offset - self.base  # a rewind's reply starts where the session went back to
        del self.typed[kept:], self.shades[kept:]
        self.typed += p.text[: len(p)]
        self.shades += [_shade(bits) if offset > 0 else None for offset, bits in _offsets(p)]
        self.limit, self.next = p.rewind_limit, p.next
        if len(p):
            self.unknown = p.unknown_chars
        self.words = [] if self.unsent or not self.keys.empty() else self._completions()

    def _completions(self) -> list[Completion]:
        try:
            return self.session.complete(WORDS)
        except NextCharError:  # words are a nicety: without them (no Complete) the view goes on
            return []

    # ------------------------------------------------------------ drawing

    def _frame(self) -> Group:
        width, height = self.console.size
        return Group(
            self._status(width),
            self._text(width, max(1, height - 1 - FOOTER_ROWS)),
            Text(),
            self._next_row(),
            _row("words", [f"{_whole_word(self.typed, w)} {_percent(w.prob)}" for w in self.words]),
            self._help(),
        )

    def _status(self, width: int) -> Text:
        bpc = self.stats.bits / self.stats.scored if self.stats.scored else None
        parts = [
            "nextchar stream",
            str(self.session.model),
            f"offset {self.base + len(self.typed)}",
            f"{bpc:.2f} bits/char" if bpc is not None else "- bits/char",
            f"Backspace: {min(self.limit, len(self.typed))} back",
        ]
        line = Text(" " + " · ".join(parts), style="reverse", no_wrap=True, overflow="ellipsis")
        line.pad_right(width - line.cell_len)
        return line

    def _next_row(self) -> Text:
        row = _row("next", [f"{show_char(c.char)} {c.prob:.0%}" for c in self.next if c.prob >= HIDDEN_BELOW])
        if self.unknown:
            row.append(
                f"      unknown to the model: {' '.join(show_char(c) for c in self.unknown)}", "yellow"
            )
        return row

    def _text(self, width: int, rows: int) -> Text:
        """The typed text, shaded, its last rows lines as wrapped at width, and the cursor."""
        start = max(0, len(self.typed) - width * rows)  # every line shown holds at least one of these
        text = _shaded(self.typed[start:], self.shades[start:])
        text.append("▌", style="blink")
        lines = list(text.wrap(self.console, width))[-rows:]
        return Text("\n").join([*lines, *[Text()] * (rows - len(lines))])  # the footer stays at the bottom

    def _help(self) -> Text:
        best = _whole_word(self.typed, self.words[0]) if self.words else ""
        help_line = Text(f"Tab: {best} · " if best else "", style="bold")
        help_line.append("Backspace takes back · Ctrl-D ends", style="dim")
        legend = Text("   surprise ", style="dim")
        for step in range(5):
            legend.append("■", style=SHADES[2 * step])
        legend.append(f" 0 → {HOT_BITS:.0f}+ bits", style="dim")
        return Text.assemble(help_line, legend, no_wrap=True, overflow="ellipsis")

    def _print_text(self) -> None:
        """The text typed, shaded, left on the terminal after the view has gone."""
        start = max(0, len(self.typed) - KEPT_ON_EXIT)
        if self.typed:
            self.console.print(
                Text("…" if start else "") + _shaded(self.typed[start:], self.shades[start:]), soft_wrap=False
            )

    def _write(self, control: str) -> None:
        sys.stdout.write(control)
        sys.stdout.flush()


def _offsets(p: Predictions) -> Iterator[tuple[int, float]]:
    return ((p.start_offset + i, bits) for i, bits in enumerate(p.surprisal_bits))


def _shaded(chars: list[str], shades: list[int | None]) -> Text:
    """The characters, each in its shade: one span per run of equal shades (a span per
    character would make a screenful of text slow to draw)."""
    spans, start = [], 0
    for shade, run in itertools.groupby(shades):
        end = start + len(list(run))
        if shade is not None:
            spans.append(Span(start, end, SHADES[shade]))
        start = end
    return Text("".join(chars), spans=spans)


def _shade(bits: float) -> int:
    """A surprisal as a step of SHADES: eighths of HOT_BITS."""
    return round(8 * min(max(bits, 0.0), HOT_BITS) / HOT_BITS)


def _rgb(x: float) -> Style:
    """Green (x = 0, expected) through yellow to red (x = 1, a surprise)."""
    red, green = (int(255 * 2 * x), 200) if x < 0.5 else (255, int(200 * 2 * (1 - x)))
    return Style(color=Color.from_rgb(min(red, 255), green, 0))


SHADES = [_rgb(step / 8) for step in range(9)]


def _whole_word(typed: list[str], c: Completion) -> str:
    """A completion as the word it makes, on one line: the word being typed and its
    continuation ("wo" + "rld": "world"); one that starts a new word shown as it goes on,
    its leading spaces and any newline made visible (" world": "␠world", ",\\nAnd")."""
    text = c.text
    if text and is_word_char(text[0]):
        start = len(typed)
        while start and is_word_char(typed[start - 1]):
            start -= 1
        text = "".join(typed[start:]) + text
    lead = len(text) - len(text.lstrip(" "))
    return "".join(show_char(ch) if i < lead or not ch.isprintable() else ch for i, ch in enumerate(text))


def _percent(prob: float) -> str:
    return f"{prob:.0%}" if prob >= HIDDEN_BELOW else "<1%"


def _row(label: str, items: list[str]) -> Text:
    return Text.assemble((f"{label:<7}", "dim"), "   ".join(items), no_wrap=True, overflow="ellipsis")
