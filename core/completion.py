"""Completion: the n most probable continuations of a state up to the end of a word.

A keyboard wants the likeliest next *word*, not the likeliest next character: the
best word can start with a character that is not the single best one. This is a
beam search over characters. Each continuation has the probability of its
characters times, for a finished word, the probability that a boundary (any
character that is not part of a word) follows it, so "the" and "there" are
compared as whole words. Characters before the first word character (a space, a
comma) belong to the continuation: after "To be" the answers can be ", or" and
" or". A continuation that reaches ``max_chars`` without a boundary is returned
unfinished (``complete`` False) with the probability of its characters alone.

Deterministic: scores are float64 log-probabilities and ties go to the earlier
beam, then the lower vocabulary index; no randomness. Every expansion of the beams
is one batched ``model.step``, so n = 3 continuations of 12 characters at H = 256
cost about a dozen small products (``make bench-complete`` measures it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nextchar.core.model import CharRNN
from nextchar.core.vocab import UNK

BEAM_FACTOR = 2  # beams kept per continuation asked for: a wider beam finds words a narrow one prunes
MAX_CONTINUATIONS = 16
MAX_COMPLETION_CHARS = 64


def is_word_char(char: str) -> bool:
    """Letters, digits and the apostrophe of "don't": what a word is made of."""
    return char.isalnum() or char == "'"


@dataclass(frozen=True, slots=True)
class Continuation:
    text: str
    prob: float  # of the characters, times a following boundary's when complete
    complete: bool  # ends at a word boundary (False: cut at max_chars)


def complete(
    model: CharRNN, state: np.ndarray, probs: np.ndarray, n: int = 3, max_chars: int = 12
) -> list[Continuation]:
    """The n likeliest continuations from state (S,) whose next-character prediction is probs (V,).

    Fewer than n come back only when the vocabulary cannot form n distinct ones.
    """
    if not (1 <= n <= MAX_CONTINUATIONS and 1 <= max_chars <= MAX_COMPLETION_CHARS):
        raise ValueError(f"n must be in 1..{MAX_CONTINUATIONS} and max_chars in 1..{MAX_COMPLETION_CHARS}")
    vocab = model.vocab
    word = np.array([i != UNK and is_word_char(vocab.char(i)) for i in range(vocab.size)])  # (V,)
    boundary = ~word
    boundary[UNK] = False  # the unknown slot is neither: it is never proposed
    width = n * BEAM_FACTOR
    p = np.asarray(probs, dtype=np.float64)[None, :]  # (beams, V) each beam's next-character prediction
    scores = np.zeros(1)  # (beams,) log-probability of each beam's characters
    seqs: list[list[int]] = [[]]
    worded = np.zeros(1, dtype=bool)  # (beams,) the beam holds a word character
    states = state[None, :]
    done: list[tuple[float, str, bool]] = []  # (log-prob, text, complete)
    for length in range(max_chars + 1):
        with np.errstate(divide="ignore"):
            # a worded beam can end here: its word, then any boundary character
            ends = scores + np.log(p[:, boundary].sum(axis=1))  # (beams,)
            done += [(float(ends[b]), vocab.decode(seqs[b]), True) for b in np.flatnonzero(worded)]
            if length == max_chars:  # or it is cut here, its word going on
                goes_on = scores + np.log(p[:, word].sum(axis=1))
                done += [(float(goes_on[b]), vocab.decode(seqs[b]), False) for b in np.flatnonzero(worded)]
                break
            # or it goes on: with a word character, or (before its first) with anything known
            allowed = np.where(worded[:, None], word[None, :], (word | boundary)[None, :])  # (beams, V)
            cand = np.where(allowed, scores[:, None] + np.log(p), -np.inf).ravel()  # (beams * V,)
        order = np.argsort(-cand, kind="stable")[:width]  # stable: earlier beam, then lower index
        order = order[cand[order] > _nth_best(done, n)]
        if len(order) == 0:
            break  # no open beam can beat the n-th finished continuation any more
        beam, char = np.divmod(order, vocab.size)
        states, step_probs = model.step(states[beam], char)
        p = step_probs.astype(np.float64)
        scores = cand[order]
        seqs = [[*seqs[b], int(c)] for b, c in zip(beam, char, strict=True)]
        worded = worded[beam] | word[char]
    done.sort(key=lambda d: -d[0])  # stable: among equal scores, the one found first
    out: dict[str, Continuation] = {}  # at max_chars a text can be both complete and cut: the likelier
    for score, text, full in done:
        if text not in out and len(out) < n:
            out[text] = Continuation(text, float(np.exp(score)), full)
    return list(out.values())


def _nth_best(done: list[tuple[float, str, bool]], n: int) -> float:
    """The n-th best finished score so far (-inf while fewer than n): the bar an open beam must clear."""
    if len(done) < n:
        return -np.inf
    return sorted((d[0] for d in done), reverse=True)[n - 1]
