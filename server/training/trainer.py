"""The trainer: one training job in its own process (spawn), so training never stalls serving.

It imports only nextchar.core. It resumes from the job's checkpoint when there is
one, writes a new checkpoint (atomically, into the job's directory) at every epoch's
end and every checkpoint_seconds, and pauses (checkpoint, then stop) when its pool
asks (nextchar.server.training.pool, in ``nextchar serve`` or ``nextchar trainer``).
Progress records go to the parent over a pipe as they happen, in the messages of
nextchar.server.training.pipe; the last is exactly one of Done, Paused, Failed or
Cancelled. The trained model travels back over the pipe (a ModelPayload, with the
adaptation train() tuned at its end) and the parent writes the model file, so the
registry has one writer.
"""

from __future__ import annotations

import contextlib
import os
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path

from nextchar.core.config import ModelConfig, TrainConfig

NICE = 10  # below serving: on a 2-core machine a trainer must not take the server's cores from it


def below_serving(pid: int) -> None:
    """Put the trainer process pid NICE below its parent, the server: from the parent, as soon as
    it is started. Set by the trainer itself, it came only once the new interpreter had started
    and imported its modules: ~60 ms of CPU per job at the server's priority."""
    with contextlib.suppress(OSError):  # (gone already)
        os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + NICE))


def run_training(
    text_path: str,
    checkpoint_path: str,
    model_config: ModelConfig,
    train_config: TrainConfig,
    checkpoint_seconds: float,
    conn: Connection,
    stop: Event,
    pause: Event,
    parent_pid: int,
) -> None:
    from nextchar.server.lifeline import die_with_parent

    die_with_parent(parent_pid)  # a SIGKILLed server's job has nobody to report to
    from nextchar.core import checkpoint as ck
    from nextchar.core.modelfile import ModelPayload
    from nextchar.core.train import TrainingCancelled, TrainingDiverged, TrainingPaused, train
    from nextchar.server.training import pipe

    def keep(checkpoint: ck.Checkpoint) -> None:
        ck.save(checkpoint_path, checkpoint)
        pipe.send(conn, pipe.Checkpointed(checkpoint.position))

    try:
        text = Path(text_path).read_text(encoding="utf-8")
        resume = ck.load(checkpoint_path) if Path(checkpoint_path).is_file() else None
        result = train(
            text,
            model_config,
            train_config,
            on_progress=lambda record: pipe.send(conn, pipe.Progress(record)),
            should_stop=stop.is_set,
            should_pause=pause.is_set,
            on_checkpoint=keep,
            checkpoint_seconds=checkpoint_seconds,
            resume=resume,
        )
        adapt = None if result.adapt is None else result.adapt.to_dict()
        pipe.send(conn, pipe.Done(ModelPayload.of(result.model), result.history, result.summary, adapt))
    except TrainingPaused as exc:
        pipe.send(conn, pipe.Paused(str(exc)))
    except TrainingDiverged as exc:
        pipe.send(conn, pipe.Failed(f"diverged: {exc}"))
    except TrainingCancelled:
        pipe.send(conn, pipe.Cancelled("cancelled by request"))
    except Exception as exc:  # whatever went wrong, the parent must hear why
        pipe.send(conn, pipe.Failed(f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()
