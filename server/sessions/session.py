"""Session: one hidden state pinned to one model version, and its position in the client's text.

A Session is small on purpose (``__slots__``, the state a NumPy row): an idle
session costs its state plus about 1 KB, so 100,000 fit in well under 1 GB. Only
the scheduler advances a session's state, on the event loop thread, so no locks
are needed. What a particular store keeps about a session (a shared store's
version counter, say) stays in that store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from nextchar.server.registry import ModelVersion
from nextchar.server.sessions.trail import Trail


class Session:
    # __weakref__: a shared store keeps what it knows of each session object it handed out
    # beside it, for exactly as long as the object lives
    __slots__ = (
        "__weakref__",
        "created",
        "gen",
        "id",
        "last_used",
        "model",
        "offset",
        "probs",
        "state",
        "trail",
    )

    def __init__(
        self, session_id: str, model: ModelVersion, state: np.ndarray, probs: np.ndarray, keep: int = 0
    ) -> None:
        """keep: characters a rewind can take back (0: none; sessions outside a store keep none)."""
        self.id = session_id
        self.model = model
        self.state = state  # (S,) hidden state after the last consumed character
        self.probs = probs  # (V,) prediction for the next character
        self.offset = 0  # characters consumed
        self.trail = Trail(keep)  # how to go back (nextchar.server.sessions.trail)
        self.created = self.last_used = time.time()
        self.gen = 0  # bumped on reset/rewind/close: batch results for an older gen are dropped

    @classmethod
    def fresh(cls, session_id: str, model: ModelVersion, keep: int = 0) -> Session:
        net = model.require()
        assert model.initial_probs is not None  # set whenever the model is available
        return cls(session_id, model, net.initial_state(1)[0], model.initial_probs, keep)

    def copy(self, session_id: str) -> Session:
        twin = Session(session_id, self.model, self.state.copy(), self.probs.copy())
        twin.offset, twin.trail = self.offset, self.trail  # a trail is immutable: shared
        return twin

    def start(self) -> WriteBack:
        """What puts the session back at its model's start (ResetSession)."""
        fresh = Session.fresh(self.id, self.model)
        return WriteBack(self, fresh.state, fresh.probs, 0, 0, Trail(self.trail.keep))

    def restore(self, back: WriteBack) -> None:
        """Take back's state whole (a reset or a rewind): results computing meanwhile are dropped."""
        self.state, self.probs, self.offset, self.trail = back.state, back.probs, back.offset, back.trail
        self.gen += 1

    def reset(self) -> None:
        self.restore(self.start())


@dataclass(slots=True)
class WriteBack:
    """A session's advance, for its store to accept (and a shared store to write) before the reply leaves."""

    session: Session  # still holding the state the chunk was computed from
    state: np.ndarray  # (S,) after the chunk
    probs: np.ndarray  # (V,)
    offset: int  # after the chunk
    chars: int  # the chunk's length
    trail: Trail  # the session's trail after the chunk
