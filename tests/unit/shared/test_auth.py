"""Bearer tokens (hashed in a file, minted by the CLI), the AuthInterceptor on a real
in-process server, and TLS/mTLS with certificates made here."""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from modelguard import auth
from modelguard.auth import (
    Identity,
    TokenStore,
    bearer_token,
    current_identity,
    mint_token,
    parse_tokens,
)
from modelguard.channels import ClientTls, open_channel
from modelguard.errors import InvalidInput, Unauthenticated
from modelguard.grpc_server import GrpcServer, ServerTls
from modelguard.metrics import ServiceMetrics
from modelguard.proto.modelguard.v1 import (
    common_pb2,
    trigger_reversal_pb2,
    trigger_reversal_pb2_grpc,
)
from tests.unit.authkit import Certs, Tokens, make_certs, write_tokens


class WhoAmI(trigger_reversal_pb2_grpc.TriggerReversalServicer):
    """GetStatus answers with the caller the servicer sees."""

    def GetStatus(
        self, request: common_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> common_pb2.ServiceStatus:
        caller = current_identity()
        if caller is None:
            return common_pb2.ServiceStatus(service="anonymous")
        return common_pb2.ServiceStatus(service=caller.tenant, version=caller.role)

    def ReverseTriggers(
        self, request: trigger_reversal_pb2.ReverseTriggersRequest, context: grpc.ServicerContext
    ) -> trigger_reversal_pb2.ReverseTriggersResponse:
        raise InvalidInput("not under test")


def _server(tokens: TokenStore | None, tls: ServerTls | None = None) -> GrpcServer:
    metrics = ServiceMetrics(CollectorRegistry(), "trigger-reversal")
    server = GrpcServer(metrics, port=0, metrics_port=-1, tokens=tokens, tls=tls)
    server.register(
        trigger_reversal_pb2_grpc.add_TriggerReversalServicer_to_server,
        WhoAmI(),
        "modelguard.v1.TriggerReversal",
    )
    server.start()
    return server


@pytest.fixture()
def tokens(tmp_path: Path) -> Tokens:
    return write_tokens(tmp_path)


@pytest.fixture()
def server(tokens: Tokens) -> Iterator[GrpcServer]:
    srv = _server(TokenStore(tokens.file))
    yield srv
    srv.stop(0.5)


def _whoami(address: str, token: str = "", tls: ClientTls | None = None) -> tuple[str, str]:
    with open_channel(address, token=token, tls=tls) as channel:
        reply = trigger_reversal_pb2_grpc.TriggerReversalStub(channel).GetStatus(
            common_pb2.StatusRequest(), timeout=10
        )
    return reply.service, reply.version


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value.code()


# --- the tokens file ---------------------------------------------------------------------------
def test_tokens_are_stored_hashed_and_identify_their_tenant(tokens: Tokens) -> None:
    text = tokens.file.read_text()
    assert tokens.acme not in text and tokens.acme.split(".")[2] not in text
    store = TokenStore(tokens.file)
    assert len(store) == 3
    assert store.authenticate(tokens.acme) == Identity("acme", "tenant")
    assert store.authenticate(tokens.admin) == Identity("ops", "admin")
    assert store.authenticate(tokens.admin).sees("acme")
    assert not store.authenticate(tokens.acme).sees("globex")
    for bad in ("", "nonsense", tokens.acme[:-1] + "x", tokens.globex + "x", "mg1.x.y"):
        with pytest.raises(Unauthenticated):
            store.authenticate(bad)


def test_a_malformed_tokens_file_is_refused_with_the_line_number(tmp_path: Path) -> None:
    _, line = mint_token("acme")
    with pytest.raises(InvalidInput, match="line 2: role 'root' unknown"):
        parse_tokens(f"{line}\nacme root {line.split()[2]}\n")
    with pytest.raises(InvalidInput, match="line 1: hash must look like"):
        parse_tokens("acme tenant plaintext-token\n")
    with pytest.raises(InvalidInput, match="duplicate key id"):
        parse_tokens(f"{line}\n{line}\n")
    with pytest.raises(InvalidInput, match="tenant id"):
        mint_token("../etc")
    with pytest.raises(InvalidInput, match="cannot load the tokens file"):
        TokenStore(tmp_path / "missing")


def test_the_tokens_file_is_reloaded_when_it_changes(
    tokens: Tokens, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "RELOAD_INTERVAL_S", 0.0)
    store = TokenStore(tokens.file)
    store.authenticate(tokens.globex)
    newcomer, line = mint_token("initech")
    # globex's token is revoked (its line removed), initech's added
    lines = [x for x in tokens.file.read_text().splitlines() if not x.startswith("globex")]
    tokens.file.write_text("\n".join([*lines, line]) + "\n")
    os.utime(tokens.file, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert store.authenticate(newcomer).tenant == "initech"
    with pytest.raises(Unauthenticated):
        store.authenticate(tokens.globex)
    # a broken update keeps the last good tokens instead of locking everyone out
    tokens.file.write_text("garbage line\n")
    os.utime(tokens.file, ns=(time.time_ns(), time.time_ns() + 2_000_000))
    assert store.authenticate(tokens.acme).tenant == "acme"


def test_token_create_prints_the_token_and_appends_its_hashed_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from modelguard.services.cli import main

    path = tmp_path / "tokens"
    assert main(["token", "create", "--tenant", "acme", "--admin", "--append", str(path)]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert token.startswith("mg1.") and token not in path.read_text()
    assert TokenStore(path).authenticate(token) == Identity("acme", "admin")


# --- the interceptor on a real server ----------------------------------------------------------
def test_calls_without_a_valid_token_are_unauthenticated(
    server: GrpcServer, tokens: Tokens
) -> None:
    assert _code(lambda: _whoami(server.address)) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: _whoami(server.address, "mg1.abc.def")) == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(server.address) as channel:
        stub = trigger_reversal_pb2_grpc.TriggerReversalStub(channel)
        for metadata in ((("authorization", "Basic abc"),), (("authorization", tokens.acme),)):
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetStatus(common_pb2.StatusRequest(), metadata=metadata, timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # a stranger's undecodable bytes never reach the decoder
        raw: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/modelguard.v1.TriggerReversal/ReverseTriggers"
        )
        assert _code(lambda: raw(b"\xff\xff", timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
    count = server.metrics.registry.get_sample_value(
        "modelguard_trigger_reversal_grpc_requests_total",
        {"method": "GetStatus", "code": "UNAUTHENTICATED"},
    )
    assert count == 4.0


def test_the_servicer_sees_the_caller(server: GrpcServer, tokens: Tokens) -> None:
    assert _whoami(server.address, tokens.acme) == ("acme", "tenant")
    assert _whoami(server.address, tokens.admin) == ("ops", "admin")
    assert current_identity() is None  # nothing leaks into this thread


def test_health_and_reflection_stay_open(server: GrpcServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert "modelguard.v1.TriggerReversal" in names


def test_without_a_tokens_file_auth_is_off_with_a_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "_warned", False)
    with caplog.at_level("WARNING", logger="modelguard.auth"):
        assert auth.load_token_store("", "trigger-reversal") is None
    assert "authentication is OFF" in caplog.text
    srv = _server(None)
    try:
        assert _whoami(srv.address) == ("anonymous", "")
    finally:
        srv.stop(0.5)


# --- TLS and mTLS ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def test_mtls_refuses_clients_without_a_trusted_certificate(certs: Certs, tokens: Tokens) -> None:
    tls = ServerTls(str(certs.server_cert), str(certs.server_key), str(certs.ca))
    srv = _server(TokenStore(tokens.file), tls)
    address = f"127.0.0.1:{srv.port}"
    try:
        with_cert = ClientTls(str(certs.ca), str(certs.client_cert), str(certs.client_key))
        assert _whoami(address, tokens.acme, with_cert) == ("acme", "tenant")
        # the certificate proves the client; the token still names the tenant
        assert _code(lambda: _whoami(address, "", with_cert)) == grpc.StatusCode.UNAUTHENTICATED
        refused = (
            ClientTls(str(certs.ca)),  # no client certificate
            ClientTls(str(certs.ca), str(certs.rogue_cert), str(certs.rogue_key)),  # other CA
            None,  # plaintext
        )
        for client_tls in refused:
            code = _code(lambda t=client_tls: _whoami(address, tokens.acme, t))
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop(0.5)


def test_tls_without_client_ca_accepts_any_client_over_tls(certs: Certs) -> None:
    srv = _server(None, ServerTls(str(certs.server_cert), str(certs.server_key)))
    address = f"127.0.0.1:{srv.port}"
    try:
        assert _whoami(address, tls=ClientTls(str(certs.ca))) == ("anonymous", "")
        assert _code(lambda: _whoami(address)) == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop(0.5)


def test_half_a_tls_configuration_is_refused() -> None:
    assert ServerTls.of("", "", "") is None
    with pytest.raises(InvalidInput, match="both"):
        ServerTls.of("cert.pem", "", "")
    with pytest.raises(InvalidInput, match="both"):
        ClientTls.of("", "client.pem", "")


@functools.cache
def _fuzz_store() -> TokenStore:
    directory = Path(tempfile.mkdtemp(prefix="tokens-"))
    return TokenStore(write_tokens(directory).file)


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_any_authorization_value_is_accepted_or_unauthenticated(value: str | bytes) -> None:
    store = _fuzz_store()
    try:
        identity = store.authenticate(bearer_token([("authorization", value)]))
    except Unauthenticated:
        return
    raise AssertionError(f"{value!r} authenticated as {identity}")  # pragma: no cover


def test_the_dev_overlays_bootstrap_mints_an_admin_token_in_the_same_format(
    tmp_path: Path,
) -> None:
    import importlib.util

    script = Path(__file__).parents[3] / "deploy/k8s/overlays/dev/bootstrap-secrets.py"
    spec = importlib.util.spec_from_file_location("bootstrap_secrets", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    secret = module.admin_tokens()
    (tmp_path / "tokens").write_text(secret["tokens"])
    assert secret["admin-token"] not in secret["tokens"]
    assert TokenStore(tmp_path / "tokens").authenticate(secret["admin-token"]).admin


def test_verified_tokens_are_cached_per_tokens_file_version(
    tokens: Tokens, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A returning token skips the salted hash, but the cache never outlives the tokens
    it was checked against, and a wrong token is never cached."""
    monkeypatch.setattr(auth, "RELOAD_INTERVAL_S", 0.0)
    store = TokenStore(tokens.file)
    hashed: list[str] = []
    real_digest = auth._digest

    def counting_digest(salt: bytes, token: str) -> bytes:
        hashed.append(token)
        return real_digest(salt, token)

    monkeypatch.setattr(auth, "_digest", counting_digest)
    for _ in range(3):
        assert store.authenticate(tokens.globex) == Identity("globex", "tenant")
    assert hashed == [tokens.globex]  # checked once, then served from the cache
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            store.authenticate(tokens.globex + "x")
    assert hashed.count(tokens.globex + "x") == 2  # refusals are never cached
    lines = [x for x in tokens.file.read_text().splitlines() if not x.startswith("globex")]
    tokens.file.write_text("\n".join(lines) + "\n")
    os.utime(tokens.file, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    with pytest.raises(Unauthenticated):  # revoked: the reload dropped the cache
        store.authenticate(tokens.globex)
    assert store.authenticate(tokens.acme).tenant == "acme"
