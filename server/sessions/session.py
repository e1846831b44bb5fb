"""Session: one session's identity (id, model, times) and its current value.

The value (nextchar.server.sessions.value) is everything the next prediction
depends on; it is replaced whole, and only by the session's store when it accepts
a change (``SessionStore.commit``). A Session is small on purpose (``__slots__``,
the state a NumPy row): an idle session costs its state plus about 1 KB, so 100,000
fit in well under 1 GB.
"""

from __future__ import annotations

import time

from nextchar.core import adapt
from nextchar.core.model import CharRNN
from nextchar.server.registry import ModelVersion
from nextchar.server.sessions.trail import Trail
from nextchar.server.sessions.value import SessionValue


class Session:
    # __weakref__: a shared store keeps what it knows of each session object it handed out
    # beside it, for exactly as long as the object lives
    __slots__ = ("__weakref__", "created", "id", "last_used", "model", "value")

    def __init__(self, session_id: str, model: ModelVersion, value: SessionValue) -> None:
        self.id = session_id
        self.model = model
        self.value = value  # written by the session's store only (commit, adopt)
        self.created = self.last_used = time.time()

    @property
    def offset(self) -> int:
        return self.value.offset


def start_value(model: ModelVersion, net: CharRNN, keep: int = 0, adaptive: bool = False) -> SessionValue:
    """The model's start (its initial state and first prediction), with a trail keeping keep
    characters; adaptive: with an adapter that has learnt nothing yet."""
    assert model.initial_probs is not None  # set whenever the model loaded
    state = net.initial_state(1)[0]
    return SessionValue(
        state, model.initial_probs, 0, Trail(keep), adapt.fresh(net, state) if adaptive else None
    )
