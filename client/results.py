"""Typed results of client calls: plain frozen dataclasses built from the proto messages.

Callers never see a protobuf message. ``Predictions`` keeps the server's packed
parallel arrays and decodes a per-character ``CharPrediction`` only when one is
asked for, so streaming many characters costs no Python objects per character.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, overload

from nextchar.proto import nextchar_pb2 as pb

UNKNOWN = "\ufffd"  # how the unknown-character slot (index 0) is shown


@dataclass(frozen=True)
class ModelRef:
    """A model version; name "" means the default model, version 0 the newest."""

    name: str = ""
    version: int = 0

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """``NAME``, ``NAME:VERSION`` or ``NAME:vVERSION``; "" is the default model."""
        name, _, version = text.partition(":")
        version = version.removeprefix("v")
        if version and not version.isdigit():
            raise ValueError(f"model version must be a number, got {text!r}")
        return cls(name, int(version or 0))

    @classmethod
    def from_pb(cls, msg: pb.ModelRef) -> ModelRef:
        return cls(msg.name, msg.version)

    def to_pb(self) -> pb.ModelRef:
        return pb.ModelRef(name=self.name, version=self.version)

    def __str__(self) -> str:
        name = self.name or "(default)"
        return f"{name}:v{self.version}" if self.version else name


ModelLike = ModelRef | str | None  # what calls accept: a ModelRef, "name[:version]", or None for the default


def model_ref(model: ModelLike) -> ModelRef:
    if isinstance(model, ModelRef):
        return model
    return ModelRef.parse(model or "")


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    model: ModelRef
    offset: int  # characters consumed since creation or the last reset
    created_at: float  # Unix seconds
    last_used_at: float
    idle_expires_at: float
    lifetime_expires_at: float  # 0 = unlimited
    rewind_limit: int = 0  # characters Session.rewind can take back now
    adaptive: bool = False  # the session learns its writer (docs/adaptation.md)
    adapt_steps: int = 0  # adaptation steps taken
    adapt_resets: int = 0  # times a diverging adapter was reset to the model's weights

    @classmethod
    def from_pb(cls, msg: pb.SessionInfo) -> SessionInfo:
        return cls(
            msg.session_id,
            ModelRef.from_pb(msg.model),
            msg.offset,
            msg.created_at,
            msg.last_used_at,
            msg.idle_expires_at,
            msg.lifetime_expires_at,
            msg.rewind_limit,
            msg.adaptive,
            msg.adapt_steps,
            msg.adapt_resets,
        )


@dataclass(frozen=True)
class Candidate:
    char: str
    prob: float

    def __repr__(self) -> str:
        # three digits, not float32's seventeen: a list of them has to be read at a glance
        return f"Candidate({self.char!r}, {self.prob:.3f})"


@dataclass(frozen=True)
class CharPrediction:
    """What the model said at one character: how surprising it was, and what it expects next."""

    offset: int  # session offset of this character (characters consumed before it)
    char: str  # the character consumed ("" when the client did not keep the text)
    surprisal_bits: float  # -log2 P(char) under the previous prediction
    top: tuple[Candidate, ...]  # the most likely next characters, most likely first
    unknown: bool  # the model's vocabulary does not hold char
    distribution: tuple[float, ...] = ()  # full next-character distribution, when asked for

    @property
    def next_char(self) -> str:
        return self.top[0].char if self.top else ""

    def __repr__(self) -> str:
        shown = f"<CharPrediction at {self.offset} {self.char!r} {self.surprisal_bits:.2f} bits"
        unknown = " (unknown)" if self.unknown else ""
        distribution = f", distribution of {len(self.distribution)}" if self.distribution else ""
        return f"{shown}{unknown}: next {_listed(self.top)}{distribution}>"


@dataclass(frozen=True)
class Rewind:
    """An item of ``Session.stream``'s input besides text: take back the last chars characters."""

    chars: int = 1


@dataclass(frozen=True)
class Completion:
    """A continuation from ``complete``: its text, probability, and whether it ends at a word boundary."""

    text: str
    prob: float
    complete: bool

    def __repr__(self) -> str:
        return f"Completion({self.text!r}, {self.prob:.3f}, complete={self.complete})"


def _listed(top: Sequence[Candidate]) -> str:
    """Candidates as a reader scans them: ``'e' 0.412, 'a' 0.103``."""
    return ", ".join(f"{c.char!r} {c.prob:.3f}" for c in top) or "nothing"


def _tail(text: str, keep: int = 40) -> str:
    """The end of a long text (where the next character follows), marked as cut."""
    return repr(text) if len(text) <= keep else "..." + repr(text[-keep:])


def candidates(msg: pb.NextChars, vocab: str) -> tuple[Candidate, ...]:
    return tuple(
        Candidate(vocab[i - 1] if 1 <= i <= len(vocab) else UNKNOWN, p)
        for i, p in zip(msg.top_index, msg.top_prob, strict=True)
    )


class Predictions(Sequence[CharPrediction]):
    """The predictions for one chunk: a sequence of CharPrediction decoded on access.

    For a stream item that only rewound, the sequence is empty and ``next`` holds the
    prediction where the session now stands.
    """

    def __init__(
        self,
        msg: pb.Predictions,
        vocab: str,
        text: str = "",
        after_rewind: pb.NextChars | None = None,
        rewind_limit: int = 0,
    ) -> None:
        self._msg = msg
        self.vocab = vocab
        self.text = text  # the chunk as the client sent it
        self._unknown = frozenset(msg.unknown_positions)
        self._after_rewind = after_rewind
        self.rewind_limit = rewind_limit  # (streams) how far the session can take back after this

    @property
    def next(self) -> tuple[Candidate, ...]:
        """The likeliest characters to come after this chunk (or where a rewind left the session)."""
        if self._msg.count:
            return self[-1].top
        return candidates(self._after_rewind, self.vocab) if self._after_rewind is not None else ()

    @property
    def start_offset(self) -> int:
        return self._msg.start_offset

    @property
    def end_offset(self) -> int:
        """The session offset after this chunk: the next character's offset."""
        return self._msg.start_offset + self._msg.count

    @property
    def top_k(self) -> int:
        return self._msg.top_k

    @property
    def surprisal_bits(self) -> list[float]:
        return list(self._msg.surprisal_bits)

    @property
    def unknown_chars(self) -> str:
        return self._msg.unknown_chars

    @property
    def next_chars(self) -> str:
        """The most likely next character after each character of the chunk."""
        k = self._msg.top_k
        return "".join(self._char(i) for i in self._msg.top_index[::k]) if k else ""

    def _char(self, index: int) -> str:
        return self.vocab[index - 1] if 1 <= index <= len(self.vocab) else UNKNOWN

    def __len__(self) -> int:
        return self._msg.count

    @overload
    def __getitem__(self, i: int) -> CharPrediction: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[CharPrediction]: ...
    def __getitem__(self, i: int | slice) -> CharPrediction | Sequence[CharPrediction]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n, k = self._msg.count, self._msg.top_k
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"prediction {i} out of range 0..{n - 1}")
        msg = self._msg
        top = tuple(Candidate(self._char(msg.top_index[j]), msg.top_prob[j]) for j in range(i * k, i * k + k))
        v = len(msg.distribution) // n if msg.distribution else 0
        return CharPrediction(
            offset=msg.start_offset + i,
            char=self.text[i] if i < len(self.text) else "",
            surprisal_bits=msg.surprisal_bits[i],
            top=top,
            unknown=i in self._unknown,
            distribution=tuple(msg.distribution[i * v : i * v + v]),
        )

    def __iter__(self) -> Iterator[CharPrediction]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        """The chunk and what comes after it; not ``next_chars``, which reads as noise (the top
        guess after every character, each one aligned with a character of the text)."""
        where = f"{self.start_offset}..{self.end_offset}" if self._msg.count else f"at {self.start_offset}"
        if self.text:
            where += f" of {_tail(self.text)}"
        elif not self._msg.count:
            where += " after a rewind"
        return f"<Predictions {where}: next {_listed(self.next)}>"


@dataclass(frozen=True)
class Progress:
    """One training progress record; the fields of nextchar.core.train's records."""

    kind: str  # "step" or "epoch"
    epoch: int
    step: int
    chars: int
    total_chars: int
    train_loss: float
    train_bpc: float
    val_loss: float | None
    val_bpc: float | None
    chars_per_sec: float | None  # None where the run did not record timings (the shipped model)
    elapsed: float | None  # training seconds so far
    eta_seconds: float | None
    wall_seconds: float | None = None  # seconds since the run started, evaluations included
    lr: float | None = None  # the learning rate of the latest step

    @classmethod
    def from_pb(cls, msg: pb.ProgressRecord) -> Progress:
        def opt(name: str) -> float | None:
            return getattr(msg, name) if msg.HasField(name) else None  # type: ignore[arg-type]

        return cls(
            msg.kind,
            msg.epoch,
            msg.step,
            msg.chars,
            msg.total_chars,
            msg.train_loss,
            msg.train_bpc,
            opt("val_loss"),
            opt("val_bpc"),
            opt("chars_per_sec"),
            opt("elapsed"),
            opt("eta_seconds"),
            opt("wall_seconds"),
            opt("lr"),
        )

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Progress:
        fields: dict[str, Any] = {name: record.get(name) for name in cls.__dataclass_fields__}
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


JOB_STATES = {
    pb.JOB_STATE_QUEUED: "queued",
    pb.JOB_STATE_RUNNING: "running",
    pb.JOB_STATE_SUCCEEDED: "succeeded",
    pb.JOB_STATE_FAILED: "failed",
    pb.JOB_STATE_CANCELLED: "cancelled",
}


@dataclass(frozen=True)
class Job:
    job_id: str
    state: str  # queued | running | succeeded | failed | cancelled
    model_name: str
    result: ModelRef | None  # the registered version once the job succeeded
    error: str
    started_at: float  # 0 while it waits for a trainer
    finished_at: float  # 0 until it ends
    latest: Progress | None
    queue_position: int = 0  # while queued: 1 = next
    attempts: int = 0  # trainer processes started for it (a resume after a crash starts another)
    model_config: dict[str, Any] = field(default_factory=dict)  # what it trains: cell, hidden, ...
    train_config: dict[str, Any] = field(default_factory=dict)  # how: epochs, batch, seq_len, lr, ...

    @classmethod
    def from_pb(cls, msg: pb.JobInfo) -> Job:
        return cls(
            msg.job_id,
            JOB_STATES.get(msg.state, "unknown"),
            msg.model_name,
            ModelRef.from_pb(msg.result) if msg.HasField("result") and msg.result.name else None,
            msg.error,
            msg.started_at,
            msg.finished_at,
            Progress.from_pb(msg.latest) if msg.HasField("latest") else None,
            msg.queue_position,
            msg.attempts,
            json.loads(msg.model_config_json) if msg.model_config_json else {},
            json.loads(msg.train_config_json) if msg.train_config_json else {},
        )

    @property
    def done(self) -> bool:
        return self.state not in ("queued", "running")


@dataclass(frozen=True)
class JobEvent:
    """A job's status, plus the progress record when the event carries one."""

    job: Job
    progress: Progress | None

    @classmethod
    def from_pb(cls, msg: pb.JobEvent) -> JobEvent:
        progress = Progress.from_pb(msg.progress) if msg.HasField("progress") else None
        return cls(Job.from_pb(msg.job), progress)


@dataclass(frozen=True)
class ModelInfo:
    model: ModelRef
    available: bool
    reason: str  # why the version is unavailable
    is_default: bool
    cell: str
    hidden: int
    layers: int
    vocab_size: int
    bits_per_char: float | None
    file_bytes: int

    @classmethod
    def from_pb(cls, msg: pb.ModelInfo) -> ModelInfo:
        return cls(
            ModelRef.from_pb(msg.model),
            msg.available,
            msg.reason,
            msg.is_default,
            msg.cell,
            msg.hidden,
            msg.layers,
            msg.vocab_size,
            msg.bits_per_char if msg.HasField("bits_per_char") else None,
            msg.file_bytes,
        )


@dataclass(frozen=True)
class ModelDetails:
    info: ModelInfo
    vocab: str
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_pb(cls, msg: pb.DescribeModelResponse) -> ModelDetails:
        def parse(text: str) -> dict[str, Any]:
            value = json.loads(text) if text else {}
            return value if isinstance(value, dict) else {"value": value}

        return cls(
            ModelInfo.from_pb(msg.info),
            msg.vocab,
            parse(msg.config_json),
            parse(msg.summary_json),
            parse(msg.meta_json),
        )

    def __repr__(self) -> str:
        """The facts that tell versions apart; the whole of config, summary and meta (which
        repeats both) would fill a screen."""
        i = self.info
        bits = f", {i.bits_per_char:.3f} bits/char" if i.bits_per_char is not None else ""
        default = " (default)" if i.is_default else ""
        return (
            f"<ModelDetails {i.model}{default}: {i.cell}, hidden {i.hidden}, {i.layers} layer(s), "
            f"{len(self.vocab)} characters{bits}>"
        )


@dataclass(frozen=True)
class Generation:
    """Generated text: ``text`` is what the model wrote after ``prime``; ``str()`` of it reads on
    from the prime, as ``nextchar generate`` prints it. With a session, offset is where the
    session stands after it."""

    text: str
    model: ModelRef
    session_id: str  # "" for session-less or forked generation
    offset: int
    prime: str = ""  # the text it continues (given, not generated)

    def __str__(self) -> str:
        return self.prime + self.text

    @classmethod
    def collect(
        cls,
        pieces: Iterable[pb.GenerateResponse],
        on_piece: Callable[[str], None] | None = None,
        prime: str = "",
    ) -> Generation:
        """Join a Generate stream's pieces, handing each to on_piece as it arrives."""
        text: list[str] = []
        last = pb.GenerateResponse()
        for last in pieces:
            text.append(last.text)
            if on_piece is not None:
                on_piece(last.text)
        return cls("".join(text), ModelRef.from_pb(last.model), last.session_id, last.offset, prime)
