"""ServerConfig: every limit and default of the service in one dataclass, passed explicitly.

The defaults are what ``nextchar serve`` with no arguments uses. Limits exist so one
client cannot take the server down: a chunk cap bounds the work of one message, a
session cap bounds memory (it refuses NEW sessions and never evicts live ones), and
idle sessions expire after minutes, not seconds, so a client can reconnect and resume.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback by default; listen wider only with a token and TLS
    port: int = 50051  # 0 picks a free port (tests)
    model_dir: Path = field(default_factory=default_model_dir)
    max_sessions: int = 100_000  # ~1 KB each beyond the state: well under 1 GB at H=256
    idle_timeout: float = 30 * 60.0  # seconds; long enough to reconnect after a network blip
    session_lifetime: float = 0.0  # seconds; 0 = sessions live as long as they are used
    max_chunk_chars: int = 4096  # characters per prediction message
    max_top_k: int = 256
    max_generate_chars: int = 100_000
    max_message_bytes: int = 64 * MIB  # training text travels in one message
    max_jobs: int = 1  # concurrent training workers; the machine has 2 cores and serves too
    grace: float = 10.0  # seconds live streams get to finish when draining
    sweep_interval: float = 30.0  # seconds between idle-session sweeps
    train_default_if_empty: bool = True  # first start on an empty registry trains the notebook model
    # batches of at most this many characters run on the event loop; bigger ones off it,
    # where NumPy's products overlap gRPC work (a hop costs more than a small batch)
    batch_inline_chars: int = 1024
    # off the loop: in a worker process (nextchar.server.compute), free of the server's
    # GIL; False: in a thread (slower: ~160k against ~230k chars/s in 64-char chunks)
    compute_process: bool = True
    # security (nextchar.server.auth): an empty token means no authentication;
    # repr=False because configs get logged and the token must not be
    token: str = field(default="", repr=False)
    tls_cert: Path | None = None  # PEM chain; with tls_key the port speaks TLS only
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM CA bundle: clients must show a certificate it signed (mTLS)
    # observability (nextchar.server.metrics, nextchar.server.logs)
    metrics_port: int | None = None  # Prometheus over HTTP on host:metrics_port; None = off, 0 = any free
    log_format: str = "text"  # "json": one object per line, with the session id where there is one
    log_level: str = "info"
    # sessions: "" keeps them in this process; redis://HOST:PORT/DB shares them between replicas
    # (nextchar.server.redis_store, docs/deploy.md)
    store: str = ""
    # with a shared store: write a session's state every N characters (its version moves every
    # message). 1 = after every message: a replica's crash loses nothing that was answered
    store_write_every: int = 1

    def __post_init__(self) -> None:
        checks = {
            "port": 0 <= self.port <= 65535,
            "max_sessions": self.max_sessions >= 1,
            "idle_timeout": self.idle_timeout > 0,
            "session_lifetime": self.session_lifetime >= 0,
            "max_chunk_chars": self.max_chunk_chars >= 1,
            "max_top_k": self.max_top_k >= 1,
            "max_generate_chars": self.max_generate_chars >= 1,
            "max_message_bytes": self.max_message_bytes >= 4096,
            "max_jobs": self.max_jobs >= 1,
            "grace": self.grace >= 0,
            "sweep_interval": self.sweep_interval > 0,
            "batch_inline_chars": self.batch_inline_chars >= 0,
            "store": self.store == "" or self.store.startswith(("redis://", "rediss://", "unix://")),
            "store_write_every": self.store_write_every >= 1,
            "metrics_port": self.metrics_port is None or 0 <= self.metrics_port <= 65535,
            "log_format": self.log_format in ("text", "json"),
            "log_level": self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: out of range ({getattr(self, name)!r})")
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

        Keepalive pings every 60 s find dead peers of long-lived streams; clients may
        ping every 10 s without data (the default 5 min would make gRPC answer a
        client's keepalive with GOAWAY "too_many_pings").
        """
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.so_reuseport", 0),
            # gRPC cancels a call the application has not picked up within 30 s by default;
            # 1,000 streams opened at once under full load left ~7% of them waiting that long
            # (CANCELLED at 30.1 s in bench/load_bench.py). Late is better than dropped.
            ("grpc.server_max_unrequested_time_in_server", 600),
            # Lets gRPC core coalesce the writes of many streams: 1,000 one-character streams
            # went from 0.67 to 0.73-0.79 of the echo server; a lone ping-pong may pay ~30 us
            # (p50 ratio 1.42-1.55 against 1.41-1.44, within this machine's noise).
            ("grpc.optimization_target", "throughput"),
        ]
