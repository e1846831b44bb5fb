"""The trainer: one training job in its own process (spawn), so training never stalls serving.

It imports only nextchar.core. It resumes from the job's checkpoint when there is
one, writes a new checkpoint (atomically, into the job's directory) at every epoch's
end and every checkpoint_seconds, and pauses (checkpoint, then stop) when its pool
asks (nextchar.server.training.pool, in ``nextchar serve`` or ``nextchar trainer``).
Progress records go to the parent over a pipe as they happen; the last
message is exactly one of ("done", payload), ("paused", position), ("failed", why)
or ("cancelled", why). The trained parameters travel back over the pipe and the
parent writes the model file, so the registry has one writer.
"""

from __future__ import annotations

import os
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

NICE = 10  # below serving: on a 2-core machine a trainer must not take the server's cores from it


def run_training(
    text_path: str,
    checkpoint_path: str,
    model_config: dict[str, Any],
    train_config: dict[str, Any],
    checkpoint_seconds: float,
    conn: Connection,
    stop: Event,
    pause: Event,
    parent_pid: int,
) -> None:
    from nextchar.server.lifeline import die_with_parent

    die_with_parent(parent_pid)  # a SIGKILLed server's job has nobody to report to
    os.nice(NICE)
    from nextchar.core import checkpoint as ck
    from nextchar.core.config import ModelConfig, TrainConfig
    from nextchar.core.train import TrainingCancelled, TrainingDiverged, TrainingPaused, train

    def keep(checkpoint: ck.Checkpoint) -> None:
        ck.save(checkpoint_path, checkpoint)
        conn.send(("checkpoint", checkpoint.position))

    try:
        text = Path(text_path).read_text(encoding="utf-8")
        resume = ck.load(checkpoint_path) if Path(checkpoint_path).is_file() else None
        result = train(
            text,
            ModelConfig(**model_config),
            TrainConfig(**train_config),
            on_progress=lambda record: conn.send(("progress", record)),
            should_stop=stop.is_set,
            should_pause=pause.is_set,
            on_checkpoint=keep,
            checkpoint_seconds=checkpoint_seconds,
            resume=resume,
        )
        payload = {
            "config": result.model.config.to_dict(),
            "vocab": result.model.vocab.chars,
            "params": result.model.params,
            "history": result.history,
            "summary": result.summary,
        }
        conn.send(("done", payload))
    except TrainingPaused as exc:
        conn.send(("paused", str(exc)))
    except TrainingDiverged as exc:
        conn.send(("failed", f"diverged: {exc}"))
    except TrainingCancelled:
        conn.send(("cancelled", "cancelled by request"))
    except Exception as exc:  # whatever went wrong, the parent must hear why
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()
