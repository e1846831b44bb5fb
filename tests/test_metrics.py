"""Observability over the network: /metrics scraped over HTTP after real traffic, and structured logs.

One server with ``metrics_port=0`` and a one-second idle timeout takes streams, a
closed session, an expired one and a training job; the scrape must show each of
them in its metric. Log records of a call carry its session id.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from nextchar.client import NextCharClient
from nextchar.client.errors import SessionNotFound
from nextchar.core.config import TrainConfig
from nextchar.core.demo import NOTEBOOK_TEXT
from nextchar.server.logs import JsonFormatter, log_handler
from nextchar.server.metrics import LoopHistogram
from nextchar.server.sessions.store import reason_label
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from server_harness import ServerThread, make_registry, start_server, wait_until

IDLE = 3.0  # seconds: short enough to watch a session expire in the test, long enough for its calls


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    model_dir = tmp_path_factory.mktemp("models")
    make_registry(model_dir, versions=1)
    server = start_server(
        model_dir, metrics_port=0, idle_timeout=IDLE, train_default_if_empty=False, compute_process=False
    )
    yield server
    server.close()


def scrape(server: ServerThread) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics over HTTP: {(sample name, sorted labels): value}."""
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_with_traffic(server: ServerThread) -> None:
    address = f"127.0.0.1:{server.port}"
    before = scrape(server)
    assert value(before, "nextchar_store_rtt_seconds_count") == 0.0  # exported, for the shared store
    text = "hello world hello"
    with NextCharClient(address) as client:
        kept = client.session()
        assert len(list(kept.stream(list(text)))) == len(text)  # one message per character
        client.session(prime="hel").close()
        with pytest.raises(SessionNotFound):
            client.attach("no-such-session")
        during = scrape(server)  # before the training, which may take longer than IDLE here
        client.train(NOTEBOOK_TEXT, name="tiny", train_config=TrainConfig(epochs=1, seq_len=8, batch=1))

        def swept() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            now = scrape(server)
            return now if value(now, "nextchar_sessions_active") == 0 else None

        # `kept` expires after IDLE seconds unused, and the harness sweeps every 0.2 s
        after = wait_until(swept, IDLE + 10, "the idle session swept")

    assert value(during, "nextchar_sessions_active") == value(before, "nextchar_sessions_active") + 1
    assert value(after, "nextchar_sessions_active") == 0
    ended = {r: value(after, "nextchar_sessions_ended_total", reason=r) for r in ("idle", "closed")}
    assert ended["closed"] >= value(before, "nextchar_sessions_ended_total", reason="closed") + 1
    assert ended["idle"] >= value(before, "nextchar_sessions_ended_total", reason="idle") + 1
    chars = value(after, "nextchar_characters_total") - value(before, "nextchar_characters_total")
    assert chars >= len(text) + len("hel")
    messages = value(after, "nextchar_message_latency_seconds_count")
    assert messages - value(before, "nextchar_message_latency_seconds_count") >= len(text)
    assert value(after, "nextchar_message_latency_seconds_bucket", le="1.0") == messages
    assert value(after, "nextchar_batch_sessions_count") > value(before, "nextchar_batch_sessions_count")
    assert value(after, "nextchar_batch_chars_sum") >= chars
    assert value(after, "nextchar_training_jobs", state="succeeded") == 1
    assert value(after, "nextchar_training_jobs", state="running") == 0


def test_each_server_counts_only_its_own_traffic(server: ServerThread, tmp_path: Path) -> None:
    other = start_server(tmp_path, train_default_if_empty=False, compute_process=False)
    try:
        assert other.server.metrics.registry is not server.server.metrics.registry
        assert other.server.metrics.registry.get_sample_value("nextchar_characters_total") == 0.0
        assert other.server.metrics_port == 0  # metrics_port None: no endpoint
    finally:
        other.close()


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("idle for more than 60 s", "idle"),
        ("lifetime of 5 s ended", "lifetime"),
        ("closed by the client", "closed"),
        ("evicted: model default v1 was deleted", "evicted"),
        ("", "other"),
    ],
)
def test_removal_reasons_map_to_labels(reason: str, label: str) -> None:
    assert reason_label(reason) == label


def test_log_records_of_a_call_carry_its_session_id(server: ServerThread) -> None:
    out = io.StringIO()
    handler = log_handler("json", out)
    logger = logging.getLogger("nextchar")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with NextCharClient(f"127.0.0.1:{server.port}") as client, pytest.raises(SessionNotFound):
            client.attach("ghost-session")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    refused = [r for r in records if "GetSession refused" in r["message"]]
    assert refused and refused[0]["session_id"] == "ghost-session"
    assert refused[0]["level"] == "info" and refused[0]["logger"] == "nextchar.server.calls"


def test_json_lines_are_one_object_per_record_with_the_traceback() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("nextchar", logging.ERROR, __file__, 1, "failed: %s", ("x",), None)
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    parsed = json.loads(line)
    assert "\n" not in line and parsed["message"] == "failed: x" and "RuntimeError: boom" in parsed["exc"]
    assert "session_id" not in parsed


def test_loop_histogram_buckets_are_cumulative_and_inclusive() -> None:
    registry = CollectorRegistry()
    histogram = LoopHistogram("x_seconds", "A test histogram.", (0.001, 0.01, 1.0), registry)
    for seconds in (0.0005, 0.001, 0.002, 5.0):  # 0.001 falls in le="0.001", as Prometheus's `le` says
        histogram.observe(seconds)
    get = registry.get_sample_value
    assert [get("x_seconds_bucket", {"le": le}) for le in ("0.001", "0.01", "1.0", "+Inf")] == [2, 3, 3, 4]
    assert get("x_seconds_count") == 4 and get("x_seconds_sum") == pytest.approx(5.0035)
