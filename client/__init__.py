"""nextchar.client: the Python client library (the ``nextchar`` command line is nextchar.cli).

from nextchar.client import NextCharClient

with NextCharClient("127.0.0.1:50051") as c, c.session() as s:
    for p in s.stream(["hello ", "world"]):
        print(p.next_chars)

Importing this package loads nothing: each name below is imported on first use
(PEP 562 ``__getattr__``), so a command that only shows its help never pays for
gRPC (about 60 ms). Type checkers read the imports under TYPE_CHECKING.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nextchar.client.channel import Tls
    from nextchar.client.defaults import DEFAULT_TARGET, DEFAULT_TIMEOUT
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
        RewindTooFar,
        ServerError,
        SessionExpired,
        SessionNotFound,
        TrainingFailed,
        Unauthenticated,
        Unavailable,
    )
    from nextchar.client.library import NextCharClient
    from nextchar.client.results import (
        Candidate,
        CharPrediction,
        Completion,
        Generation,
        Job,
        JobEvent,
        ModelDetails,
        ModelInfo,
        ModelRef,
        Predictions,
        Progress,
        Rewind,
        SessionInfo,
    )
    from nextchar.client.session import Session
    from nextchar.client.training import TrainingRun
    from nextchar.core.config import ModelConfig, TrainConfig

_HOME = {  # public name -> the module that defines it
    "Tls": "nextchar.client.channel",
    "AlreadyExists": "nextchar.client.errors",
    "Cancelled": "nextchar.client.errors",
    "DeadlineExceeded": "nextchar.client.errors",
    "FailedPrecondition": "nextchar.client.errors",
    "InvalidArgument": "nextchar.client.errors",
    "JobNotFound": "nextchar.client.errors",
    "ModelNotFound": "nextchar.client.errors",
    "NextCharError": "nextchar.client.errors",
    "NotFound": "nextchar.client.errors",
    "OffsetMismatch": "nextchar.client.errors",
    "Overloaded": "nextchar.client.errors",
    "RewindTooFar": "nextchar.client.errors",
    "ServerError": "nextchar.client.errors",
    "SessionExpired": "nextchar.client.errors",
    "SessionNotFound": "nextchar.client.errors",
    "TrainingFailed": "nextchar.client.errors",
    "Unauthenticated": "nextchar.client.errors",
    "Unavailable": "nextchar.client.errors",
    "DEFAULT_TARGET": "nextchar.client.defaults",
    "DEFAULT_TIMEOUT": "nextchar.client.defaults",
    "NextCharClient": "nextchar.client.library",
    "Candidate": "nextchar.client.results",
    "CharPrediction": "nextchar.client.results",
    "Completion": "nextchar.client.results",
    "Generation": "nextchar.client.results",
    "Job": "nextchar.client.results",
    "JobEvent": "nextchar.client.results",
    "ModelDetails": "nextchar.client.results",
    "ModelInfo": "nextchar.client.results",
    "ModelRef": "nextchar.client.results",
    "Predictions": "nextchar.client.results",
    "Progress": "nextchar.client.results",
    "Rewind": "nextchar.client.results",
    "SessionInfo": "nextchar.client.results",
    "Session": "nextchar.client.session",
    "TrainingRun": "nextchar.client.training",
    "ModelConfig": "nextchar.core.config",
    "TrainConfig": "nextchar.core.config",
}
__all__ = [
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "AlreadyExists",
    "Cancelled",
    "Candidate",
    "CharPrediction",
    "Completion",
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
    "Rewind",
    "RewindTooFar",
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


def __getattr__(name: str) -> Any:
    """Import a public name from its module the first time it is asked for, then keep it."""
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value
