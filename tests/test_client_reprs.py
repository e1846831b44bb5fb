"""The client's result types print as a reader scans them (issue 24: ``Predictions(start_offset=0,
count=16, next_chars='rut s lntioteih ')`` said nothing a user could use).

Built from the wire messages the server sends, as the client builds them.
"""

from __future__ import annotations

import json

from nextchar.client import Completion, ModelDetails, Predictions
from nextchar.proto import nextchar_pb2 as pb

VOCAB = " abet"  # index 1 is " ", 2 "a", 3 "b", 4 "e", 5 "t"


def chunk(text: str, start: int = 0, distribution: bool = False) -> Predictions:
    """Predictions for text whose top-2 after every character is 'e' 0.6, 'a' 0.25."""
    n = len(text)
    msg = pb.Predictions(
        start_offset=start,
        count=n,
        top_k=2,
        top_index=[4, 2] * n,
        top_prob=[0.6, 0.25] * n,
        surprisal_bits=[1.5] * n,
        distribution=[0.2] * (len(VOCAB) + 1) * n if distribution else [],
    )
    return Predictions(msg, VOCAB, text)


def test_predictions_show_the_chunk_and_what_comes_next() -> None:
    assert repr(chunk("to be", start=3)) == "<Predictions 3..8 of 'to be': next 'e' 0.600, 'a' 0.250>"


def test_a_long_chunk_shows_its_end_where_the_next_character_follows() -> None:
    text = "a" * 30 + "b" * 30
    shown = repr(chunk(text))
    assert shown.startswith("<Predictions 0..60 of ...'" + "a" * 10 + "b" * 30 + "': next")


def test_a_rewind_shows_where_the_session_went_back_to() -> None:
    after = pb.NextChars(top_index=[5, 0], top_prob=[0.5, 0.125])
    rewound = Predictions(pb.Predictions(start_offset=6, top_k=2), VOCAB, "", after)
    assert repr(rewound) == "<Predictions at 6 after a rewind: next 't' 0.500, '\ufffd' 0.125>"


def test_one_character_shows_its_surprise_and_not_its_whole_distribution() -> None:
    assert repr(chunk("tab", distribution=True)[2]) == (
        "<CharPrediction at 2 'b' 1.50 bits: next 'e' 0.600, 'a' 0.250, distribution of 6>"
    )
    assert repr(chunk("tab")[0].top) == "(Candidate('e', 0.600), Candidate('a', 0.250))"


def test_completions_and_model_details_fit_on_a_line() -> None:
    assert repr(Completion("ut", 0.0195466, True)) == "Completion('ut', 0.020, complete=True)"
    info = pb.ModelInfo(
        model=pb.ModelRef(name="code", version=2), available=True, cell="gru", hidden=128, layers=1
    )
    info.bits_per_char = 2.3435
    summary = json.dumps({"history": list(range(1000))})
    details = ModelDetails.from_pb(
        pb.DescribeModelResponse(info=info, vocab=VOCAB, summary_json=summary, meta_json=summary)
    )
    assert (
        repr(details) == "<ModelDetails code:v2: gru, hidden 128, 1 layer(s), 5 characters, 2.344 bits/char>"
    )
