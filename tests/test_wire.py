"""Bad bytes, from outside: every RPC gets wire bytes our client library would never send.

A generic channel sends raw bytes (no serializer) to one real server: random bytes,
valid requests mutated (bytes flipped, cut short, fields repeated), and each string
field of each request, at the top level and one message down, carrying invalid
UTF-8 (a lone continuation byte, an encoded surrogate, a code point above
U+10FFFF, an overlong form). Every answer must be a status docs/api.md documents
for bad input, never UNKNOWN or INTERNAL (an unhandled error); bad UTF-8 and
unparsable bytes are INVALID_ARGUMENT naming the message, on unary calls and in the
middle of a stream alike, and the server logs no traceback for any of it. How many
inputs were tried is printed at the end.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from nextchar.proto import nextchar_pb2 as pb
from nextchar.server.replies import varint
from server_harness import ServerThread, cancel, make_registry, start_server

SERVICE = pb.DESCRIPTOR.services_by_name["NextCharService"]
BAD_UTF8 = {
    "continuation": b"\x80abc",
    "surrogate": b"\xed\xa0\x80",
    "above U+10FFFF": b"\xf4\x90\x80\x80",
    "overlong": b"\xc0\xaf",
    "truncated": b"abc\xe2\x82",
}
UNHANDLED = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
RANDOM_INPUTS = 25  # per RPC
MUTATIONS = 25  # per RPC
SAMPLES: dict[str, Any] = {  # a valid request per RPC, to mutate
    "CreateSession": pb.CreateSessionRequest(
        session_id="s1", prime_text="hello", model=pb.ModelRef(name="default"), adapt=True
    ),
    "GetSession": pb.GetSessionRequest(session_id="s1"),
    "ListSessions": pb.ListSessionsRequest(page_size=5, page_token="5"),
    "ResetSession": pb.ResetSessionRequest(session_id="s1"),
    "ForkSession": pb.ForkSessionRequest(source_session_id="s1", session_id="s2"),
    "CloseSession": pb.CloseSessionRequest(session_id="s2"),
    "ExportSession": pb.ExportSessionRequest(session_id="s1"),
    "ImportSession": pb.ImportSessionRequest(blob=b"\x08\x01\x12\x09\x0a\x07default", session_id="s3"),
    "Predict": pb.PredictRequest(
        text="hello", top_k=3, model=pb.ModelRef(name="default", version=1), adapt=True
    ),
    "PredictStream": pb.PredictStreamRequest(text="hello", top_k=3, adapt=True),
    "RewindSession": pb.RewindSessionRequest(session_id="s1", chars=2, top_k=2),
    "Complete": pb.CompleteRequest(prime_text="hel", n=3, max_chars=5),
    "Generate": pb.GenerateRequest(prime_text="he", length=5, temperature=0.5, top_k=2, seed=1),
    "Train": pb.TrainRequest(model_name="m", text="x", train_config=pb.TrainConfigSpec(epochs=1)),
    "UploadText": pb.UploadTextRequest(piece="hello world"),
    "ListJobs": pb.ListJobsRequest(),
    "WatchJob": pb.WatchJobRequest(job_id="job-1"),
    "CancelJob": pb.CancelJobRequest(job_id="job-1"),
    "ResumeJob": pb.ResumeJobRequest(job_id="job-1"),
    "ListModels": pb.ListModelsRequest(),
    "DescribeModel": pb.DescribeModelRequest(model=pb.ModelRef(name="default")),
    "GetModelHistory": pb.GetModelHistoryRequest(model=pb.ModelRef(name="default")),
    "SetDefaultModel": pb.SetDefaultModelRequest(model=pb.ModelRef(name="default", version=1)),
    "DeleteModel": pb.DeleteModelRequest(model=pb.ModelRef(name="nope", version=9)),
}
TRIED: Counter[str] = Counter()


class Tracebacks(logging.Handler):
    """Every log record that carries a traceback, from any logger (gRPC's own included)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or "Traceback" in record.getMessage():
            self.records.append(record)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    model_dir: Path = tmp_path_factory.mktemp("models")
    make_registry(model_dir, versions=1)
    server = start_server(model_dir, max_chunk_chars=64)
    yield server
    server.close()
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(
            f"\nwire tests: {sum(TRIED.values())} malformed inputs over {len(TRIED)} RPCs, none UNKNOWN or INTERNAL"
        )


@pytest.fixture
def tracebacks() -> Iterator[Tracebacks]:
    handler = Tracebacks()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def send(srv: ServerThread, rpc: str, data: bytes, first: bytes | None = None) -> tuple[grpc.StatusCode, str]:
    """Send raw request bytes; for PredictStream, after an optional valid first message."""
    method = SERVICE.methods_by_name[rpc]
    path = f"/{SERVICE.full_name}/{rpc}"
    channel = srv.channel
    TRIED[rpc] += 1
    try:
        if method.client_streaming:
            call = channel.stream_stream(path, None, None)(
                iter([m for m in (first, data) if m is not None]), timeout=20
            )
            list(call)
        elif method.server_streaming:
            call = channel.unary_stream(path, None, None)(data, timeout=20)
            for _ in call:  # a job watch or a training run could stream for long: one reply is enough
                cancel(call)
                break
        else:
            channel.unary_unary(path, None, None)(data, timeout=20)
    except grpc.RpcError as err:
        return err.code(), str(err.details())
    return grpc.StatusCode.OK, ""


def length_delimited(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def string_fields(descriptor: Descriptor) -> Iterator[tuple[str, list[int]]]:
    """(dotted name, field numbers from the top) of every string field, at most one message down."""
    for f in descriptor.fields:
        if f.type == FieldDescriptor.TYPE_STRING:
            yield f.name, [f.number]
        elif f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type is not None:
            for g in f.message_type.fields:
                if g.type == FieldDescriptor.TYPE_STRING:
                    yield f"{f.name}.{g.name}", [f.number, g.number]


def bad_string(numbers: list[int], payload: bytes) -> bytes:
    data = length_delimited(numbers[-1], payload)
    for number in reversed(numbers[:-1]):
        data = length_delimited(number, data)
    return data


@pytest.mark.parametrize("rpc", list(SERVICE.methods_by_name))
def test_invalid_utf8_in_every_string_field_is_invalid_argument(
    srv: ServerThread, tracebacks: Tracebacks, rpc: str
) -> None:
    message = SERVICE.methods_by_name[rpc].input_type
    fields = list(string_fields(message))
    for name, numbers in fields:
        for kind, payload in BAD_UTF8.items():
            code, details = send(srv, rpc, bad_string(numbers, payload))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (
                f"{rpc}.{name} with {kind}: {code.name} {details}"
            )
            assert message.name in details, details
    assert not tracebacks.records, [r.getMessage()[:200] for r in tracebacks.records]


@pytest.mark.parametrize("rpc", list(SERVICE.methods_by_name))
def test_random_and_mutated_bytes_never_crash_a_call(
    srv: ServerThread, tracebacks: Tracebacks, rpc: str
) -> None:
    rng = random.Random(rpc)
    sample = SAMPLES[rpc].SerializeToString()
    inputs = [rng.randbytes(rng.randint(1, 300)) for _ in range(RANDOM_INPUTS)]
    for _ in range(MUTATIONS):
        data = bytearray(sample)
        how = rng.choice(("flip", "cut", "repeat", "grow"))
        if how == "flip" and data:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif how == "cut" and data:
            del data[rng.randrange(len(data)) :]
        elif how == "repeat":
            data = bytearray(bytes(data) * rng.randint(2, 5))
        else:
            data += rng.randbytes(rng.randint(1, 40))
        inputs.append(bytes(data))
    for raw in inputs:
        code, details = send(srv, rpc, raw)
        assert code not in UNHANDLED, f"{rpc}({raw!r}) -> {code.name}: {details}"
    assert not tracebacks.records, [r.getMessage()[:200] for r in tracebacks.records]


def test_malformed_bytes_mid_stream_end_the_stream_with_invalid_argument(
    srv: ServerThread, tracebacks: Tracebacks
) -> None:
    good = pb.PredictStreamRequest(text="hello").SerializeToString()
    for kind, payload in BAD_UTF8.items():
        code, details = send(srv, "PredictStream", bad_string([2], payload), first=good)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "PredictStreamRequest" in details, (kind, details)
    code, details = send(srv, "PredictStream", b"\xff\xff\xff", first=good)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert not tracebacks.records


def test_a_request_over_its_methods_size_limit_is_refused_before_parsing(srv: ServerThread) -> None:
    """A prediction chunk is at most 64 characters here: 1 MB of text is no Predict. (10 MB is
    over every message's limit, max_message_bytes: gRPC refuses it from its length prefix.)"""
    code, details = send(srv, "Predict", pb.PredictRequest(text="a" * 1_000_000).SerializeToString())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "PredictRequest" in details and "limit" in details
    code, details = send(srv, "Predict", pb.PredictRequest(text="a" * 10_000_000).SerializeToString())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, _ = send(srv, "GetSession", pb.GetSessionRequest(session_id="x" * 200_000).SerializeToString())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert srv.stub.Predict(pb.PredictRequest(text="hello"), timeout=10).predictions.count == 5


def test_every_sample_is_a_valid_request() -> None:
    """The mutations start from real requests of each RPC's own message type."""
    for rpc, sample in SAMPLES.items():
        assert type(sample) is GetMessageClass(SERVICE.methods_by_name[rpc].input_type), rpc
