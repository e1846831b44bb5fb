"""nextchar.client: the Python client library and the Typer CLI (``nextchar``).

from nextchar.client import NextCharClient

with NextCharClient("127.0.0.1:50051") as c, c.session() as s:
    for p in s.stream(["hello ", "world"]):
        print(p.next_chars)
"""

from nextchar.client.channel import Tls
from nextchar.client.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    JobNotFound,
    ModelNotFound,
    NextCharError,
    NotFound,
    OffsetMismatch,
    Overloaded,
    ServerError,
    SessionExpired,
    SessionNotFound,
    TrainingFailed,
    Unauthenticated,
    Unavailable,
)
from nextchar.client.library import DEFAULT_TIMEOUT, NextCharClient
from nextchar.client.results import (
    Candidate,
    CharPrediction,
    Generation,
    Job,
    JobEvent,
    ModelDetails,
    ModelInfo,
    ModelRef,
    Predictions,
    Progress,
    SessionInfo,
)
from nextchar.client.session import Session
from nextchar.client.training import TrainingRun
from nextchar.core.config import ModelConfig, TrainConfig

__all__ = [
    "DEFAULT_TIMEOUT",
    "AlreadyExists",
    "Cancelled",
    "Candidate",
    "CharPrediction",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Generation",
    "InvalidArgument",
    "Job",
    "JobEvent",
    "JobNotFound",
    "ModelConfig",
    "ModelDetails",
    "ModelInfo",
    "ModelNotFound",
    "ModelRef",
    "NextCharClient",
    "NextCharError",
    "NotFound",
    "OffsetMismatch",
    "Overloaded",
    "Predictions",
    "Progress",
    "ServerError",
    "Session",
    "SessionExpired",
    "SessionInfo",
    "SessionNotFound",
    "Tls",
    "TrainConfig",
    "TrainingFailed",
    "TrainingRun",
    "Unauthenticated",
    "Unavailable",
]
