"""The character vocabulary: a sorted alphabet plus one slot for characters it has never seen.

Index 0 is the unknown-character slot, so a stream that contains a character the
model was not trained on is still processed (as "unknown") instead of failing;
callers find those positions with ``indices == UNK``.
"""

from __future__ import annotations

import numpy as np

UNK = 0
UNK_CHAR = "\ufffd"  # how the unknown slot prints; never a member of the alphabet
# Up to this length a dict lookup per character beats the table path's fixed cost
# (~10 µs of NumPy calls): the one-character messages of a stream take this path.
_SHORT_TEXT = 8


def _frozen(indices: list[int]) -> np.ndarray:
    a = np.array(indices, dtype=np.int64)
    a.flags.writeable = False
    return a


class Vocab:
    """Maps characters to indices and back; immutable once built."""

    def __init__(self, chars: str) -> None:
        alphabet = "".join(sorted(set(chars)))
        if alphabet != chars:
            raise ValueError("vocab characters must be distinct and sorted")
        if UNK_CHAR in alphabet:
            raise ValueError(f"vocab may not contain the unknown marker {UNK_CHAR!r}")
        self.chars = alphabet
        self.size = len(alphabet) + 1  # output classes, the unknown slot included
        self._known = frozenset(alphabet)
        self._index = {ch: i for i, ch in enumerate(alphabet, start=1)}
        self._itos = np.array([UNK_CHAR, *alphabet])
        # indices by code point, up to the alphabet's last; the entry past it (UNK) stands for every
        # code point beyond, which encode clips to it. A table over all of Unicode took 2.2 MB per
        # vocab, and every model version a server holds keeps one (a storm of small trainings left
        # a server 70 MB larger).
        codes = np.frombuffer(alphabet.encode("utf-32-le"), dtype=np.uint32)
        top = int(codes.max()) + 1 if len(codes) else 0
        self._table = np.zeros(top + 1, dtype=np.uint16 if len(alphabet) < 65535 else np.int32)
        self._table[codes] = np.arange(1, len(alphabet) + 1)
        # a stream's one-character messages: each character's encoding made once, when first met
        # (read-only: every caller gets the same array; an alphabet of 20,000 characters built up
        # front would cost megabytes per vocab)
        self._single: dict[str, np.ndarray] = {}
        self._single_unknown = _frozen([UNK])

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        if not text:
            raise ValueError("cannot build a vocabulary from empty text")
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> np.ndarray:
        """Indices (int64, one per character); unseen characters become UNK. Read-only for one
        character."""
        if len(text) == 1:
            one = self._single.get(text)
            if one is None:
                index = self._index.get(text)
                if index is None:
                    return self._single_unknown
                one = self._single[text] = _frozen([index])
            return one
        if len(text) <= _SHORT_TEXT:
            return np.array([self._index.get(ch, UNK) for ch in text], dtype=np.int64)
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        return self._table.take(codes, mode="clip").astype(np.int64)  # (clip: past the table is UNK)

    def unknown(self, text: str) -> str:
        """The distinct characters of text this vocab does not know, in order of appearance (""
        at the cost of one set test in C when it knows them all, as it usually does)."""
        if self._known.issuperset(text):
            return ""
        return "".join(dict.fromkeys(ch for ch in text if ch not in self._known))

    def decode(self, indices: np.ndarray | list[int]) -> str:
        return "".join(self._itos[np.asarray(indices, dtype=np.int64)])

    def char(self, index: int) -> str:
        return str(self._itos[index])

    def __len__(self) -> int:
        return self.size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and other.chars == self.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def __repr__(self) -> str:
        return f"Vocab({self.chars!r})"
