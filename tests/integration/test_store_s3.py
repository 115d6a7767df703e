"""The ArtifactStore contract against `S3Store` on SeaweedFS, plus an S3 outage."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from modelguard.errors import Unavailable
from modelguard.localstack import SeaweedServer
from modelguard.store import make_store
from modelguard.store.base import ArtifactStore
from modelguard.store.s3 import S3Store
from tests.contracts.store_contract import StoreContract

pytestmark = pytest.mark.integration


def s3_store(server: SeaweedServer, bucket: str) -> S3Store:
    return S3Store(server.endpoint, server.access_key, server.secret_key, bucket)


class TestS3Store(StoreContract):
    @pytest.fixture
    def store(self, seaweed: SeaweedServer, bucket_name: str) -> S3Store:
        self.seaweed = seaweed
        return s3_store(seaweed, bucket_name)

    def tamper(self, store: ArtifactStore, key: str, data: bytes) -> None:
        assert isinstance(store, S3Store)
        self.seaweed.client().put_object(store.bucket, key, io.BytesIO(data), len(data))

    def object_keys(self, store: ArtifactStore) -> list[str]:
        assert isinstance(store, S3Store)
        objects = self.seaweed.client().list_objects(store.bucket, recursive=True)
        return sorted(o.object_name for o in objects)


def test_creates_its_bucket(seaweed: SeaweedServer, bucket_name: str) -> None:
    store = make_store(
        "s3",
        endpoint=seaweed.endpoint,
        access_key=seaweed.access_key,
        secret_key=seaweed.secret_key,
        bucket=bucket_name,
    )
    store.ping()
    assert seaweed.client().bucket_exists(bucket_name)


def test_wrong_credentials_are_reported(seaweed: SeaweedServer, bucket_name: str) -> None:
    store = S3Store(seaweed.endpoint, seaweed.access_key, "wrong-secret", bucket_name)
    with pytest.raises(Unavailable, match="credentials"):
        store.ping()


def test_stopped_server_is_unavailable_then_recovers(tmp_path: Path, bucket_name: str) -> None:
    """A server of its own: stopping the session's would take Tansu's storage away."""
    server = SeaweedServer(tmp_path / "seaweedfs")
    server.start()
    try:
        store = s3_store(server, bucket_name)
        ref = store.put_blob(b"survives restarts")
        store.put_doc("a.json", b"{}")
        server.stop()
        started = time.monotonic()
        for call in (
            store.ping,
            lambda: store.get_blob(ref),
            lambda: store.get_doc("a.json"),
            lambda: store.put_doc("b.json", b"{}"),
            lambda: store.list_docs(""),
        ):
            with pytest.raises(Unavailable, match="unreachable"):
                call()
        assert time.monotonic() - started < 10
        server.start()
        assert store.get_blob(ref) == b"survives restarts"
        assert store.list_docs("") == ["a.json"]
    finally:
        server.stop()
