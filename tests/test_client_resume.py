"""A session stream survives dropped connections: nothing fed twice, nothing skipped.

A real TCP relay sits between client and server and cuts every connection
mid-stream; the session lives on in the server, and the client resumes it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from nextchar.client import NextCharClient, SessionNotFound
from nextchar.client.channel import channel_target
from nextchar.core.demo import NOTEBOOK_TEXT
from server_harness import DroppingProxy

TEXT = NOTEBOOK_TEXT * 4


def chunks_dropping_midway(proxy: DroppingProxy, text: str, drop_at: set[int]) -> Iterator[str]:
    """Yield text 5 characters at a time; cut the connection before the chunks in drop_at."""
    for i, start in enumerate(range(0, len(text), 5)):
        if i in drop_at:
            proxy.drop()
        yield text[start : start + 5]


def test_stream_resumes_after_drops(server_address: str, proxy: DroppingProxy) -> None:
    with NextCharClient(proxy.address, timeout=10) as c, c.session() as s:
        preds = list(s.stream(chunks_dropping_midway(proxy, TEXT, {3, 9, 10, 20})))
        assert s.resumes >= 1, "the relay never cut the stream"
        assert s.offset == len(TEXT)  # every character consumed exactly once
        assert sum(map(len, preds)) + s.lost_chars == len(TEXT)
        offsets = [p.start_offset for p in preds]
        assert offsets == sorted(offsets)  # in order, never repeated
        with NextCharClient(server_address) as direct, direct.session() as ref:
            expected = ref.feed(TEXT)
        for p in preds:  # the same state as one uninterrupted feed gives the same predictions
            assert p.next_chars == expected.next_chars[p.start_offset : p.end_offset]


def test_feed_retries_once_after_a_drop(proxy: DroppingProxy) -> None:
    with NextCharClient(proxy.address, timeout=10) as c, c.session() as s:
        s.feed("hello")
        proxy.drop()
        assert s.feed(" wor").start_offset == 5
        assert s.offset == 9


def test_resume_gives_up_when_the_session_is_gone(server_address: str, proxy: DroppingProxy) -> None:
    with NextCharClient(proxy.address, timeout=10) as c:
        s = c.session()

        def chunks() -> Iterator[str]:
            yield "hello"
            with NextCharClient(server_address) as direct:
                direct.attach(s.id).close()
            proxy.drop()
            yield " world"

        with pytest.raises(SessionNotFound):
            list(s.stream(chunks()))


def test_source_errors_reach_the_caller(server_address: str) -> None:
    class Boom(Exception):
        pass

    def chunks() -> Iterator[str]:
        yield "hello"
        raise Boom("source broke")

    with NextCharClient(server_address) as c, c.session() as s, pytest.raises(Boom):
        list(s.stream(chunks()))


def test_several_addresses_are_balanced_round_robin(server_address: str, proxy: DroppingProxy) -> None:
    target, options = channel_target(["127.0.0.1:1", "127.0.0.1:2"])
    assert target == "ipv4:127.0.0.1:1,127.0.0.1:2" and ("grpc.lb_policy_name", "round_robin") in options
    with pytest.raises(ValueError, match="IP:PORT"):
        channel_target("localhost:1,localhost:2")
    with NextCharClient(f"{server_address},{proxy.address}") as c:  # two routes to one server
        assert [c.health() for _ in range(4)] == ["SERVING"] * 4
