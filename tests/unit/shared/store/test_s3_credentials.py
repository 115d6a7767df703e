"""S3 credentials from the AWS chain: environment, shared file, web identity (IRSA), and a
clear error when none is found. STS and the metadata service are a local HTTP server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import pytest

from modelguard.config import PlatformSettings
from modelguard.errors import Unavailable
from modelguard.runtime import build_store
from modelguard.store.s3 import S3Store, aws_credential_chain

AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_ACCESS_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SECRET_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_REGION",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No AWS credentials anywhere but where a test puts them."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-such-credentials"))
    return monkeypatch


class FakeSts(BaseHTTPRequestHandler):
    """AssumeRoleWithWebIdentity answered with fixed credentials; everything else (the EC2
    metadata paths) is 404."""

    requests: ClassVar[list[dict[str, list[str]]]] = []

    def do_POST(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        FakeSts.requests.append(query)
        if query.get("Action") != ["AssumeRoleWithWebIdentity"]:
            self.send_error(400)
            return
        expires = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = f"""<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <Credentials>
      <AccessKeyId>ASIATEMPORARY</AccessKeyId>
      <SecretAccessKey>temporary-secret</SecretAccessKey>
      <SessionToken>session-token</SessionToken>
      <Expiration>{expires}</Expiration>
    </Credentials>
  </AssumeRoleWithWebIdentityResult>
</AssumeRoleWithWebIdentityResponse>""".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        self.send_error(404)

    def do_GET(self) -> None:
        self.send_error(404)

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def sts() -> Iterator[str]:
    FakeSts.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSts)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_environment_keys_come_first(aws_env: pytest.MonkeyPatch, sts: str) -> None:
    aws_env.setenv("AWS_ACCESS_KEY_ID", "AKIAENV")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    aws_env.setenv("AWS_SESSION_TOKEN", "env-token")
    credentials = aws_credential_chain(endpoint=sts).retrieve()
    assert (credentials.access_key, credentials.secret_key, credentials.session_token) == (
        "AKIAENV",
        "env-secret",
        "env-token",
    )
    assert FakeSts.requests == []  # STS is not asked when the environment has keys


def test_the_shared_credentials_file(aws_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    shared = tmp_path / "credentials"
    shared.write_text(
        "[audit]\naws_access_key_id = AKIAFILE\naws_secret_access_key = file-secret\n"
    )
    aws_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(shared))
    aws_env.setenv("AWS_PROFILE", "audit")
    credentials = aws_credential_chain().retrieve()
    assert (credentials.access_key, credentials.secret_key) == ("AKIAFILE", "file-secret")


def test_web_identity_exchanges_the_projected_token_for_the_role(
    aws_env: pytest.MonkeyPatch, sts: str, tmp_path: Path
) -> None:
    """What EKS IRSA sets up: a projected service-account token and the role's ARN."""
    token_file = tmp_path / "token"
    token_file.write_text("eyJ.service-account.token")
    aws_env.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token_file))
    aws_env.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/modelguard")
    aws_env.setenv("AWS_ROLE_SESSION_NAME", "leak-detector")
    credentials = aws_credential_chain(endpoint=sts).retrieve()
    assert (credentials.access_key, credentials.secret_key, credentials.session_token) == (
        "ASIATEMPORARY",
        "temporary-secret",
        "session-token",
    )
    (request,) = FakeSts.requests
    assert request["Action"] == ["AssumeRoleWithWebIdentity"]
    assert request["WebIdentityToken"] == ["eyJ.service-account.token"]
    assert request["RoleArn"] == ["arn:aws:iam::123456789012:role/modelguard"]
    assert request["RoleSessionName"] == ["leak-detector"]


def test_no_credentials_anywhere_is_unavailable_with_what_to_set(
    aws_env: pytest.MonkeyPatch, sts: str
) -> None:
    with pytest.raises(Unavailable, match="AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN"):
        aws_credential_chain(endpoint=sts).retrieve()


class FakeS3(BaseHTTPRequestHandler):
    """Records the signature of each request: the bucket exists, no object does."""

    signatures: ClassVar[list[tuple[str, str]]] = []

    def do_HEAD(self) -> None:
        FakeS3.signatures.append(
            (self.headers.get("Authorization", ""), self.headers.get("X-Amz-Security-Token", ""))
        )
        bucket_only = urlsplit(self.path).path.strip("/").count("/") == 0
        self.send_response(200 if bucket_only else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    FakeS3.signatures = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeS3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_setting_picks_the_chain_and_the_store_signs_with_it(
    aws_env: pytest.MonkeyPatch, s3_endpoint: str
) -> None:
    aws_env.setenv("AWS_ACCESS_KEY_ID", "AKIAENV")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    aws_env.setenv("AWS_SESSION_TOKEN", "env-token")
    platform = PlatformSettings.model_validate(
        {
            "store": "s3",
            "s3_endpoint": s3_endpoint,
            "s3_credentials": "aws-chain",
            "s3_region": "eu-west-1",
        }
    )
    store = build_store(platform)
    assert isinstance(store, S3Store)
    assert not store.has_blob("0" * 64)
    assert len(FakeS3.signatures) == 2  # the bucket, then the object
    for authorization, token in FakeS3.signatures:
        # SigV4: the chain's key (not the settings' static one), scoped to the region
        assert "Credential=AKIAENV/" in authorization
        assert "/eu-west-1/s3/aws4_request" in authorization
        assert token == "env-token"


def test_static_keys_stay_the_default(aws_env: pytest.MonkeyPatch, s3_endpoint: str) -> None:
    aws_env.setenv("AWS_ACCESS_KEY_ID", "AKIAENV")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    platform = PlatformSettings.model_validate({"store": "s3", "s3_endpoint": s3_endpoint})
    assert platform.s3_credentials == "static"
    store = build_store(platform)
    assert not store.has_blob("0" * 64)
    assert FakeS3.signatures
    for authorization, token in FakeS3.signatures:
        assert f"Credential={platform.s3_access_key}/" in authorization
        assert token == ""
