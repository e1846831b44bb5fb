"""SessionValue: everything a session's next prediction depends on, as one immutable value.

A session's content changes only by being replaced whole: an advance, a reset, a
rewind or an import makes a new value, and a store swaps it in only if the value it
was computed from is still the session's (compare-and-swap, nextchar.server.sessions.store).
So a result computed while the session was reset is never applied over the reset,
and one codec (nextchar.server.sessions.snapshot) writes the whole value to Export
and to Redis.

To add something a session carries: a field here, its arithmetic where the value
is advanced (``advanced``, and the compute path that produces the new field), and
its bytes in the snapshot codec. docs/architecture.md lists the files; the adapter
of a session that learns its writer (nextchar.core.adapt) went in that way.

An adaptive session's rewind restores its adapter exactly by feeding the trail's
text again from the trail's oldest mark, so the value also keeps the adapter it
had there (``base``); when the trail drops that mark, the base moves to the next
one by replaying the text between them (``base_source`` says which text).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from nextchar.core.adapt import NO_TEXT, Adapter
from nextchar.server.sessions.trail import Trail


class SessionValue(NamedTuple):
    """Immutable (a tuple: one is made per message, and a frozen dataclass costs three times as
    much to make). Compared by identity (``is``), never by ``==``."""

    state: np.ndarray  # (S,) hidden state after the last consumed character; never written in place
    probs: np.ndarray  # (V,) prediction for the next character
    offset: int  # characters consumed
    trail: Trail  # how to take characters back (nextchar.server.sessions.trail)
    adapter: Adapter | None = None  # a session that learns its writer: its own weights; None: static
    base: Adapter | None = None  # the adapter at the trail's oldest mark (None without marks)

    @property
    def adaptive(self) -> bool:
        return self.adapter is not None

    def advanced(
        self,
        idx: np.ndarray,
        state: np.ndarray,
        probs: np.ndarray,
        adapter: Adapter | None = None,
        base: Adapter | None = None,
    ) -> SessionValue:
        """The value after consuming idx (n,) from this one, ending at state and probs (and, for an
        adaptive session, with the adapter after idx and the base ``base_source`` led to)."""
        trail = self.trail.advanced(self.offset, self.state, self.probs, idx)
        # (tuple.__new__: every field given, without the Python-level constructor NamedTuple
        # writes; this runs once per message)
        return tuple.__new__(SessionValue, (state, probs, self.offset + len(idx), trail, adapter, base))

    def base_source(self, chars: int) -> tuple[Adapter | None, np.ndarray]:
        """Where the base of the value after the next chars characters comes from: an adapter, and
        the text to replay it through (nextchar.core.adapt.replay). The oldest mark then is that
        chunk's own (the base is the adapter now), or the oldest mark now, or a later one: the base
        moves past the text between them. Which marks a trail keeps depends on how many characters
        it is fed, not on which, so a generation can ask before it draws them."""
        if self.adapter is None:
            return None, NO_TEXT
        trail = self.trail.advanced(self.offset, self.state, self.probs, np.zeros(chars, np.uint16))
        if not trail.marks:
            return None, NO_TEXT
        first = trail.marks[0].offset
        if first == self.offset or not self.trail.marks:
            return self.adapter, NO_TEXT
        return self.base, self.trail.text[: first - self.trail.marks[0].offset].astype(np.int64)

    @property
    def rewind_limit(self) -> int:
        """How many characters a rewind can take back now."""
        return self.trail.rewind_limit(self.offset)
