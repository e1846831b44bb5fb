"""Wiring and lifecycle: ``create_server`` builds and starts the gRPC server, ``serve`` runs it until signalled.

``create_server(config)`` is separate from ``serve()`` so tests can bind
127.0.0.1:0 and drive drain themselves. The server is ``grpc.aio`` (asyncio): the
thread-pool server carries 2.5x fewer streamed messages on this machine (the GIL),
and the batcher wants every handler on one loop anyway.

Drain (SIGTERM/SIGINT, or ``NextCharServer.drain``): health turns NOT_SERVING, new
sessions are refused with UNAVAILABLE, live streams get ``config.grace`` seconds to
finish, then the server stops (cancelling what is left) and its trainers pause:
their jobs checkpoint and go back to the queue.

``shared_parts`` makes the model registry and the job store on files in
``model_dir`` or, with ``config.store``, on the shared Redis; ``run_trainer`` is
``nextchar trainer``: the same parts and a trainer pool, nothing served.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from nextchar.core.memory import keep_freed_memory, one_heap, resident_bytes, return_freed_memory
from nextchar.proto import nextchar_pb2
from nextchar.server.auth import add_port, interceptors
from nextchar.server.batching.scheduler import Scheduler
from nextchar.server.blas import limit_blas_threads
from nextchar.server.blobs import Blobs, connect
from nextchar.server.budget import ReplyBudget
from nextchar.server.catalog import Catalog
from nextchar.server.config import ServerConfig, TrainerConfig
from nextchar.server.errors import ServiceError
from nextchar.server.logs import configure_logging, flush_gates
from nextchar.server.metrics import Metrics
from nextchar.server.open_calls import OpenCalls
from nextchar.server.registry import DEFAULT_NAME, Registry
from nextchar.server.service import Service
from nextchar.server.servicer import NextCharServicer
from nextchar.server.sessions.limits import Limits
from nextchar.server.sessions.manager import SessionManager
from nextchar.server.sessions.memory import InMemorySessionStore
from nextchar.server.sessions.redis_store import RedisSessionStore, display_url
from nextchar.server.sessions.store import SessionStore
from nextchar.server.shared_models import RedisModelFiles
from nextchar.server.store_health import StoreHealth
from nextchar.server.training.jobs import JobManager
from nextchar.server.training.journal import LocalJobStore
from nextchar.server.training.pool import TrainerPool
from nextchar.server.training.redis_jobs import RedisJobStore
from nextchar.server.training.store import JobStore
from nextchar.server.training.texts import TextStore
from nextchar.server.wire import add_service

log = logging.getLogger("nextchar.server")
SWITCH_INTERVAL = 0.0005  # seconds
GC_ALLOCATIONS = 20_000  # objects allocated and not yet freed that start a collection
SERVICE_NAME = nextchar_pb2.DESCRIPTOR.services_by_name["NextCharService"].full_name
STORE_CHECK = 1.0  # seconds between checks of the session store (health follows it)
TRIM_INTERVAL = 5.0  # seconds between looks at whether freed heap pages should go back to the OS
# bytes above the server's smallest size that make a return worth it while busy: freed pages a
# burst left stay resident until then, and the batches re-fault what they reuse at no visible cost
TRIM_SLACK = 8 * 1024 * 1024
IDLE_TRIM_SLACK = 4 * 1024 * 1024  # the same for an idle server: returning pages costs it nothing
IDLE_CPU = 0.02  # of a core, over TRIM_INTERVAL: a server using less is idle
SERVER_TRIM_THRESHOLD = 64 * 1024 * 1024  # free bytes the heap's top keeps (a trainer keeps 1 GiB)


def install_default_model(registry: Registry) -> None:
    """First start on an empty registry: register the shipped model, so sessions work at once.

    The GRU nextchar trained on tinyshakespeare (nextchar.core.default_model); loading
    and registering it takes well under a second, and nothing is trained at start.
    """
    from nextchar.core.default_model import load_default_model

    shipped = load_default_model()
    if (
        registry.install(
            DEFAULT_NAME,
            shipped.model,
            history=shipped.history,
            summary=shipped.summary,
            adapt=shipped.adapt,  # its tuned adaptation, recorded in the installed file too
        )
        is None
    ):
        registry.refresh(force=True)  # another replica installed it first: take up its version


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another process holds (another `nextchar serve`, `make run`) in one clear
    line, before gRPC tries it: gRPC writes a C-core error of its own and then fails."""
    if port == 0:
        return
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise OSError(
                f"{host}:{port} is in use: is another nextchar serve (or make run) running? "
                "stop it, or choose another port with --port"
            ) from None


def make_store(
    config: ServerConfig, catalog: Catalog, metrics: Metrics, replica: Callable[[], str]
) -> SessionStore:
    """In this process's memory, or in the Redis that config.store names (shared by replicas).

    replica: this server's address once bound, recorded with each write to a shared store."""
    if config.store:
        return RedisSessionStore(
            config.store,
            catalog,
            config.idle_timeout,
            config.session_lifetime,
            config.store_write_every,
            metrics.session_ended,
            metrics.store_rtt.observe,
            replica,
            config.rewind_chars,
            config.session_evict_idle,
        )
    return InMemorySessionStore(
        config.idle_timeout, config.session_lifetime, metrics.session_ended, config.session_evict_idle
    )


def shared_parts(config: ServerConfig | TrainerConfig) -> tuple[Registry, JobStore, Blobs | None]:
    """The model registry, the job store and where uploaded texts are shared: on files in
    model_dir, or on the Redis config.store names (every replica and trainer sees the same jobs,
    uploads and, unless local_models, models; model_dir caches them)."""
    jobs_dir = config.model_dir / "_jobs"
    if not config.store:
        return Registry(config.model_dir), LocalJobStore(jobs_dir), None
    client, url = connect(config.store), display_url(config.store)
    files = RedisModelFiles(client, url, config.model_dir) if config.shared_models else None
    jobs = RedisJobStore(client, url, config.job_lease, jobs_dir)
    return Registry(config.model_dir, files), jobs, Blobs(client)


class NextCharServer:
    """The running service: the grpc.aio server plus the parts it serves, and its drain."""

    def __init__(self, config: ServerConfig, store: SessionStore | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.registry, job_store, shared_texts = shared_parts(config)
        self.port = 0
        catalog = Catalog(self.registry)
        if store is None:  # (not `or`: an empty store has len 0)
            store = make_store(config, catalog, self.metrics, lambda: f"{config.host}:{self.port}")
        self.store = store
        self.store_health = StoreHealth(store, config.store)
        self.scheduler = Scheduler(
            config.batch_inline_chars, config.compute_process, on_batch=self.metrics.batch
        )
        limits = Limits(
            config.max_sessions,
            config.max_chunk_chars,
            config.max_top_k,
            config.max_prime_chars,
            config.max_generate_chars,
            config.rewind_chars,
            config.adapt,
            config.max_adaptive_sessions,
        )
        self.sessions = SessionManager(
            store, self.scheduler, catalog, limits, ReplyBudget(config.max_reply_bytes)
        )
        self.trainers = TrainerPool(
            job_store, self.registry, config.max_jobs, config.checkpoint_seconds, config.job_lease
        )
        self.jobs = JobManager(job_store, config.max_vocab, config.max_queued_jobs)
        self.texts = TextStore(
            config.model_dir / "_texts",
            config.max_upload_bytes,
            config.max_pending_upload_bytes,
            shared_texts,
        )
        self.service = Service(config, self.registry, self.sessions, self.jobs, self.texts)
        self.open_calls = OpenCalls(config.max_streams)  # every protocol's streams count
        self.servicer = NextCharServicer(self.service, self.open_calls)
        self.serving = False  # what health says (both protocols): started, not draining, store up
        self.http_port = 0  # the bound HTTP port once started, when config.http_port is set
        self._stop_http: Callable[[], Awaitable[None]] | None = None
        self.servicer.on_message = self.metrics.message_latency.observe
        self.servicer.on_refused = self.metrics.refused
        self.open_calls.on_evicted = self.metrics.streams_evicted.inc
        self.metrics.watch(
            lambda: len(store), lambda: len(self.open_calls), self.jobs.states, self.sessions.adapters
        )
        self.sessions.on_adapter_reset = self.metrics.adapter_resets.inc
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]  # grpc-stubs predate health.aio
        self.grpc = grpc.aio.server(
            options=config.grpc_options(), interceptors=interceptors(config, self.metrics.auth_failed)
        )
        self.metrics_port = 0  # the bound /metrics port once started, when config.metrics_port is set
        self._sweeper: asyncio.Task[None] | None = None
        self._store_watch: asyncio.Task[None] | None = None
        self._trimmer: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        check_port_free(self.config.host, self.config.port)  # before any work: a busy port ends it
        await asyncio.to_thread(self.registry.load_all)
        if self.registry.is_empty and self.config.train_default_if_empty:
            log.info(
                "empty model registry at %s: installing the shipped default model", self.config.model_dir
            )
            await asyncio.to_thread(install_default_model, self.registry)
        for mv in self.registry.versions():
            if not mv.available:
                log.warning("model %s v%d unavailable: %s", mv.name, mv.version, mv.reason)
        add_service(self.servicer, self.grpc, self.config)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        self.port = add_port(self.grpc, self.config)
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.config.address}")
        self.scheduler.start()
        await self.grpc.start()
        await self.jobs.load()  # the journal's unfinished jobs resume from their checkpoints
        self.trainers.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.serving = True
        if self.config.http_port is not None:
            self._stop_http, self.http_port = await self._start_http(self.config.http_port)
            scheme = "https" if self.config.tls else "http"
            log.info("http api and playground on %s://%s:%d/", scheme, self.config.host, self.http_port)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        self._store_watch = asyncio.get_running_loop().create_task(self._watch_store())
        self._trimmer = asyncio.get_running_loop().create_task(self._trim())
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.host, self.config.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.config.host, self.metrics_port)
        log.info(
            "nextchar serving on %s:%d (models in %s)", self.config.host, self.port, self.config.model_dir
        )
        return self.port

    async def _start_http(self, port: int) -> tuple[Callable[[], Awaitable[None]], int]:
        """The HTTP API on port, sharing the service, the open calls and health with gRPC. Imported
        here: aiohttp costs a server that serves no HTTP ~15 MB of memory."""
        from nextchar.server.httpapi.routes import HttpApi, start

        api = HttpApi(self.config, self.service, self.open_calls, lambda: self.serving)
        api.on_refused = self.metrics.refused
        api.on_message = self.metrics.message_latency.observe
        runner, bound = await start(api, self.config.host, port)
        return runner.cleanup, bound

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            flush_gates(log)  # how many lines a flood of bad calls left untold
            try:
                await self.store.sweep(time.time())
                await asyncio.to_thread(self.texts.sweep, time.time())
                await self.jobs.prune(self.config.max_finished_jobs)
                self.registry.release_idle()  # networks of versions nobody asked for lately
            except ServiceError as exc:  # a shared store down: sweep again next time
                log.warning("sweep failed: %s", exc)

    async def _trim(self) -> None:
        """Give freed memory back: a burst of big requests or replies (refused or served) must not
        leave the server at its peak for good. A busy server trims only while it is TRIM_SLACK
        above the smallest size it was seen at (it keeps the pages its batches reuse); an idle
        one (under IDLE_CPU of a core over the last interval: nothing to re-fault) once per idle
        spell when it is IDLE_TRIM_SLACK above. In a thread: trimming a large heap takes ~25 ms.
        (No collection before it: memory only a collection frees must not be left in cycles,
        nextchar.server.servicer.when_over; a full collection here made the next 100 streams'
        messages cost 1.17-1.31x the server CPU, measured against 1.03x without.)"""
        floor = resident_bytes()
        cpu, trimmed_idle = time.process_time(), False
        while True:
            await asyncio.sleep(TRIM_INTERVAL)
            resident = resident_bytes()
            floor = min(floor, resident)
            idle = time.process_time() - cpu < IDLE_CPU * TRIM_INTERVAL
            cpu = time.process_time()
            trimmed_idle = trimmed_idle and idle
            if resident - floor > TRIM_SLACK or (
                idle and not trimmed_idle and resident - floor > IDLE_TRIM_SLACK
            ):
                await asyncio.to_thread(return_freed_memory)
                trimmed_idle = idle
                cpu = time.process_time()  # the trim's own work is not activity

    async def _watch_store(self) -> None:
        """Health follows the session store: NOT_SERVING while it is unreachable or refuses writes
        (every session call would fail: nextchar.server.store_health), SERVING again once it
        takes them; a shared store reconnects by itself."""
        serving = True
        while True:
            await asyncio.sleep(STORE_CHECK)
            trouble = await self.store_health.check()
            up = not trouble
            if up != serving:
                serving = self.serving = up
                log.warning("session store %s %s", self.store, trouble or "is back")
                status = (
                    health_pb2.HealthCheckResponse.SERVING
                    if up
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                for service in ("", SERVICE_NAME):
                    await self.health.set(service, status)

    async def drain(self, grace: float | None = None) -> None:
        """Refuse new sessions, let live streams finish for up to grace seconds, then stop."""
        grace = self.config.grace if grace is None else grace
        if self.sessions.draining:
            await self._stopped.wait()
            return
        self.sessions.draining = True
        self.serving = False
        await self.health.enter_graceful_shutdown()
        open_calls = self.open_calls
        log.info("draining: %d live stream(s), grace %.1f s", len(open_calls), grace)
        if open_calls:
            open_calls.idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(open_calls.idle.wait(), grace)
        await self.stop(0.5)

    async def stop(self, grace: float | None = 0.0) -> None:
        for task in (self._sweeper, self._store_watch, self._trimmer):
            if task is not None:
                task.cancel()
        await self.grpc.stop(grace)
        if self._stop_http is not None:
            await self._stop_http()
        await asyncio.to_thread(self.trainers.shutdown)
        await self.scheduler.close()
        await self.store.close()  # a shared store writes back what is not written yet
        await self.store_health.close()
        self.metrics.close()
        self._stopped.set()

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()


async def create_server(
    config: ServerConfig, store: SessionStore | None = None
) -> tuple[NextCharServer, int]:
    """Build, bind and start the service; returns (server, bound port). Call inside a running loop."""
    server = NextCharServer(config, store)
    port = await server.start()
    return server, port


async def serve_async(config: ServerConfig) -> None:
    server, _ = await create_server(config)
    settle_garbage_collector()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: loop.create_task(server.drain()))
    await server.wait_for_termination()
    log.info("nextchar server stopped")


def settle_garbage_collector() -> None:
    """Once started: the objects the server starts with (its modules and models, ~55,000) live as
    long as it does, so they are frozen out of every later collection; and a collection comes
    every GC_ALLOCATIONS objects allocated and not freed, not 700: 100 streams' messages in flight
    hold more than 700, so each batch of them started one. (Garbage waits longer for it, so
    refusals must not leave reference cycles: nextchar.server.grpc_errors.guarded.)"""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_ALLOCATIONS, *gc.get_threshold()[1:])


def raise_fd_limit() -> None:
    """Raise this process's soft limit on open files to its hard one: every client connection
    holds a descriptor, and the soft limit a shell hands down is often 1,024 (at which 500 idle
    connections made new clients time out), while the hard one is what the system allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # a hard limit of "unlimited" the kernel caps lower
        log.warning("open-file limit stays at %d (hard %d): %s", soft, hard, exc)
        return
    log.info("open-file limit raised from %d to %d", soft, hard)


def serve(config: ServerConfig | None = None) -> None:
    """Run the server until SIGTERM/SIGINT, then drain and return. Blocking; the CLI calls this."""
    limit_blas_threads(1)
    # a batch's (T, N, H) temporaries page-faulted anew each time cost ~20%; the heap keeps them
    keep_freed_memory(SERVER_TRIM_THRESHOLD)
    one_heap()  # before gRPC starts its threads (nextchar.core.memory.one_heap says why)
    # A batch thread (--compute-in-thread, or after the compute worker failed) releases
    # the GIL inside every BLAS call; with the default 5 ms switch interval the loop
    # thread then keeps it for up to 5 ms and the batch stalls.
    sys.setswitchinterval(SWITCH_INTERVAL)
    config = config or ServerConfig()
    configure_logging(config.log_format, config.log_level)
    raise_fd_limit()
    asyncio.run(serve_async(config))


def run_trainer(config: TrainerConfig) -> None:
    """``nextchar trainer``: train jobs from the shared store's queue until SIGTERM/SIGINT, then
    pause them (they checkpoint and go back to the queue for any trainer). Blocking."""
    if not config.store:
        raise ValueError("store: give the shared store (redis://HOST:PORT/DB) whose jobs to train")
    configure_logging(config.log_format, config.log_level)
    registry, store, _ = shared_parts(config)
    registry.load_all()
    store.load()
    pool = TrainerPool(store, registry, config.trainers, config.checkpoint_seconds, config.job_lease)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    pool.start()
    log.info("nextchar trainer %s taking jobs from %s (models in %s)", pool.name, store, config.model_dir)
    stopping.wait()
    log.info("trainer %s stopping: pausing %d job(s)", pool.name, len(pool.running))
    pool.shutdown()
    log.info("nextchar trainer stopped")
