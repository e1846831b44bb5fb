from __future__ import annotations

import numpy as np
import pytest
from nextchar.core.vocab import UNK, UNK_CHAR, Vocab


def test_sorted_alphabet_with_unknown_slot() -> None:
    vocab = Vocab.from_text("hello world")
    assert vocab.chars == " dehlorw"
    assert vocab.size == len(vocab.chars) + 1
    assert vocab.char(UNK) == UNK_CHAR
    assert vocab.decode(vocab.encode("hello")) == "hello"


def test_unknown_characters_never_crash_and_are_reported() -> None:
    vocab = Vocab.from_text("abc")
    text = "abz€\U0001f600a\udcff"  # unseen ASCII, BMP, astral, and a lone surrogate
    idx = vocab.encode(text)
    assert idx.tolist() == [1, 2, UNK, UNK, UNK, 1, UNK]
    assert vocab.unknown(text) == "z€\U0001f600\udcff"
    assert np.flatnonzero(idx == UNK).tolist() == [2, 3, 4, 6]
    assert vocab.unknown("z") == "z" and vocab.unknown("abca") == vocab.unknown("") == ""


def test_empty_text_and_reserved_marker_are_rejected() -> None:
    with pytest.raises(ValueError):
        Vocab.from_text("")
    with pytest.raises(ValueError):
        Vocab("ab" + UNK_CHAR)
    with pytest.raises(ValueError):
        Vocab("ba")


def test_short_and_long_texts_encode_alike() -> None:
    """Short texts take a dict path, longer ones the table: both must agree."""
    vocab = Vocab.from_text("the quick brown fox")
    # unknown characters below the alphabet's last code point ('x'), just past it, far past it
    text = "the quick brown fox jumps, yz\x00 €\U0001f600\udcff!" * 3
    whole = vocab.encode(text)
    pieces = np.concatenate([vocab.encode(text[i : i + 3]) for i in range(0, len(text), 3)])
    assert whole.dtype == pieces.dtype == np.int64
    np.testing.assert_array_equal(whole, pieces)


def test_a_vocab_costs_its_alphabet_not_all_of_unicode() -> None:
    """A server keeps the vocab of every model version it holds: a code-point table over all of
    Unicode (2.2 MB each) left a server 70 MB larger after a storm of small trainings
    (make bench-abuse, train_storm)."""
    vocab = Vocab.from_text("the quick brown fox")
    arrays = sum(a.nbytes for a in vars(vocab).values() if isinstance(a, np.ndarray))
    assert arrays < 4096
    assert vocab.encode("x" * 20).tolist() == [vocab.encode("x")[0]] * 20  # the table's last entry
