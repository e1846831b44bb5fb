"""Prometheus metrics of one server, and the HTTP endpoint that exposes them.

Every server owns a ``Metrics`` with its own ``CollectorRegistry`` (never the
global one): tests run several servers in one process, and each must count only
its own traffic. The hot path pays per message or per batch, never per character:
one histogram observation per prediction message, two per batch, one counter per
ended session. What can be read when Prometheus scrapes (live sessions, open streams,
training jobs by state) is read then, from the server's own structures, at no cost between
scrapes.

    nextchar_sessions_active                      gauge
    nextchar_sessions_adaptive                    gauge: sessions that learn their writer, held here
    nextchar_adapter_bytes                        gauge: what their adapters hold (both of each session's)
    nextchar_adapter_resets_total                 diverging adapters reset to the model's weights
    nextchar_streams_open                         gauge: calls their clients hold open (streams, uploads)
    nextchar_streams_evicted_total                open calls closed to make room past max_streams
    nextchar_sessions_ended_total{reason}         idle | lifetime | closed | evicted | other
    nextchar_characters_total                     characters stepped (predicted, primed, generated)
    nextchar_message_latency_seconds              histogram, one prediction message on the server
    nextchar_batch_sessions / nextchar_batch_chars histograms, per batch the batcher runs
    nextchar_training_jobs{state}                 gauge: running | succeeded | failed | cancelled
    nextchar_store_rtt_seconds                    histogram, one session-store round trip
    nextchar_auth_failures_total{reason}          missing | wrong token
    nextchar_calls_refused_total{method,code}     calls answered with an error status for what they asked

The session store times its round trips with ``metrics.store_rtt.observe(seconds)``.
The histograms are LoopHistograms: observed on the event loop's thread only, so they
skip prometheus_client's lock and Python bucket scan (0.15 µs an observation against
1.3 µs; a lone one-character step makes three).
"""

from __future__ import annotations

import bisect
import collections
import logging
from collections.abc import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIServer

from nextchar.server.sessions.store import GONE_REASONS, reason_label
from nextchar.server.training.store import CANCELLED, FAILED, RUNNING, SUCCEEDED
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

log = logging.getLogger("nextchar.server.sessions")

REASONS = (*GONE_REASONS, "other")
JOB_STATES = (RUNNING, SUCCEEDED, FAILED, CANCELLED)
# 0.1 ms (an inline one-character step) to 1 s (a big batch on a loaded machine)
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
SESSION_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)  # 4096 = the batcher's cut
CHAR_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144)


class JobStates(Collector):
    """nextchar_training_jobs{state}, counted at scrape time from the job manager's states."""

    def __init__(self, states: Callable[[], Iterable[str]]) -> None:
        self._states = states

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no scrape at registration: the job manager may not be ready yet

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("nextchar_training_jobs", "Training jobs by state.", labels=["state"])
        counts = collections.Counter(self._states())
        for state in JOB_STATES:
            family.add_metric([state], counts[state])
        yield family


class LoopHistogram(Collector):
    """A histogram observed from one thread (the event loop) and read by the scraper's.

    A scrape copies the bucket counts at once, so its buckets and count agree; its sum
    may lag by an observation made meanwhile.
    """

    def __init__(
        self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry
    ):
        self._name, self._doc, self._bounds = name, documentation, buckets
        self._counts = [0] * (len(buckets) + 1)  # the last: above every bound (+Inf)
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1  # le: the first bound >= value
        self._sum += value

    def describe(self) -> Iterator[Metric]:
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        counts, total, cumulative = list(self._counts), self._sum, 0
        buckets = []
        for bound, count in zip((*self._bounds, float("inf")), counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
        yield HistogramMetricFamily(self._name, self._doc, buckets=buckets, sum_value=total)


class Metrics:
    """One server's metrics; call the hooks, read ``registry`` (or scrape ``serve``'s port)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.sessions_active = Gauge("nextchar_sessions_active", "Live sessions.", registry=r)
        self.sessions_adaptive = Gauge(
            "nextchar_sessions_adaptive",
            "Sessions that learn their writer, held in this server's memory: at most max_adaptive_sessions.",
            registry=r,
        )
        self.adapter_bytes = Gauge(
            "nextchar_adapter_bytes",
            "Bytes the adaptive sessions' adapters hold (the current one and the one at the trail's start).",
            registry=r,
        )
        self.adapter_resets = Counter(
            "nextchar_adapter_resets",
            "Diverging adapters reset to the model's weights (the session goes on, unadapted).",
            registry=r,
        )
        self.streams_open = Gauge(
            "nextchar_streams_open",
            "Calls their clients hold open (streams, uploads): at most max_streams.",
            registry=r,
        )
        self.sessions_ended = Counter(
            "nextchar_sessions_ended", "Sessions removed, by reason.", ["reason"], registry=r
        )
        self._ended = {reason: self.sessions_ended.labels(reason) for reason in REASONS}
        self.characters = Counter(
            "nextchar_characters", "Characters stepped through a model (rate() gives chars/s).", registry=r
        )
        self.message_latency = LoopHistogram(
            "nextchar_message_latency_seconds",
            "Server time of one prediction message, from its session lookup to its predictions.",
            LATENCY_BUCKETS,
            r,
        )
        self.batch_sessions = LoopHistogram(
            "nextchar_batch_sessions", "Sessions stepped together in one batch.", SESSION_BUCKETS, r
        )
        self.batch_chars = LoopHistogram("nextchar_batch_chars", "Characters in one batch.", CHAR_BUCKETS, r)
        self.store_rtt = LoopHistogram(
            "nextchar_store_rtt_seconds", "One round trip to the session store.", LATENCY_BUCKETS, r
        )
        self.auth_failures = Counter(
            "nextchar_auth_failures", "Calls refused for a missing or wrong token.", ["reason"], registry=r
        )
        self.calls_refused = Counter(
            "nextchar_calls_refused",
            "Calls answered with an error status for what they asked, by method and status code.",
            ["method", "code"],
            registry=r,
        )
        self.streams_evicted = Counter(
            "nextchar_streams_evicted",
            "Open calls closed (the longest idle first) to make room past max_streams.",
            registry=r,
        )
        self._http: WSGIServer | None = None

    def watch(
        self,
        active_sessions: Callable[[], int],
        open_streams: Callable[[], int],
        job_states: Callable[[], Iterable[str]],
        adapters: Callable[[], tuple[int, int]],
    ) -> None:
        """Read these when scraped: the live session count, the open streams, every training job's
        state, and (adaptive sessions, their adapters' bytes)."""
        self.sessions_active.set_function(lambda: float(active_sessions()))
        self.sessions_adaptive.set_function(lambda: float(adapters()[0]))
        self.adapter_bytes.set_function(lambda: float(adapters()[1]))
        self.streams_open.set_function(lambda: float(open_streams()))
        self.registry.register(JobStates(job_states))

    # ------------------------------------------------------------ hooks (hot path: keep them cheap)

    def session_ended(self, session_id: str, reason: str) -> None:
        self._ended[reason_label(reason)].inc()
        log.debug("session ended: %s", reason, extra={"session_id": session_id})

    def batch(self, sessions: int, chars: int) -> None:
        self.batch_sessions.observe(sessions)
        self.batch_chars.observe(chars)
        self.characters.inc(chars)

    def refused(self, method: str, code: str) -> None:
        self.calls_refused.labels(method, code).inc()

    def auth_failed(self, reason: str) -> None:
        self.auth_failures.labels(reason).inc()

    # ------------------------------------------------------------ endpoint

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP on host:port (0 = a free port) in a daemon thread; returns the port."""
        self._http, _ = start_http_server(port, host, self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
