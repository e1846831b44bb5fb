"""Trail: what a session keeps so it can take back its last characters (RewindSession, Backspace).

Keeping every state a session passed through would cost a state per character.
A trail keeps instead a few marks (the state and prediction at an offset, taken
at the start of a chunk at most every ``spacing`` characters) and the characters
consumed since the oldest mark. Rewinding to offset t restores the newest mark at
or before t and re-feeds the characters from there to t, so the session ends
exactly where a session that never received the taken-back characters would be.

A mark is dropped once the next one is far enough back to serve every rewind of
``keep`` characters, so a trail holds at most about keep/spacing + 2 marks and
keep + spacing + one chunk of characters: with the default 256 characters and
H = 256, about 7 KB per session. It reaches back at least ``keep`` characters
(or to the session's start, or the point it was imported at). Its arrays are
never written in place (a session's state is replaced, not mutated), so marks
share them with the states they record, and a forked session shares its trail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

NO_TEXT = np.zeros(0, dtype=np.uint16)
MARKS_PER_KEEP = 4  # marks are keep/4 apart: a rewind re-feeds at most a quarter of keep plus what it takes


class Mark(NamedTuple):
    """A point a rewind can restart from (a tuple: a chunk of 64 characters or more takes a mark
    each, and a frozen dataclass costs three times as much to make)."""

    offset: int
    state: np.ndarray  # (S,) after `offset` characters
    probs: np.ndarray  # (V,) the prediction there


@dataclass(frozen=True, slots=True)
class Replay:
    """How to reach a rewind's target: start from mark, feed text (then the session is at target)."""

    mark: Mark
    text: np.ndarray  # (n,) indices


class Trail:
    """Immutable: advancing or rewinding gives a new trail, so a write-back can carry the trail
    its session will have without touching the one it has."""

    __slots__ = ("keep", "marks", "marks_bytes", "text")

    def __init__(
        self,
        keep: int,
        marks: tuple[Mark, ...] = (),
        text: np.ndarray = NO_TEXT,
        marks_bytes: bytes | None = None,
    ) -> None:
        self.keep = keep  # characters a rewind is guaranteed to reach back (once consumed)
        self.marks = marks  # oldest first
        self.text = text  # (n,) uint16 indices consumed since marks[0]
        # the marks as the snapshot codec writes them, left here by the codec and carried while
        # the marks stay the same: a store that writes a session after every message would
        # otherwise encode the same marks every time (nextchar.server.sessions.snapshot)
        self.marks_bytes = marks_bytes

    @property
    def end(self) -> int:
        """The offset the trail leads up to (its session's offset); -1 when empty."""
        return self.marks[0].offset + len(self.text) if self.marks else -1

    def rewind_limit(self, offset: int) -> int:
        """How many characters a session at offset can take back."""
        return offset - self.marks[0].offset if self.marks and self.end == offset else 0

    def advanced(self, offset: int, state: np.ndarray, probs: np.ndarray, idx: np.ndarray) -> Trail:
        """The trail after a chunk idx consumed from offset, where the session had state and probs."""
        keep = self.keep
        if not keep:
            return self
        marks, text = self.marks, self.text
        if not marks or marks[0].offset + len(text) != offset:  # new, reset, or a copy adopted from elsewhere
            marks, text = (), NO_TEXT
        if not marks or offset - marks[-1].offset >= max(1, keep // MARKS_PER_KEEP):  # the spacing
            marks = (*marks, Mark(offset, state, probs))
        text = np.concatenate((text, idx), dtype=np.uint16, casting="unsafe")  # indices < max_vocab
        end, drop = offset + len(idx), 0
        while len(marks) - drop >= 2 and marks[drop + 1].offset <= end - keep:
            drop += 1  # the next mark already serves every rewind of keep characters
        if drop:
            text = text[marks[drop].offset - marks[0].offset :]
            marks = marks[drop:]
        return Trail(keep, marks, text, self.marks_bytes if marks is self.marks else None)

    def replay(self, offset: int, chars: int, *, oldest: bool = False) -> Replay:
        """How to take chars back from a session at offset; the caller checked rewind_limit().
        oldest: from the oldest mark, not the newest one before the target (an adaptive session's
        adapter is known there only: nextchar.server.sessions.value)."""
        target = offset - chars
        mark = self.marks[0] if oldest else next(m for m in reversed(self.marks) if m.offset <= target)
        start = mark.offset - self.marks[0].offset
        return Replay(mark, self.text[start : start + target - mark.offset].astype(np.int64))

    def rewound(self, target: int) -> Trail:
        """The trail of the session taken back to target."""
        marks = tuple(m for m in self.marks if m.offset <= target)
        return Trail(self.keep, marks, self.text[: target - marks[0].offset])
