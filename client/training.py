"""Training jobs from the client side: the Train request, and a run to follow or leave.

The job runs in a worker process on the server; this stream only watches it. So
a client may stop listening (``detach``) and the job carries on, or ask the
server to stop it (``cancel``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from nextchar.client.errors import ServerError
from nextchar.client.results import Job, JobEvent, Progress
from nextchar.core.config import ModelConfig, TrainConfig, check_length
from nextchar.proto import nextchar_pb2 as pb

INLINE_TEXT_BYTES = 1024 * 1024  # a bigger training text is uploaded in pieces first (UploadText)
PIECE_CHARS = 64 * 1024  # characters per uploaded piece: at most 256 KiB of UTF-8


def upload_pieces(parts: Iterable[str]) -> Iterator[pb.UploadTextRequest]:
    """UploadText requests for a text given in parts of any size."""
    for part in parts:
        for start in range(0, len(part), PIECE_CHARS):
            yield pb.UploadTextRequest(piece=part[start : start + PIECE_CHARS])


def train_request(
    name: str,
    model_config: ModelConfig | None,
    train_config: TrainConfig | None,
    promote: bool,
    *,
    chars: int,
    text: str = "",
    text_id: str = "",
) -> pb.TrainRequest:
    """A TrainRequest for a text of ``chars`` characters, checked locally by core's own rules
    first (a ValueError names the problem): the text itself, or the id it was uploaded under
    (UploadText), so that it does not travel again."""
    mc, tc = model_config or ModelConfig(), train_config or TrainConfig()
    check_length(chars, tc)
    return pb.TrainRequest(
        model_name=name,
        text=text,
        text_id=text_id,
        model_config=pb.ModelConfigSpec(
            cell=mc.cell, hidden=mc.hidden, layers=mc.layers, loss=mc.loss, dtype=mc.dtype
        ),
        train_config=pb.TrainConfigSpec(**tc.to_dict()),
        promote=promote,
    )


class TrainingRun(Iterator[JobEvent]):
    """A training job being watched: iterate its events; ``job`` is the latest status seen."""

    def __init__(
        self,
        events: Iterator[pb.JobEvent],
        stop_listening: Callable[[], None],
        cancel_job: Callable[[str], Job],
    ) -> None:
        self._events = events
        self._stop_listening = stop_listening
        self._cancel_job = cancel_job
        self.job: Job | None = None

    def __next__(self) -> JobEvent:
        event = JobEvent.from_pb(next(self._events))
        self.job = event.job
        return event

    def started(self) -> TrainingRun:
        """Wait for the server's first event (it names the job: queued or running); returns self."""
        if self.job is None:
            next(self, None)
        if self.job is None:
            raise ServerError("the training stream ended before the server named the job")
        return self

    @property
    def job_id(self) -> str:
        """The job's id; waits for the server's first event if none arrived yet."""
        job = self.started().job
        assert job is not None
        return job.job_id

    def wait(self, on_progress: Callable[[Progress], None] | None = None) -> Job:
        """Follow the job to its end, calling on_progress for every progress record."""
        for event in self:
            if event.progress is not None and on_progress is not None:
                on_progress(event.progress)
        if self.job is None:
            raise ServerError("the training stream ended before the server named the job")
        return self.job

    def detach(self) -> None:
        """Stop listening; the job keeps running on the server."""
        self._stop_listening()

    def cancel(self) -> Job:
        """Ask the server to stop the job (it registers nothing), and stop listening."""
        job = self._cancel_job(self.job_id)
        self._stop_listening()
        return job
