"""``python -m nextchar.server [--host H] [--port P] [--model-dir DIR] ...``: run the service.

The Typer CLI (``nextchar serve``) calls the same ``nextchar.server.app.serve``. The BLAS
thread limit is set before NumPy is imported, which is the only moment the
environment variable is read.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from nextchar.server.config import ServerConfig, default_model_dir

    defaults = ServerConfig(model_dir=default_model_dir())
    parser = argparse.ArgumentParser(
        prog="python -m nextchar.server", description="Run the nextchar gRPC service."
    )
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--model-dir", type=Path, default=defaults.model_dir)
    parser.add_argument("--max-sessions", type=int, default=defaults.max_sessions)
    parser.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout, help="seconds")
    parser.add_argument(
        "--session-lifetime", type=float, default=defaults.session_lifetime, help="seconds; 0 = none"
    )
    parser.add_argument("--max-chunk-chars", type=int, default=defaults.max_chunk_chars)
    parser.add_argument("--grace", type=float, default=defaults.grace, help="drain grace, seconds")
    parser.add_argument("--max-jobs", type=int, default=defaults.max_jobs)
    parser.add_argument(
        "--no-default-model", action="store_true", help="do not train a model on an empty registry"
    )
    parser.add_argument(
        "--compute-in-thread", action="store_true", help="run big batches in a thread, not a worker process"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("NEXTCHAR_TOKEN", ""),
        help="demand this bearer token (default: $NEXTCHAR_TOKEN; the environment keeps it out of ps)",
    )
    parser.add_argument("--tls-cert", type=Path, help="serve TLS with this PEM certificate chain")
    parser.add_argument("--tls-key", type=Path, help="the certificate's PEM private key")
    parser.add_argument("--tls-client-ca", type=Path, help="demand client certificates signed by this CA")
    parser.add_argument(
        "--metrics-port", type=int, help="Prometheus /metrics port; 0 = any free; off if absent"
    )
    parser.add_argument("--log-format", choices=("text", "json"), default=defaults.log_format)
    parser.add_argument(
        "--store", default=defaults.store, help="redis://HOST:PORT/DB: sessions shared by replicas"
    )
    parser.add_argument(
        "--store-write-every",
        type=int,
        default=defaults.store_write_every,
        help="characters between state writes to the store (docs/deploy.md)",
    )
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default=defaults.log_level
    )
    args = parser.parse_args(argv)

    from nextchar.server.app import serve

    serve(
        ServerConfig(
            host=args.host,
            port=args.port,
            model_dir=args.model_dir,
            max_sessions=args.max_sessions,
            idle_timeout=args.idle_timeout,
            session_lifetime=args.session_lifetime,
            max_chunk_chars=args.max_chunk_chars,
            grace=args.grace,
            max_jobs=args.max_jobs,
            train_default_if_empty=not args.no_default_model,
            compute_process=not args.compute_in_thread,
            token=args.token,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            metrics_port=args.metrics_port,
            log_format=args.log_format,
            log_level=args.log_level,
            store=args.store,
            store_write_every=args.store_write_every,
        )
    )


if __name__ == "__main__":
    main()
