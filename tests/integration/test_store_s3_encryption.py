"""Encryption at rest against a real S3 server (SeaweedFS): the envelope must survive as
user metadata, and `keys rewrap` must replace it without rewriting the ciphertext."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from modelguard.errors import IntegrityError
from modelguard.localstack import SeaweedServer
from modelguard.store.base import ArtifactStore
from modelguard.store.encryption import META_KEK, Envelope, EnvelopeCipher, Keyring
from modelguard.store.s3 import S3Store, user_metadata
from tests.contracts.store_contract import StoreContract
from tests.unit.shared.store.keyrings import new_key, write_keyring

pytestmark = pytest.mark.integration

MODEL = b"\x00weights\xff" * 5000


def encrypted_store(server: SeaweedServer, bucket: str, keyring: Path) -> S3Store:
    cipher = EnvelopeCipher(Keyring.load(keyring))
    return S3Store(server.endpoint, server.access_key, server.secret_key, bucket, cipher=cipher)


def raw_object(server: SeaweedServer, bucket: str, name: str) -> tuple[bytes, dict[str, str]]:
    response = server.client().get_object(bucket, name)
    try:
        return bytes(response.read()), user_metadata(response.headers)
    finally:
        response.close()
        response.release_conn()


class TestEncryptedS3Store(StoreContract):
    @pytest.fixture
    def store(self, seaweed: SeaweedServer, bucket_name: str, tmp_path: Path) -> S3Store:
        self.seaweed = seaweed
        keyring = write_keyring(tmp_path / "keyring.json", {"platform": ("p1", {"p1": new_key()})})
        return encrypted_store(seaweed, bucket_name, keyring)

    def tamper(self, store: ArtifactStore, key: str, data: bytes) -> None:
        assert isinstance(store, S3Store)
        self.seaweed.client().put_object(store.bucket, key, io.BytesIO(data), len(data))

    def object_keys(self, store: ArtifactStore) -> list[str]:
        assert isinstance(store, S3Store)
        objects = self.seaweed.client().list_objects(store.bucket, recursive=True)
        return sorted(o.object_name for o in objects)


def test_envelope_survives_s3_and_rewrap_keeps_the_ciphertext(
    seaweed: SeaweedServer, bucket_name: str, tmp_path: Path
) -> None:
    keyring = tmp_path / "keyring.json"
    p1, p2 = new_key(), new_key()
    write_keyring(keyring, {"platform": ("p1", {"p1": p1})})
    store = encrypted_store(seaweed, bucket_name, keyring)
    ref = store.put_blob(MODEL, media_type="application/x-safetensors")
    store.put_doc("audits/a.json", b'{"verdict": "clean"}')
    ciphertext, metadata = raw_object(seaweed, bucket_name, ref.key)
    assert MODEL[:64] not in ciphertext and metadata[META_KEK] == "p1"
    assert store.get_blob(ref) == MODEL

    write_keyring(keyring, {"platform": ("p2", {"p1": p1, "p2": p2})})
    rotated = encrypted_store(seaweed, bucket_name, keyring)
    report = rotated.rewrap_keys()
    assert (report.rewrapped, report.current, report.failed) == (2, 0, {})
    after, metadata = raw_object(seaweed, bucket_name, ref.key)
    assert after == ciphertext and metadata[META_KEK] == "p2"
    stat = seaweed.client().stat_object(bucket_name, ref.key)
    assert stat.content_type == "application/x-safetensors"

    write_keyring(keyring, {"platform": ("p2", {"p2": p2})})  # the old key removed
    only_p2 = encrypted_store(seaweed, bucket_name, keyring)
    assert only_p2.get_blob(ref) == MODEL
    assert only_p2.get_doc("audits/a.json") == b'{"verdict": "clean"}'
    assert only_p2.rewrap_keys().current == 2


def test_rewrap_leaves_an_object_that_changed_since_it_was_read(
    seaweed: SeaweedServer, bucket_name: str, tmp_path: Path
) -> None:
    """The metadata-only copy is conditional on the ETag read: a newer write wins."""
    keyring = write_keyring(tmp_path / "keyring.json", {"platform": ("p1", {"p1": new_key()})})
    store = encrypted_store(seaweed, bucket_name, keyring)
    store.put_doc("audits/a.json", b"{}")
    name = "docs/audits/a.json"
    _, metadata = raw_object(seaweed, bucket_name, name)
    envelope = Envelope.from_metadata(metadata, name)
    assert envelope is not None
    assert not store._replace_metadata(name, '"0123456789abcdef"', "application/json", envelope)
    stat = seaweed.client().stat_object(bucket_name, name)
    assert store._replace_metadata(name, str(stat.etag), "application/json", envelope)
    assert store.get_doc("audits/a.json") == b"{}"


def test_a_flipped_byte_on_the_server_is_refused(
    seaweed: SeaweedServer, bucket_name: str, tmp_path: Path
) -> None:
    keyring = write_keyring(tmp_path / "keyring.json", {"platform": ("p1", {"p1": new_key()})})
    store = encrypted_store(seaweed, bucket_name, keyring)
    ref = store.put_blob(MODEL)
    ciphertext, metadata = raw_object(seaweed, bucket_name, ref.key)
    flipped = bytearray(ciphertext)
    flipped[100] ^= 0x80
    seaweed.client().put_object(
        bucket_name,
        ref.key,
        io.BytesIO(bytes(flipped)),
        len(flipped),
        metadata={f"x-amz-meta-{k}": v for k, v in metadata.items()},
    )
    with pytest.raises(IntegrityError, match=ref.key):
        store.get_blob(ref)


def test_plaintext_objects_are_encrypted_in_place_on_request(
    seaweed: SeaweedServer, bucket_name: str, tmp_path: Path
) -> None:
    plain = S3Store(seaweed.endpoint, seaweed.access_key, seaweed.secret_key, bucket_name)
    ref = plain.put_blob(MODEL, media_type="application/x-safetensors")
    plain.put_doc("audits/a.json", b"{}")
    keyring = write_keyring(tmp_path / "keyring.json", {"platform": ("p1", {"p1": new_key()})})
    store = encrypted_store(seaweed, bucket_name, keyring)
    with pytest.raises(IntegrityError, match="not encrypted"):
        store.get_blob(ref)
    report = store.rewrap_keys(encrypt_plaintext=True)
    assert (report.encrypted, report.failed) == (2, {})
    ciphertext, metadata = raw_object(seaweed, bucket_name, ref.key)
    assert MODEL[:64] not in ciphertext and metadata[META_KEK] == "p1"
    assert seaweed.client().stat_object(bucket_name, ref.key).content_type == (
        "application/x-safetensors"
    )
    assert store.get_blob(ref) == MODEL and store.get_doc("audits/a.json") == b"{}"
