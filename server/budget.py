"""The reply budget: how many bytes of big replies the server holds at once, across all clients.

A reply stays in the server's memory until the client reads it: a client that
never reads holds its stream's reply (and the batch arrays behind it) for good.
One reply per stream is all a stream can hold (the next request is read only
after the reply before it was written), but a 4,096-character chunk with its full
distribution is about 1 MB, so 300 such streams would hold 300 MB and more in
copies. So every big reply reserves its size here before it is computed, and
gives it back once it is written (a stream) or the call is over (unary);
a request whose reply does not fit now is refused with RESOURCE_EXHAUSTED (retry
once others have read theirs), and one whose reply alone is over the whole budget
with INVALID_ARGUMENT: no retry can ever admit it, so the client must be told to
ask for less, not to wait. Small
replies (one-character predictions: tens of bytes) are never refused: they are
bounded by the one-per-stream rule, and a well-behaved client must not pay for a
hostile one.
"""

from __future__ import annotations

from nextchar.server.errors import InvalidArgument, ResourceExhausted

SMALL_REPLY = 64 * 1024  # bytes: replies up to this size are always admitted
FLOAT, INDEX = 4, 2  # packed bytes per float, and per top-k index (a small varint)


def reply_bytes(chars: int, top_k: int, vocab_size: int, full: bool) -> int:
    """What a prediction reply for chars characters costs on the wire (its arrays cost about as much)."""
    per_char = top_k * (FLOAT + INDEX) + FLOAT + (vocab_size * FLOAT if full else 0)
    return chars * per_char


class ReplyBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0  # bytes of big replies reserved and not yet released

    def reserve(self, nbytes: int) -> int:
        """Take nbytes from the budget (refusing a big reply that does not fit); returns what to release."""
        if nbytes <= SMALL_REPLY:
            return 0
        if nbytes > self.limit:
            raise InvalidArgument(
                f"this reply alone would take {nbytes >> 10} KiB, more than max_reply_bytes "
                f"({self.limit >> 10} KiB) lets the server hold for all its clients: it can never be "
                "sent; send smaller chunks, or ask for fewer candidates or no full distribution",
                limit="max_reply_bytes",
            )
        if self.used + nbytes > self.limit:
            raise ResourceExhausted(
                f"the server holds {self.used >> 20} MiB of replies its clients have not read yet "
                f"(max_reply_bytes {self.limit >> 20} MiB); read your replies, send smaller chunks "
                "or ask for fewer distributions, and retry",
                limit="max_reply_bytes",
            )
        self.used += nbytes
        return nbytes

    def release(self, nbytes: int) -> None:
        self.used -= nbytes
