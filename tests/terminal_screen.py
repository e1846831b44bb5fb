"""What a person sees: a command in a real pseudo-terminal, its output drawn by a terminal emulator.

The command runs in a pty of the given size, as the session leader with the pty as its
controlling terminal (so Ctrl-C, sent as a byte, reaches it as SIGINT); everything it
writes goes through pyte (a VT100/xterm emulator), so the tests read the screen as it
stands, lines and colours, not the escape sequences that drew it. The raw bytes are
kept too, for what leaves no trace on a screen (the bell).

It is started by subprocess (vfork and exec, ``setsid --ctty`` taking the terminal),
not by a fork of the test process: a fork runs gRPC's fork handlers, which restart its
pollers in the child, and those died on the descriptors a pty spawner closes, killing
the child now and then.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Sequence

import pyte


class TerminalScreen:
    def __init__(self, argv: Sequence[str], rows: int = 30, cols: int = 100) -> None:
        env = {**os.environ, "TERM": "xterm-256color"}
        for fixed in ("COLUMNS", "LINES", "NO_COLOR"):  # the size is the terminal's, and it has colours
            env.pop(fixed, None)
        self._master, tty = pty.openpty()
        fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(
            ["setsid", "--ctty", *argv], stdin=tty, stdout=tty, stderr=tty, env=env, close_fds=True
        )
        os.close(tty)
        self.screen = pyte.Screen(cols, rows)
        self._stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()
        self.ended = False

    @property
    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen.display)

    def line(self, pattern: str) -> int:
        """The row of the first screen line that matches pattern."""
        for row, line in enumerate(self.screen.display):
            if re.search(pattern, line):
                return row
        raise AssertionError(f"no line matches {pattern!r}:\n{self.text}")

    def rgb(self, row: int, col: int) -> tuple[int, int, int]:
        """The foreground colour of one cell, as red, green, blue."""
        fg = self.screen.buffer[row][col].fg
        assert re.fullmatch(r"[0-9a-f]{6}", fg), f"cell ({row}, {col}) has no RGB colour: {fg!r}"
        return int(fg[0:2], 16), int(fg[2:4], 16), int(fg[4:6], 16)

    def send(self, keys: str) -> None:
        os.write(self._master, keys.encode())

    def resize(self, rows: int, cols: int) -> None:
        """As a window is resized: the terminal's size changes and the command gets SIGWINCH."""
        self.screen.resize(rows, cols)
        fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def interrupt(self) -> None:
        """Ctrl-C: the terminal turns the byte into SIGINT for the command."""
        self.send("\x03")

    def wait_for(self, pattern: str, timeout: float = 15) -> re.Match[str]:
        """Read output until the screen shows pattern (a regex over its lines, joined by newlines)."""
        deadline = time.monotonic() + timeout
        while True:
            if match := re.search(pattern, self.text, re.MULTILINE):
                return match
            if self.ended or time.monotonic() > deadline:
                raise AssertionError(f"the screen never showed {pattern!r}:\n{self.text}")
            self._read(0.1)

    def finish(self, timeout: float = 15) -> int:
        """Read until the command exits; its exit status."""
        deadline = time.monotonic() + timeout
        while not self.ended and time.monotonic() < deadline:
            self._read(0.1)
        try:
            return self.proc.wait(max(0.1, deadline - time.monotonic()))
        finally:
            self._close_terminal()

    def close(self) -> None:
        """Stop the command if it still runs (a test that failed half way)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_terminal()

    def _close_terminal(self) -> None:
        if self._master >= 0:
            os.close(self._master)
            self._master = -1

    def output(self) -> str:
        """Everything written so far, escape sequences left out."""
        return re.sub(r"\x1b(\[[0-?]*[ -/]*[@-~]|[()][0-9A-Za-z]|.)", "", self.raw.decode("utf-8", "replace"))

    def _read(self, timeout: float) -> None:
        if not select.select([self._master], [], [], timeout)[0]:
            return
        try:
            data = os.read(self._master, 65536)
        except OSError:  # EIO: the command and everything it started have closed the terminal
            data = b""
        if not data:
            self.ended = True
            return
        self.raw += data
        self._stream.feed(data)
