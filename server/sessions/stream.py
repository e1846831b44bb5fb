"""SessionStream: the rules of a client's stream of messages on one session, whatever carries them.

A stream (gRPC's PredictStream; any other protocol's equivalent) opens on its first
message: it names a session to attach to, or none to create one on a model. The
last stream attached to a session is the one that advances it: a client resuming
after a drop takes over from its half-dead stream, which ends ABORTED at its next
message. Each message may take characters back (``rewind``, a Backspace) and then
feed text; a message that only rewinds answers where the session now is. A
message's reply holds reply budget (nextchar.server.budget) until the adapter has
written it (``SessionManager.written``).

The adapter reads its protocol's messages into StreamMessage, calls ``message``,
writes the answer, and calls ``close`` when the stream ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from nextchar.server.errors import Aborted, InvalidArgument, shown
from nextchar.server.sessions.manager import Attachment, Predicted, SessionManager
from nextchar.server.sessions.session import Session


class StreamMessage(NamedTuple):
    """One message of a stream (a tuple: one is made per message; a frozen dataclass of eight
    fields cost ~3 us to make)."""

    text: str = ""
    rewind: int = 0  # characters to take back before text is fed
    top_k: int = 0
    full: bool = False  # every position's whole distribution
    expect_offset: int | None = None  # refuse unless the session is at this offset
    session_id: str = ""  # the first message: attach to this session ("" creates one)...
    # ...on this model ("" the default), adaptive or not (None: the server's default); read on
    # the first message only, so an adapter may leave them out of the others
    model_name: str = ""
    model_version: int = 0
    adapt: bool | None = None


@dataclass(frozen=True, slots=True)
class Rewound:
    """The answer to a message that only rewound: where the session is, and what comes next there."""

    offset: int
    probs: np.ndarray  # (V,) the prediction at offset
    k: int
    rewind_limit: int


class SessionStream:
    def __init__(self, sessions: SessionManager) -> None:
        self.sessions = sessions
        self.session: Session | None = None  # set by the first message
        self._attachment: Attachment | None = None

    async def message(self, msg: StreamMessage) -> Predicted | Rewound:
        """One message: the first attaches (or creates) the session; each rewinds, then predicts."""
        session = self.session
        if session is None:
            session = await self._open(msg)
        else:  # (no await while this server holds the session: the usual message)
            if msg.session_id and msg.session_id != session.id:
                raise InvalidArgument(
                    f"session_id: this stream is attached to {shown(session.id)}, not {shown(msg.session_id)}"
                )
            assert self._attachment is not None
            if self._attachment.revoked:
                raise Aborted(f"session {shown(session.id)}: another stream attached to it; this one ends")
            session = self.session = self.sessions.held(session) or await self.sessions.current(session)
        expect = msg.expect_offset
        if msg.rewind:
            value = await self.sessions.rewind(session, msg.rewind, expect)
            expect = None
            if not msg.text:
                net = await self.sessions.catalog.network(session.model)
                k = self.sessions.limits.top_k(msg.top_k, net.vocab.size)
                return Rewound(value.offset, value.probs, k, value.rewind_limit)
        return await self.sessions.predict(session, msg.text, msg.top_k, msg.full, expect)

    async def _open(self, msg: StreamMessage) -> Session:
        """The first message: attach to the session it names, or create one."""
        if msg.session_id:
            session = await self.sessions.get(msg.session_id)
        else:
            self.sessions.limits.text(msg.text)  # a bad first chunk must not leave a session behind
            model = await self.sessions.model(msg.model_name, msg.model_version)
            session = await self.sessions.create("", model, adapt=msg.adapt)
        self.session, self._attachment = session, self.sessions.attach(session.id)
        return session

    def close(self) -> None:
        """The stream ended (however): the session stays, free for another stream."""
        if self.session is not None and self._attachment is not None:
            self.sessions.detach(self.session.id, self._attachment)
