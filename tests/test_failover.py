"""Failover between replicas: two real server processes on one real redis-server, one killed with SIGKILL.

The client library is given both addresses (gRPC round_robin). The replica serving
the stream (the store records which one advanced the session last) is killed
mid-text; the stream resumes on the other replica, and every prediction received
is IDENTICAL (bit for bit) to the one an uninterrupted run gives at that offset.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nextchar.client import NextCharClient
from nextchar.client.results import CharPrediction
from nextchar.core.demo import NOTEBOOK_TEXT
from nextchar.server.sessions.redis_store import key
from redis_harness import RedisServer
from server_harness import ServerProcess, make_registry

TEXT = NOTEBOOK_TEXT * 3
CHUNK = 3
KILL_AT = 12  # chunks sent before the kill


@pytest.fixture
def replicas(tmp_path: Path, redis_server: RedisServer) -> Iterator[list[ServerProcess]]:
    make_registry(tmp_path, versions=1)
    procs = [ServerProcess(tmp_path, "--store", redis_server.url, "--compute-in-thread") for _ in range(2)]
    yield procs
    for p in procs:
        p.close()


def by_offset(client: NextCharClient, chunks: Iterator[str]) -> dict[int, CharPrediction]:
    with client.session() as session:
        return {p.offset: p for preds in session.stream(chunks, full_distribution=True) for p in preds}


def test_a_stream_whose_replica_is_killed_continues_identically_on_the_other(
    replicas: list[ServerProcess], redis_server: RedisServer
) -> None:
    chunks = [TEXT[i : i + CHUNK] for i in range(0, len(TEXT), CHUNK)]
    with NextCharClient(replicas[0].address) as alone:
        reference = by_offset(alone, iter(chunks))
    assert len(reference) == len(TEXT)

    with NextCharClient([r.address for r in replicas]) as client:
        session = client.session()
        killed: list[tuple[ServerProcess, float]] = []

        def feed() -> Iterator[str]:
            for i, chunk in enumerate(chunks):
                if i == KILL_AT:  # kill the replica that advanced the session last: the stream's
                    deadline = time.monotonic() + 10  # (gRPC pulls requests ahead of the replies)
                    while redis_server.stored_offset(session.id) != i * CHUNK:
                        assert time.monotonic() < deadline, "the stream never reached the kill point"
                        time.sleep(0.001)
                    owner = redis_server.hget(key(session.id), "by")
                    victim = next(r for r in replicas if owner == r.address.encode())
                    victim.proc.send_signal(signal.SIGKILL)
                    killed.append((victim, time.perf_counter()))
                yield chunk

        got: dict[int, CharPrediction] = {}
        first_after_kill = 0.0
        for preds in session.stream(feed(), full_distribution=True):
            if preds.start_offset >= KILL_AT * CHUNK and not first_after_kill:  # sent after the kill
                first_after_kill = time.perf_counter()
            got.update({p.offset: p for p in preds})
        session.close()

    victim, kill_time = killed[0]
    gap_ms = (first_after_kill - kill_time) * 1000
    print(
        f"failover: replica {victim.address} SIGKILLed after {KILL_AT} chunks; first prediction from the "
        f"other {gap_ms:.1f} ms later; {session.resumes} resume(s), {session.lost_chars} chars' replies lost"
    )
    assert victim.proc.wait(5) == -signal.SIGKILL
    assert session.resumes >= 1
    assert len(got) + session.lost_chars == len(TEXT)
    assert (
        max(got) == len(TEXT) - 1 and min(o for o in got if o >= KILL_AT * CHUNK) <= KILL_AT * CHUNK + CHUNK
    )
    assert all(got[o] == reference[o] for o in got), "a prediction differs from the uninterrupted run"
