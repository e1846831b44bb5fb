"""The trainer: one training job in its own process (spawn), so training never stalls serving.

It imports only nextchar.core. Progress records go to the parent over a pipe as
they happen; the last message is exactly one of ("done", payload), ("failed", why)
or ("cancelled", why). The trained parameters travel back over the pipe and the
parent writes the model file, so the registry has one writer.
"""

from __future__ import annotations

from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any


def run_training(
    text_path: str,
    model_config: dict[str, Any],
    train_config: dict[str, Any],
    conn: Connection,
    stop: Event,
    parent_pid: int,
) -> None:
    from nextchar.server.lifeline import die_with_parent

    die_with_parent(parent_pid)  # a SIGKILLed server's job has nobody to report to
    from nextchar.core.config import ModelConfig, TrainConfig
    from nextchar.core.train import TrainingCancelled, TrainingDiverged, train

    try:
        text = Path(text_path).read_text(encoding="utf-8")
        result = train(
            text,
            ModelConfig(**model_config),
            TrainConfig(**train_config),
            on_progress=lambda record: conn.send(("progress", record)),
            should_stop=stop.is_set,
        )
        payload = {
            "config": result.model.config.to_dict(),
            "vocab": result.model.vocab.chars,
            "params": result.model.params,
            "history": result.history,
            "summary": result.summary,
        }
        conn.send(("done", payload))
    except TrainingDiverged as exc:
        conn.send(("failed", f"diverged: {exc}"))
    except TrainingCancelled:
        conn.send(("cancelled", "cancelled by request"))
    except Exception as exc:  # whatever went wrong, the parent must hear why
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()
