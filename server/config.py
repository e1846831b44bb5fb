"""ServerConfig: every limit and default of the service in one dataclass, passed explicitly.

The defaults are what ``nextchar serve`` with no arguments uses. Limits exist so one
client cannot take the server down: a chunk cap bounds the work of one message, a
session cap bounds memory (at it, only a session idle for a while makes room for a new one), and
idle sessions expire after minutes, not seconds, so a client can reconnect and resume.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


def check_security(config: ServerConfig) -> None:
    """Refuse half-configured TLS and tokens that cannot travel as a gRPC metadata value."""
    token = config.token
    if token and not (token.isascii() and token.isprintable() and " " not in token):
        raise ValueError("token: must be printable ASCII without spaces (it travels as a gRPC header)")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ValueError("tls_cert, tls_key: give both, the certificate chain and its private key")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise ValueError("tls_client_ca: client certificates need TLS; give tls_cert and tls_key too")


def default_model_dir() -> Path:
    """$XDG_DATA_HOME/nextchar/models, else ~/.local/share/nextchar/models (the XDG default)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "nextchar" / "models"


def _opt(text: str, **more: object) -> dict[str, object]:
    """A field's command-line face (nextchar.cli.options reads it): help text, and optionally
    flags (its option names), choices, file (an existing file) or secret (no default shown)."""
    return {"help": text, **more}


# Fields nextchar serve and nextchar trainer share: one definition each, for both configs.


def _model_dir() -> Any:
    return field(default_factory=default_model_dir, metadata=_opt("Model registry directory."))


def _store(what: str) -> Any:
    # "" keeps sessions and jobs in this process and its model_dir; redis://HOST:PORT/DB shares
    # them, and the models, between replicas and trainers (docs/deploy.md)
    return field(default="", metadata=_opt(what))


def _shared_models() -> Any:
    # replicas that still read one shared directory (or identical copies) keep doing so
    return field(
        default=True,
        metadata=_opt(
            "With --store: model files kept in the store too, cached in --model-dir "
            "(--local-models: each process reads its own --model-dir).",
            flags=("--shared-models/--local-models",),
        ),
    )


def _checkpoint_seconds() -> Any:
    # a crash loses at most this much training (and an epoch's end always checkpoints)
    return field(
        default=60.0, metadata=_opt("Seconds between a training job's checkpoints (and every epoch).")
    )


def _job_lease() -> Any:
    # a trainer renews it every third of it; a dead trainer's job waits this long for another
    return field(
        default=15.0,
        metadata=_opt(
            "Seconds a trainer's hold on a job lasts unrenewed (shared store): then another takes it."
        ),
    )


def _log_format() -> Any:
    # json: one object per line, with the session id where there is one
    return field(default="text", metadata=_opt("Log lines as text or JSON.", choices=("text", "json")))


def _log_level() -> Any:
    return field(
        default="info",
        metadata=_opt("Least severe log level shown.", choices=("debug", "info", "warning", "error")),
    )


def _check(config: object, checks: dict[str, bool]) -> None:
    for name, ok in checks.items():
        if not ok:
            raise ValueError(f"{name}: out of range ({getattr(config, name)!r})")


def _shared_checks(config: ServerConfig | TrainerConfig) -> dict[str, bool]:
    return {
        "checkpoint_seconds": config.checkpoint_seconds > 0,
        "job_lease": config.job_lease >= 1,
        "store": config.store == "" or config.store.startswith(("redis://", "rediss://", "unix://")),
        "log_format": config.log_format in ("text", "json"),
        "log_level": config.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
    }


@dataclass(frozen=True)
class ServerConfig:
    # loopback by default; listen wider only with a token and TLS
    host: str = field(default="127.0.0.1", metadata=_opt("Interface to listen on."))
    port: int = field(default=50051, metadata=_opt("Port; 0 picks a free one."))
    model_dir: Path = _model_dir()  # noqa: RUF009 (a field(), as the others)
    # ~1 KB each beyond the state: well under 1 GB at H=256
    max_sessions: int = field(
        default=100_000,
        metadata=_opt(
            "Cap on live sessions; at it, the session idle the longest makes room for a new one "
            "(if idle --session-evict-idle seconds), else the new one is refused."
        ),
    )
    # HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS: a client's streams past it wait in the client. One
    # connection opening thousands of streams at once otherwise filled gRPC's queue of calls not
    # yet handed to the server (it accepts them one loop turn at a time), and gRPC then cancelled
    # new calls of every other client (make bench-abuse: 74 of 100 well-behaved streams CANCELLED)
    max_streams_per_connection: int = field(
        default=1000,
        metadata=_opt(
            "Streams one client connection may have open at once (HTTP/2 MAX_CONCURRENT_STREAMS); "
            "more wait in the client until one ends. A client needing more opens more connections."
        ),
    )
    # a floor, so a flood of new sessions cannot evict sessions in use; filling the cap with
    # sessions nobody uses locks others out for at most this long (they are the idle ones)
    session_evict_idle: float = field(
        default=60.0,
        metadata=_opt("Seconds a session must have been idle before it may be evicted at the cap."),
    )
    # an open call holds ~14 KB of the server's memory, so what clients can hold open is bounded;
    # the longest idle is closed for a new one (refusing new ones would let idle holders lock
    # every other client out)
    max_streams: int = field(
        default=10_000,
        metadata=_opt(
            "Calls their clients hold open at once (streams, uploads); beyond it the one idle "
            "the longest is closed to make room."
        ),
    )
    # a connection holds a file descriptor and ~100 KB of gRPC's buffers: one that only answers
    # PINGs (500 of them at a 1,024 fd limit made new clients time out) would be kept for good;
    # a client with a call open is never closed by this, and clients reconnect on the next call
    max_connection_idle: float = field(
        default=300.0,
        metadata=_opt(
            "Seconds a client connection with no call open is kept; then it is closed (GOAWAY). "
            "0 = kept for good."
        ),
    )
    # finds dead peers of long-lived streams (a peer that answers is alive, idle or not)
    keepalive_time: float = field(
        default=60.0, metadata=_opt("Seconds between the server's PINGs on each client connection.")
    )
    # long enough to reconnect after a network blip
    idle_timeout: float = field(default=30 * 60.0, metadata=_opt("Seconds an unused session lives."))
    session_lifetime: float = field(default=0.0, metadata=_opt("Seconds any session lives; 0 = unlimited."))
    max_chunk_chars: int = field(default=4096, metadata=_opt("Characters per prediction message."))
    max_top_k: int = field(default=256, metadata=_opt("Most candidates a prediction may ask for."))
    max_generate_chars: int = field(
        default=100_000, metadata=_opt("Most characters one Generate may produce.")
    )
    # priming is compute on the caller's behalf before any reply: bound it like a generation
    max_prime_chars: int = field(
        default=100_000, metadata=_opt("Most characters of prime_text (CreateSession, Generate).")
    )
    # a session keeps marks about rewind_chars/4 apart and the text since the oldest
    # (nextchar.server.sessions.trail): about 7 KB per session at H=256; 0 turns rewinds off
    rewind_chars: int = field(
        default=256, metadata=_opt("Characters a session can always take back (RewindSession, Backspace).")
    )
    # off by default: an adaptive session costs ~280 KB (two adapters of the default model) and
    # a gradient step every 20 characters (docs/adaptation.md)
    adapt: bool = field(
        default=False,
        metadata=_opt(
            "Sessions that do not say (CreateSession/Predict/PredictStream adapt) adapt to their writer."
        ),
    )
    max_adaptive_sessions: int = field(
        default=1000,
        metadata=_opt(
            "Adaptive sessions this server holds at once; beyond it adaptive creations are refused."
        ),
    )
    # a training text's distinct characters: the output layer, and every step's (T*B, V)
    # arrays, grow with it (tens of thousands of characters need gigabytes per trainer)
    max_vocab: int = field(default=2048, metadata=_opt("Most distinct characters a training text may hold."))
    # every request is small (big training texts come in pieces: UploadText), and gRPC refuses a
    # bigger message from its length prefix, before it takes any memory
    max_message_bytes: int = field(default=4 * MIB, metadata=_opt("Largest gRPC message, in bytes."))
    max_upload_bytes: int = field(
        default=1024 * MIB, metadata=_opt("Largest training text UploadText takes.")
    )
    # uploaded texts wait on disk (an hour) for a Train to name them: without a total, a client
    # uploading again and again fills the disk the models and checkpoints are written to
    max_pending_upload_bytes: int = field(
        default=4096 * MIB,
        metadata=_opt(
            "Bytes of uploaded texts kept at once until a Train takes them; uploads beyond are refused."
        ),
    )
    # big replies (full distributions of long chunks) held at once, across all clients: a client
    # that never reads keeps its reply in this server's memory (nextchar.server.budget)
    max_reply_bytes: int = field(
        default=16 * MIB, metadata=_opt("Bytes of big replies the server holds unread at once.")
    )
    # the machine has 2 cores and serves too; 0 leaves training to `nextchar trainer` processes
    max_jobs: int = field(
        default=1,
        metadata=_opt(
            "Trainers this server runs (jobs at once; more wait in the queue); 0 = none.",
            flags=("--trainers", "--max-jobs"),
        ),
    )
    # a queued job keeps its text (up to max_upload_bytes) in the job store until a trainer runs it
    max_queued_jobs: int = field(
        default=100, metadata=_opt("Jobs waiting for a trainer at once; a Train beyond it is refused.")
    )
    # every job adds a version, on the registry's disk (and in every replica's cache with a shared
    # store): without a total, training again and again fills the disk the checkpoints go to
    max_model_bytes: int = field(
        default=4096 * MIB,
        metadata=_opt("Model files the registry keeps, together; a Train is refused beyond it."),
    )
    max_finished_jobs: int = field(
        default=1000,
        metadata=_opt("Ended jobs kept (listed, watchable, resumable when failed); older ones are removed."),
    )
    checkpoint_seconds: float = _checkpoint_seconds()
    job_lease: float = _job_lease()
    grace: float = field(default=10.0, metadata=_opt("Seconds live streams get to finish on SIGTERM."))
    sweep_interval: float = field(default=30.0, metadata=_opt("Seconds between idle-session sweeps."))
    train_default_if_empty: bool = field(
        default=True,
        metadata=_opt(
            "Install the shipped default model (a GRU trained on Shakespeare) when the registry is empty.",
            flags=("--default-model/--no-default-model",),
        ),
    )
    # batches of at most this many characters run on the event loop; bigger ones off it,
    # where NumPy's products overlap gRPC work (a hop costs more than a small batch)
    batch_inline_chars: int = field(
        default=1024, metadata=_opt("Batches of at most this many characters compute on the event loop.")
    )
    # off the loop: in the compute process (nextchar.server.batching.process), free of the
    # server's GIL; False: in a thread (slower: ~160k against ~230k chars/s in 64-char chunks)
    compute_process: bool = field(
        default=True,
        metadata=_opt(
            "Compute big batches in a separate process (off the server's GIL) or in a thread.",
            flags=("--compute-process/--compute-in-thread",),
        ),
    )
    # security (nextchar.server.auth): an empty token means no authentication;
    # repr=False because configs get logged and the token must not be
    token: str = field(
        default="", repr=False, metadata=_opt("Demand this bearer token on every call.", secret=True)
    )
    # with tls_key the port speaks TLS only
    tls_cert: Path | None = field(
        default=None, metadata=_opt("Serve TLS with this certificate chain (PEM).", file=True)
    )
    tls_key: Path | None = field(
        default=None, metadata=_opt("The certificate's private key (PEM).", file=True)
    )
    tls_client_ca: Path | None = field(
        default=None, metadata=_opt("Demand client certificates signed by this CA (mutual TLS).", file=True)
    )
    # observability (nextchar.server.metrics, nextchar.server.logs)
    metrics_port: int | None = field(
        default=None, metadata=_opt("Serve Prometheus /metrics on this port; 0 = any free.")
    )
    # the HTTP/JSON + WebSocket API and the playground (nextchar.server.httpapi): same rules,
    # token and TLS as the gRPC port
    http_port: int | None = field(
        default=None,
        metadata=_opt("Serve the HTTP/JSON and WebSocket API and the playground on this port; 0 = any free."),
    )
    log_format: str = _log_format()
    log_level: str = _log_level()
    store: str = _store("redis://HOST:PORT/DB: sessions, jobs and models shared by replicas; local if unset.")
    shared_models: bool = _shared_models()
    # with a shared store the version moves every message; 1 = the state too, so a
    # replica's crash loses nothing that was answered
    store_write_every: int = field(
        default=1,
        metadata=_opt("Characters between a session's state writes to the store (1 = every message)."),
    )

    def __post_init__(self) -> None:
        checks = {
            "port": 0 <= self.port <= 65535,
            "max_sessions": self.max_sessions >= 1,
            "session_evict_idle": self.session_evict_idle >= 0,
            "max_streams": self.max_streams >= 1,
            "max_streams_per_connection": self.max_streams_per_connection >= 1,
            "max_connection_idle": self.max_connection_idle >= 0,
            "keepalive_time": self.keepalive_time >= 0.01,
            "idle_timeout": self.idle_timeout > 0,
            "session_lifetime": self.session_lifetime >= 0,
            "max_chunk_chars": self.max_chunk_chars >= 1,
            "max_top_k": self.max_top_k >= 1,
            "max_generate_chars": self.max_generate_chars >= 1,
            "max_prime_chars": self.max_prime_chars >= 1,
            "rewind_chars": 0 <= self.rewind_chars <= 1_000_000,
            "max_adaptive_sessions": self.max_adaptive_sessions >= 0,
            "max_vocab": self.max_vocab >= 1,
            "max_message_bytes": self.max_message_bytes >= 4096,
            "max_upload_bytes": self.max_upload_bytes >= 1,
            "max_pending_upload_bytes": self.max_pending_upload_bytes >= 1,
            "max_queued_jobs": self.max_queued_jobs >= 1,
            "max_finished_jobs": self.max_finished_jobs >= 0,
            "max_model_bytes": self.max_model_bytes >= 1,
            "max_reply_bytes": self.max_reply_bytes >= 1,
            "max_jobs": self.max_jobs >= 0,
            "grace": self.grace >= 0,
            "sweep_interval": self.sweep_interval > 0,
            "batch_inline_chars": self.batch_inline_chars >= 0,
            "store_write_every": self.store_write_every >= 1,
            "metrics_port": self.metrics_port is None or 0 <= self.metrics_port <= 65535,
            "http_port": self.http_port is None or 0 <= self.http_port <= 65535,
            **_shared_checks(self),
        }
        _check(self, checks)
        if self.max_jobs == 0 and not self.store:
            raise ValueError(
                "max_jobs: 0 trainers needs a shared store (--store): no other trainer could take a job"
            )
        check_security(self)
        object.__setattr__(self, "model_dir", Path(self.model_dir).expanduser())

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def grpc_options(self) -> list[tuple[str, int | str]]:
        """Channel arguments of the server: size limits and keepalive.

        Keepalive pings every keepalive_time (60 s) find dead peers of long-lived streams; clients may
        ping every 10 s without data (the default 5 min would make gRPC answer a
        client's keepalive with GOAWAY "too_many_pings"). A live peer answers pings, so
        a connection with no call open is closed after max_connection_idle instead.
        """
        idle = [("grpc.max_connection_idle_ms", round(self.max_connection_idle * 1000))]
        return [
            *(idle if self.max_connection_idle else []),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", round(self.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            ("grpc.http2.bdp_probe", 0),
            # gRPC cancels a call the application has not picked up within 30 s by default;
            # 1,000 streams opened at once under full load left ~7% of them waiting that long
            # (CANCELLED at 30.1 s in bench/load_bench.py). Late is better than dropped.
            ("grpc.server_max_unrequested_time_in_server", 600),
            # Lets gRPC core coalesce the writes of many streams: one-character messages at
            # 1,000 streams gain more than a lone ping-pong's latency loses (bench/serve_bench.py).
            ("grpc.optimization_target", "throughput"),
        ]


@dataclass(frozen=True)
class TrainerConfig:
    """``nextchar trainer``: a process that only trains, taking jobs from the shared store's queue."""

    store: str = _store("redis://HOST:PORT/DB: the shared store whose queued jobs this trainer runs.")
    # here: a cache of the shared models, and the jobs' working files
    model_dir: Path = _model_dir()  # noqa: RUF009 (a field(), as the others)
    shared_models: bool = _shared_models()
    trainers: int = field(default=1, metadata=_opt("Jobs this process trains at once."))
    checkpoint_seconds: float = _checkpoint_seconds()
    job_lease: float = _job_lease()
    log_format: str = _log_format()
    log_level: str = _log_level()

    def __post_init__(self) -> None:
        _check(self, {"trainers": self.trainers >= 1, **_shared_checks(self)})
        object.__setattr__(self, "model_dir", Path(self.model_dir).expanduser())
