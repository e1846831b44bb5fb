"""Limits: what a request may ask of a session, checked the same way whatever protocol it came by.

Every check raises InvalidArgument naming the field and the limit, so a client on
any protocol reads the same refusal. The values are the server's settings
(nextchar.server.config: max_chunk_chars, max_top_k, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from nextchar.core.completion import MAX_COMPLETION_CHARS, MAX_CONTINUATIONS
from nextchar.core.config import Sampling
from nextchar.server.errors import InvalidArgument

DEFAULT_TOP_K = 3  # what a top_k of 0 means in a prediction
DEFAULT_CONTINUATIONS, DEFAULT_COMPLETION_CHARS = 3, 12  # what Complete's 0s mean


@dataclass(frozen=True, slots=True)
class Limits:
    max_sessions: int = 100_000
    max_chunk_chars: int = 4096  # characters per prediction message; priming is fed in chunks of this
    max_top_k: int = 256
    max_prime_chars: int = 100_000
    max_generate_chars: int = 10_000
    rewind_chars: int = 0  # what each session's trail keeps (nextchar.server.sessions.trail)
    adapt: bool = False  # whether a session that does not say adapts (nextchar.core.adapt)
    max_adaptive_sessions: int = 1000  # adaptive sessions this server holds at once

    def text(self, text: str, field: str = "text") -> None:
        if not text:
            raise InvalidArgument(f"{field}: empty; send at least one character")
        if len(text) > self.max_chunk_chars:
            raise InvalidArgument(
                f"{field}: {len(text)} characters exceed max_chunk_chars ({self.max_chunk_chars}); "
                "split it into chunks"
            )

    def top_k(self, top_k: int, vocab_size: int) -> int:
        """The k a prediction may use (0: the default): at most the vocabulary and max_top_k."""
        k = top_k or DEFAULT_TOP_K
        allowed = min(vocab_size, self.max_top_k)
        if k > allowed:
            raise InvalidArgument(f"top_k: {k} is more than the {allowed} allowed")
        return k

    def prime(self, prime_text: str) -> None:
        if len(prime_text) > self.max_prime_chars:
            raise InvalidArgument(
                f"prime_text: {len(prime_text)} characters exceed max_prime_chars ({self.max_prime_chars})"
            )

    def generation(self, length: int, sampling: Sampling, vocab_size: int) -> None:
        if not 1 <= length <= self.max_generate_chars:
            raise InvalidArgument(f"length: must be in 1..{self.max_generate_chars}, got {length}")
        if sampling.top_k:  # 0 = no cut-off
            self.top_k(sampling.top_k, vocab_size)

    @staticmethod
    def completion(n: int, max_chars: int) -> tuple[int, int]:
        """(n, max_chars) a completion uses (0s: the defaults), refused outside the search's range."""
        n, max_chars = n or DEFAULT_CONTINUATIONS, max_chars or DEFAULT_COMPLETION_CHARS
        if not 1 <= n <= MAX_CONTINUATIONS:
            raise InvalidArgument(f"n: must be in 1..{MAX_CONTINUATIONS}, got {n}")
        if not 1 <= max_chars <= MAX_COMPLETION_CHARS:
            raise InvalidArgument(f"max_chars: must be in 1..{MAX_COMPLETION_CHARS}, got {max_chars}")
        return n, max_chars


def sampling(temperature: float, top_k: int, top_p: float) -> Sampling:
    """A generation's sampling settings, refused (InvalidArgument) when out of range."""
    try:
        return Sampling(temperature, top_k, top_p)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
