"""SessionValue: everything a session's next prediction depends on, as one immutable value.

A session's content changes only by being replaced whole: an advance, a reset, a
rewind or an import makes a new value, and a store swaps it in only if the value it
was computed from is still the session's (compare-and-swap, nextchar.server.sessions.store).
So a result computed while the session was reset is never applied over the reset,
and one codec (nextchar.server.sessions.snapshot) writes the whole value to Export
and to Redis.

To add something a session carries (an adapter, say): a field here, its arithmetic
where the value is advanced (``advanced``, and the compute path that produces the
new field), and its bytes in the snapshot codec. docs/architecture.md lists the files.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from nextchar.server.sessions.trail import Trail


class SessionValue(NamedTuple):
    """Immutable (a tuple: one is made per message, and a frozen dataclass costs three times as
    much to make). Compared by identity (``is``), never by ``==``."""

    state: np.ndarray  # (S,) hidden state after the last consumed character; never written in place
    probs: np.ndarray  # (V,) prediction for the next character
    offset: int  # characters consumed
    trail: Trail  # how to take characters back (nextchar.server.sessions.trail)

    def advanced(self, idx: np.ndarray, state: np.ndarray, probs: np.ndarray) -> SessionValue:
        """The value after consuming idx (n,) from this one, ending at state and probs."""
        trail = self.trail.advanced(self.offset, self.state, self.probs, idx)
        return SessionValue(state, probs, self.offset + len(idx), trail)

    @property
    def rewind_limit(self) -> int:
        """How many characters a rewind can take back now."""
        return self.trail.rewind_limit(self.offset)

    def with_keep(self, keep: int) -> SessionValue:
        """The same point, with a trail that keeps keep characters from here on (none kept yet)."""
        return SessionValue(self.state, self.probs, self.offset, Trail(keep))
