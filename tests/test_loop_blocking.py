"""No model file or Redis read runs on the server's event loop (nextchar.server.catalog).

A version another replica registered reaches this one through the shared Redis: its
blob is downloaded into the model cache, read and checked (SHA-256) when a client
first asks for it. That used to run on the event loop, which served nobody
meanwhile; now it runs in a thread, and the loop stays responsive.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import redis
from nextchar.core.config import ModelConfig
from nextchar.core.model import CharRNN
from nextchar.core.vocab import Vocab
from nextchar.proto import nextchar_pb2 as pb
from nextchar.server.registry import ModelVersion, Registry
from nextchar.server.shared_models import RedisModelFiles
from redis_harness import RedisServer
from server_harness import start_server, train_notebook_model


def test_a_model_fetched_from_redis_does_not_block_the_event_loop(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    redis_server.client.flushall()
    big = CharRNN.create(ModelConfig(cell="rnn", hidden=2500), Vocab.from_text("abcdefgh "), seed=3)
    writer = Registry(
        tmp_path / "writer", RedisModelFiles(redis.Redis.from_url(redis_server.url), "w", tmp_path / "writer")
    )
    writer.load_all()
    small, history, summary = train_notebook_model(epochs=20)
    writer.register("default", small, history=history, summary=summary, promote=True)
    writer.register("big", big, history=[], summary={})
    started = time.perf_counter()  # what the fetch costs, measured here: download, read, check
    fetched = Registry(
        tmp_path / "probe", RedisModelFiles(redis.Redis.from_url(redis_server.url), "p", tmp_path / "probe")
    )
    fetched.load_all()
    mv = fetched.resolve("big", 1)
    assert isinstance(mv, ModelVersion) and mv.require() is not None
    fetch_seconds = time.perf_counter() - started
    assert fetch_seconds > 0.05, f"the model loads in {fetch_seconds:.3f} s: too fast to show a blocked loop"

    server = start_server(tmp_path / "server", store=redis_server.url, shared_models=True)
    try:
        lags: list[float] = []
        done = threading.Event()

        def probe() -> None:  # how long the server's loop takes to run a no-op, again and again
            while not done.is_set():
                t0 = time.perf_counter()
                server.run(asyncio.sleep(0))
                lags.append(time.perf_counter() - t0)
                time.sleep(0.005)

        prober = threading.Thread(target=probe)
        prober.start()
        time.sleep(0.1)
        created = server.stub.CreateSession(
            pb.CreateSessionRequest(model=pb.ModelRef(name="big")), timeout=30
        )
        done.set()
        prober.join()
        assert created.session.model.name == "big"
        worst = max(lags)
        print(
            f"fetch {fetch_seconds:.3f} s; the loop's worst lag meanwhile {worst:.3f} s over {len(lags)} probes"
        )
        assert worst < fetch_seconds / 2, (
            f"the loop was blocked {worst:.3f} s (the fetch takes {fetch_seconds:.3f} s)"
        )
    finally:
        server.close()
