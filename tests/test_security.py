"""Security over the network: bearer tokens on every RPC kind, TLS and mutual TLS, unguessable session ids.

Every server here is real (127.0.0.1:0); the TLS tests make a throwaway CA and
certificates at test time (``cryptography``) and handshake over a real port.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from nextchar.cli.app import app
from nextchar.client import NextCharClient, Tls, Unauthenticated, Unavailable
from nextchar.proto import nextchar_pb2 as pb
from nextchar.proto import nextchar_pb2_grpc as pb_grpc
from nextchar.server.config import ServerConfig
from server_harness import ServerThread, make_registry, start_server
from typer.testing import CliRunner

TOKEN = "s3cret-token_for.tests"

# ---------------------------------------------------------------- a throwaway PKI


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, ec.EllipticCurvePrivateKey] | None
) -> x509.Certificate:
    """A one-day certificate for subject, signed by issuer (name, key), or self-signed as a CA."""
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pair(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{stem}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def make_pki(directory: Path, ca_name: str = "nextchar test CA") -> Path:
    """ca.pem, server.pem/.key (localhost, 127.0.0.1) and client.pem/.key, all signed by a fresh CA."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    _write_pair(directory, "ca", _certificate(ca_name, ca_key, None), ca_key)
    for stem in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        _write_pair(directory, stem, _certificate(f"nextchar {stem}", key, (ca_name, ca_key)), key)
    return directory


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models")
    make_registry(path, versions=1)
    return path


def _server(model_dir: Path, **overrides: Any) -> Iterator[ServerThread]:
    server = start_server(model_dir, train_default_if_empty=False, compute_process=False, **overrides)
    yield server
    server.close()


@pytest.fixture(scope="module")
def token_server(model_dir: Path) -> Iterator[ServerThread]:
    yield from _server(model_dir, token=TOKEN)


@pytest.fixture(scope="module")
def tls_server(model_dir: Path, pki: Path) -> Iterator[ServerThread]:
    yield from _server(model_dir, tls_cert=pki / "server.pem", tls_key=pki / "server.key")


@pytest.fixture(scope="module")
def mtls_server(model_dir: Path, pki: Path) -> Iterator[ServerThread]:
    yield from _server(
        model_dir, tls_cert=pki / "server.pem", tls_key=pki / "server.key", tls_client_ca=pki / "ca.pem"
    )


def address(server: ServerThread) -> str:
    return f"127.0.0.1:{server.port}"


# ---------------------------------------------------------------- tokens

# one RPC of every kind the service has: unary, server-streaming, client-streaming, bidirectional
CALLS: dict[str, Callable[[pb_grpc.NextCharServiceStub, Any], Any]] = {
    "unary": lambda stub, md: stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=5),
    "unary-session": lambda stub, md: stub.CreateSession(pb.CreateSessionRequest(), metadata=md, timeout=5),
    "server-stream": lambda stub, md: list(
        stub.Generate(pb.GenerateRequest(prime_text="hel", length=5), metadata=md, timeout=5)
    ),
    "client-stream": lambda stub, md: stub.UploadText(
        iter([pb.UploadTextRequest(piece="hello")]), metadata=md, timeout=5
    ),
    "bidi": lambda stub, md: list(
        stub.PredictStream(iter([pb.PredictStreamRequest(text="hello")]), metadata=md, timeout=5)
    ),
}
BAD_METADATA = {
    "missing": None,
    "wrong": (("authorization", "Bearer not-the-token"),),
    "not-bearer": (("authorization", TOKEN),),
    "prefix": (("authorization", f"Bearer {TOKEN[:-1]}"),),
}


@pytest.mark.parametrize("kind", CALLS)
@pytest.mark.parametrize("metadata", BAD_METADATA)
def test_missing_or_wrong_token_is_unauthenticated(
    token_server: ServerThread, kind: str, metadata: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        CALLS[kind](token_server.stub, BAD_METADATA[metadata])
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    expected = "missing token" if metadata == "missing" else "wrong token"
    assert expected in (info.value.details() or "")


def test_refusals_are_counted_and_leave_no_session(token_server: ServerThread) -> None:
    registry = token_server.server.metrics.registry
    before = registry.get_sample_value("nextchar_auth_failures_total", {"reason": "missing"}) or 0.0
    sessions_before = len(token_server.server.sessions.store)
    with pytest.raises(grpc.RpcError):
        CALLS["bidi"](token_server.stub, None)
    assert registry.get_sample_value("nextchar_auth_failures_total", {"reason": "missing"}) == before + 1
    assert len(token_server.server.sessions.store) == sessions_before


@pytest.mark.parametrize("kind", CALLS)
def test_the_right_token_works_on_every_rpc_kind(token_server: ServerThread, kind: str) -> None:
    CALLS[kind](token_server.stub, (("authorization", f"Bearer {TOKEN}"),))


def test_health_and_reflection_stay_open_without_a_token(token_server: ServerThread) -> None:
    health = health_pb2_grpc.HealthStub(token_server.channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    reflection = reflection_pb2_grpc.ServerReflectionStub(token_server.channel)
    answers = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for s in next(iter(answers)).list_services_response.service}
    assert "nextchar.v1.NextCharService" in names


def test_client_library_sends_the_token_on_unary_and_streams(token_server: ServerThread) -> None:
    with NextCharClient(address(token_server), token=TOKEN) as client:
        with client.session(prime="hello") as session:
            assert [p.text for p in session.stream([" wo", "rl"])] == [" wo", "rl"]
        assert len(client.generate(prime="hel", length=10, seed=1).text) == 10
        assert client.health() == "SERVING"
    with (
        NextCharClient(address(token_server)) as client,
        pytest.raises(Unauthenticated, match="missing token"),
    ):
        client.models()


def test_cli_sends_the_token_from_the_option_or_the_environment(token_server: ServerThread) -> None:
    runner = CliRunner()
    server = ["--server", address(token_server)]
    refused = runner.invoke(app, ["predict", "hello", *server])
    assert refused.exit_code == 1 and "missing token" in refused.output
    by_option = runner.invoke(app, ["--token", TOKEN, "predict", "hello", "--json", *server])
    assert by_option.exit_code == 0, by_option.output
    by_env = runner.invoke(app, ["predict", "hello", "--json", *server], env={"NEXTCHAR_TOKEN": TOKEN})
    assert by_env.exit_code == 0, by_env.output


# ---------------------------------------------------------------- session ids


def test_server_assigned_session_ids_carry_128_random_bits(token_server: ServerThread) -> None:
    with NextCharClient(address(token_server), token=TOKEN) as client:
        ids = {client.session().id for _ in range(20)}
    assert len(ids) == 20
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)  # 32 hex digits = 128 bits


def test_list_sessions_hides_ids_when_a_token_is_required(token_server: ServerThread) -> None:
    """With auth on an id is the session's only key: listing shows the load, never the keys."""
    with NextCharClient(address(token_server), token=TOKEN) as client:
        mine = client.session(prime="hello")
        listed = client.sessions()
        assert len(listed) == len(token_server.server.sessions.store) >= 1
        assert all(info.session_id == "" for info in listed)
        assert client.attach(mine.id).offset == 5  # the id's holder still reaches it


def test_config_refuses_half_tls_and_unsendable_tokens_and_hides_the_token(pki: Path) -> None:
    with pytest.raises(ValueError, match="tls_cert, tls_key"):
        ServerConfig(tls_cert=pki / "server.pem")
    with pytest.raises(ValueError, match="tls_client_ca"):
        ServerConfig(tls_client_ca=pki / "ca.pem")
    with pytest.raises(ValueError, match="token"):
        ServerConfig(token="has space")
    assert TOKEN not in repr(ServerConfig(token=TOKEN))


# ---------------------------------------------------------------- TLS


def test_tls_handshake_with_the_ca(tls_server: ServerThread, pki: Path) -> None:
    with NextCharClient(address(tls_server), tls=Tls.from_files(pki / "ca.pem")) as client:
        assert client.predict("hello").text == "hello"


def test_plaintext_client_to_a_tls_server_fails_cleanly(tls_server: ServerThread) -> None:
    with NextCharClient(address(tls_server), timeout=2) as client, pytest.raises(Unavailable):
        client.models()


def test_tls_client_refuses_a_server_its_ca_did_not_sign(tls_server: ServerThread, tmp_path: Path) -> None:
    other = make_pki(tmp_path, "another CA")
    with (
        NextCharClient(address(tls_server), timeout=2, tls=Tls.from_files(other / "ca.pem")) as client,
        pytest.raises(Unavailable),
    ):
        client.models()


def test_mutual_tls_needs_a_client_certificate(mtls_server: ServerThread, pki: Path) -> None:
    with_cert = Tls.from_files(pki / "ca.pem", pki / "client.pem", pki / "client.key")
    with NextCharClient(address(mtls_server), tls=with_cert) as client:
        assert client.health() == "SERVING"
        assert client.predict("hel").text == "hel"
    without = Tls.from_files(pki / "ca.pem")
    with NextCharClient(address(mtls_server), timeout=2, tls=without) as client, pytest.raises(Unavailable):
        client.models()


def test_cli_connects_over_mutual_tls(mtls_server: ServerThread, pki: Path) -> None:
    tls = ["--tls-ca", str(pki / "ca.pem"), "--client-cert", str(pki / "client.pem")]
    tls += ["--client-key", str(pki / "client.key")]
    result = CliRunner().invoke(app, [*tls, "predict", "hello", "--json", "--server", address(mtls_server)])
    assert result.exit_code == 0, result.output
