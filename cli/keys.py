"""Keys from a terminal in cbreak mode: the text typed or pasted, and the few keys that edit.

The interactive ``nextchar stream`` reads the terminal byte by byte as it arrives
(a paste comes whole, newlines included) and needs to tell apart what the person
typed to be sent from what they pressed to edit: Backspace, Tab (accept the best
completion) and Ctrl-D (the end). Bracketed paste is switched on, so a Tab, Ctrl-D
or Backspace inside pasted text is text (or dropped), never a command. Arrow keys,
function keys and other escape sequences are dropped, also when a read splits them.
"""

from __future__ import annotations

import codecs
import enum
from collections.abc import Iterator

PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"
BRACKETED_PASTE_ON, BRACKETED_PASTE_OFF = "\x1b[?2004h", "\x1b[?2004l"


class Key(enum.Enum):
    BACKSPACE = "backspace"
    TAB = "tab"
    END = "end"


class KeyReader:
    """Bytes read from the terminal in, keys out: a character of text, or a Key.

    State carries across reads: a UTF-8 character or an escape sequence split
    between two reads waits for its rest, and a paste lasts until its end mark.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._carry = ""  # an escape sequence whose end has not arrived yet
        self.pasting = False

    def feed(self, data: bytes) -> Iterator[str | Key]:
        text = self._carry + self._decoder.decode(data)
        self._carry = ""
        i = 0
        while i < len(text):
            ch = text[i]
            if ch == "\x1b":
                end = _past_escape(text, i)
                if end is None:  # the rest comes with the next read
                    self._carry = text[i:]
                    return
                mark = text[i:end]
                if mark in (PASTE_START, PASTE_END):
                    self.pasting = mark == PASTE_START
                i = end
                continue
            i += 1
            if key := self._key(ch):
                yield key

    def _key(self, ch: str) -> str | Key | None:
        if ch == "\r":
            return "\n"
        if ch.isprintable() or ch == "\n" or (ch == "\t" and self.pasting):
            return ch
        if self.pasting:  # a control character inside pasted text edits nothing
            return None
        if ch == "\t":
            return Key.TAB
        if ch in "\x7f\x08":
            return Key.BACKSPACE
        if ch == "\x04":
            return Key.END
        return None


def _past_escape(text: str, i: int) -> int | None:
    """The index after the escape sequence at text[i] (CSI ``ESC [ ... final``, SS3 ``ESC O x``,
    or ESC and one key: Alt-key); None when text ends before the sequence does. An ESC
    that ends the text is the Escape key alone: dropped."""
    if text.startswith("\x1b[", i):
        j = i + 2
        while j < len(text) and not "@" <= text[j] <= "~":
            j += 1
        return j + 1 if j < len(text) else None
    if text.startswith("\x1bO", i):
        return i + 3 if i + 3 <= len(text) else None
    return min(i + 2, len(text))
