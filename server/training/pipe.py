"""What a trainer process says to its pool over their pipe: one frozen class per kind of message.

A trainer (nextchar.server.training.trainer) sends any number of ``Progress`` and
``Checkpointed``, then exactly one final message: ``Done``, ``Paused``, ``Failed``
or ``Cancelled``. The pool (nextchar.server.training.pool) matches on the class, so
mypy checks that every kind is handled and that each carries what it says, where
tagged tuples were checked by nobody. ``receive`` refuses anything else (a child of
another version, a bug) as a PipeError instead of misreading it.

The messages are plain data (a finished model as a ModelPayload, never a CharRNN)
and this module imports nothing of the server, so a child that imports only
nextchar.core can import it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from nextchar.core.modelfile import ModelPayload


class PipeError(Exception):
    """The peer sent something that is no message of this protocol."""


@dataclass(frozen=True, slots=True)
class Progress:
    record: dict[str, Any]  # a progress record (nextchar.core.train), as the job store keeps it


@dataclass(frozen=True, slots=True)
class Checkpointed:
    position: str  # where the checkpoint the trainer just wrote stands, for the log


@dataclass(frozen=True, slots=True)
class Done:
    model: ModelPayload
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    adapt: dict[str, Any] | None = None  # the tuned AdaptConfig, as its to_dict (plain data)


@dataclass(frozen=True, slots=True)
class Paused:
    position: str  # the trainer checkpointed there and stopped: the job resumes from it


@dataclass(frozen=True, slots=True)
class Failed:
    why: str


@dataclass(frozen=True, slots=True)
class Cancelled:
    why: str


FromTrainer = Progress | Checkpointed | Done | Paused | Failed | Cancelled
KINDS = (Progress, Checkpointed, Done, Paused, Failed, Cancelled)


def send(conn: Connection, message: FromTrainer) -> None:
    conn.send(message)


def receive(conn: Connection) -> FromTrainer:
    """The next message (blocking); EOFError or OSError once the trainer is gone."""
    message = conn.recv()
    if not isinstance(message, KINDS):
        raise PipeError(f"not a trainer message: {type(message).__name__}")
    return message
