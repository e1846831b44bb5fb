"""Conversions from server objects to nextchar.v1 messages, so the servicer stays a thin adapter.

Predictions are packed as parallel repeated scalars (one list per field, n*k long),
never one sub-message per character: a nested message costs ~3 µs to build, which
would cap 64-character chunks near 200,000 characters/s.
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import numpy as np
from nextchar.core.inference import top_k_rows
from nextchar.proto import nextchar_pb2 as pb
from nextchar.server.registry import ModelVersion
from nextchar.server.sessions.session import Session
from nextchar.server.training.store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Job

JOB_STATES = {
    QUEUED: pb.JOB_STATE_QUEUED,
    RUNNING: pb.JOB_STATE_RUNNING,
    SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    FAILED: pb.JOB_STATE_FAILED,
    CANCELLED: pb.JOB_STATE_CANCELLED,
}


def model_ref(mv: ModelVersion | None) -> pb.ModelRef:
    return pb.ModelRef(name=mv.name, version=mv.version) if mv else pb.ModelRef()


def session_info(session: Session, idle_timeout: float, lifetime: float) -> pb.SessionInfo:
    adapter = session.value.adapter
    return pb.SessionInfo(
        session_id=session.id,
        model=model_ref(session.model),
        offset=session.offset,
        created_at=session.created,
        last_used_at=session.last_used,
        idle_expires_at=session.last_used + idle_timeout,
        lifetime_expires_at=session.created + lifetime if lifetime else 0.0,
        rewind_limit=session.value.rewind_limit,
        adaptive=adapter is not None,
        adapt_steps=adapter.steps if adapter is not None else 0,
        adapt_resets=adapter.resets if adapter is not None else 0,
    )


def fill_next(msg: pb.NextChars, probs: np.ndarray, k: int) -> None:
    """The k likeliest next characters under probs (V,), the way a chunk's rows rank them."""
    top_i, top_p = top_k_rows(probs[None, :], k)
    msg.top_index.extend(top_i[0].tolist())
    msg.top_prob.extend(top_p[0].astype(np.float32).tolist())


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def progress(record: dict[str, Any]) -> pb.ProgressRecord:
    msg = pb.ProgressRecord(
        kind=str(record.get("kind", "")),
        epoch=int(record.get("epoch", 0)),
        step=int(record.get("step", 0)),
        chars=int(record.get("chars", 0)),
        total_chars=int(record.get("total_chars", 0)),
        train_loss=float(record.get("train_loss") or 0.0),
        train_bpc=float(record.get("train_bpc") or 0.0),
    )
    for name in ("val_loss", "val_bpc", "chars_per_sec", "elapsed", "eta_seconds", "wall_seconds", "lr"):
        value = _finite(record.get(name))
        if value is not None:
            setattr(msg, name, value)
    return msg


def job_info(job: Job, queue_position: int = 0) -> pb.JobInfo:
    msg = pb.JobInfo(
        queue_position=queue_position,
        attempts=job.attempts,
        job_id=job.id,
        state=JOB_STATES[job.state],
        model_name=job.model_name,
        error=job.error,
        started_at=job.started,
        finished_at=job.finished,
        model_config_json=json.dumps(job.model_config.to_dict()),
        train_config_json=json.dumps(job.train_config.to_dict()),
    )
    if job.result is not None:
        msg.result.CopyFrom(pb.ModelRef(name=job.result[0], version=job.result[1]))
    if job.latest is not None:
        msg.latest.CopyFrom(progress(job.latest))
    return msg


def job_event(job: Job, record: dict[str, Any] | None, queue_position: int = 0) -> pb.JobEvent:
    event = pb.JobEvent(job=job_info(job, queue_position))
    if record is not None:
        event.progress.CopyFrom(progress(record))
    return event


def bits_per_char(mv: ModelVersion) -> float | None:
    summary = mv.summary or {}
    return _finite(summary.get("val_bpc")) or _finite(summary.get("train_bpc"))


def model_info(mv: ModelVersion, default: ModelVersion | None) -> pb.ModelInfo:
    msg = pb.ModelInfo(
        model=model_ref(mv),
        available=mv.available,
        reason=mv.reason,
        is_default=mv is default,
    )
    with contextlib.suppress(OSError):
        msg.file_bytes = mv.path.stat().st_size
    config = mv.config  # the file's: no network needed
    if config is not None:
        msg.cell, msg.hidden, msg.layers = config.cell, config.hidden, config.layers
        msg.vocab_size = len(mv.vocab_chars) + 1  # the unknown slot
    bpc = bits_per_char(mv)
    if bpc is not None:
        msg.bits_per_char = bpc
    return msg
