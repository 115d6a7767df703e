"""Envelope encryption at rest: the cipher, the keyring, and `LocalStore` with a cipher
(the store contract, tampering, wrong and retired keys, rotation and rewrap)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from modelguard.config import PlatformSettings
from modelguard.errors import IntegrityError, InvalidInput
from modelguard.runtime import build_store
from modelguard.signing import Signer
from modelguard.store import make_store, rewrap_keys
from modelguard.store.base import ArtifactStore, digest
from modelguard.store.encryption import (
    ALGORITHM,
    KEY_BYTES,
    TAG_BYTES,
    Envelope,
    EnvelopeCipher,
    Keyring,
    associated_data,
    unpack,
    writing_for,
)
from modelguard.store.local import LocalStore
from tests.contracts.store_contract import StoreContract
from tests.unit.shared.store.keyrings import new_key, write_keyring

MODEL = b"\x00weights\xff" * 1000


def keyring_of(tenants: dict[str, tuple[str, dict[str, str]]], tmp_path: Path) -> Keyring:
    return Keyring.load(write_keyring(tmp_path / "keyring.json", tenants))


@pytest.fixture
def platform_keys() -> dict[str, str]:
    return {"p1": new_key()}


@pytest.fixture
def cipher(platform_keys: dict[str, str], tmp_path: Path) -> EnvelopeCipher:
    return EnvelopeCipher(keyring_of({"platform": ("p1", platform_keys)}, tmp_path))


def stored_envelope(store: LocalStore, key: str) -> tuple[Envelope, bytes]:
    envelope, ciphertext = unpack(key, (store.root / key).read_bytes())
    assert envelope is not None
    return envelope, ciphertext


# --- the cipher ------------------------------------------------------------------------------


def test_seal_and_open_round_trip(cipher: EnvelopeCipher) -> None:
    ciphertext, envelope = cipher.seal("blobs/x", MODEL)
    assert len(ciphertext) == len(MODEL) + TAG_BYTES
    assert MODEL[:64] not in ciphertext
    assert (envelope.tenant, envelope.kek_id, envelope.algorithm) == ("platform", "p1", ALGORITHM)
    assert len(envelope.nonce) == 12 and len(envelope.wrapped_key) == KEY_BYTES + 8
    assert cipher.open("blobs/x", ciphertext, envelope) == MODEL


def test_every_object_gets_its_own_data_key_and_nonce(cipher: EnvelopeCipher) -> None:
    first_ct, first = cipher.seal("a", MODEL)
    second_ct, second = cipher.seal("a", MODEL)
    assert first.wrapped_key != second.wrapped_key and first.nonce != second.nonce
    assert first_ct != second_ct


def test_envelope_survives_metadata_round_trip(cipher: EnvelopeCipher) -> None:
    _, envelope = cipher.seal("a", b"x")
    metadata = envelope.to_metadata()
    assert all(name == name.lower() and value.isascii() for name, value in metadata.items())
    assert Envelope.from_metadata(metadata, "a") == envelope
    assert Envelope.from_metadata({}, "a") is None
    with pytest.raises(IntegrityError, match="lacks"):
        Envelope.from_metadata({"mg-enc-alg": ALGORITHM}, "a")
    with pytest.raises(IntegrityError, match="reads"):
        Envelope.from_metadata({**metadata, "mg-enc-alg": "ROT13"}, "a")


def test_ciphertext_cannot_move_to_another_object(cipher: EnvelopeCipher) -> None:
    ciphertext, envelope = cipher.seal("docs/audits/a.json", b'{"verdict": "clean"}')
    with pytest.raises(IntegrityError, match=re.escape("docs/audits/b.json")):
        cipher.open("docs/audits/b.json", ciphertext, envelope)
    assert associated_data("a", "t") != associated_data("a", "u")


# --- the keyring --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({}, "tenants"),
        ({"tenants": {"acme": {"active": "a", "keys": {"a": new_key()}}}}, "platform"),
        ({"tenants": {"platform": {"active": "b", "keys": {"a": new_key()}}}}, "not among"),
        ({"tenants": {"platform": {"active": "a", "keys": {"a": "c2hvcnQ="}}}}, "5 bytes"),
        ({"tenants": {"platform": {"active": "a", "keys": {"a": "not base64!"}}}}, "base64"),
        ({"tenants": {"platform": "p1"}}, "expected"),
    ],
)
def test_malformed_keyrings_are_refused(document: object, message: str, tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    path.write_text(json.dumps(document))
    with pytest.raises(InvalidInput, match=message):
        Keyring.load(path)


def test_unreadable_keyring_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=re.escape("missing.json")):
        Keyring.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InvalidInput, match=re.escape("bad.json")):
        Keyring.load(tmp_path / "bad.json")


def test_each_tenant_writes_with_its_own_key(tmp_path: Path) -> None:
    keyring = keyring_of(
        {"platform": ("p1", {"p1": new_key()}), "acme": ("a1", {"a1": new_key()})}, tmp_path
    )
    store = LocalStore(tmp_path / "store", EnvelopeCipher(keyring))
    with writing_for("acme"):
        acme = store.put_blob(b"acme's model")
    with writing_for("globex"):  # no keys of its own: the platform's
        globex = store.put_blob(b"globex's model")
    platform = store.put_blob(b"written outside any tenant")
    assert stored_envelope(store, acme.key)[0].kek_id == "a1"
    assert stored_envelope(store, globex.key)[0].tenant == "platform"
    assert stored_envelope(store, platform.key)[0].kek_id == "p1"
    assert store.get_blob(acme) == b"acme's model"


# --- LocalStore with a cipher ---------------------------------------------------------------


class TestEncryptedLocalStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path, cipher: EnvelopeCipher) -> LocalStore:
        return LocalStore(tmp_path / "store", cipher)

    def tamper(self, store: ArtifactStore, key: str, data: bytes) -> None:
        assert isinstance(store, LocalStore)
        (store.root / key).write_bytes(data)

    def object_keys(self, store: ArtifactStore) -> list[str]:
        assert isinstance(store, LocalStore)
        return sorted(
            p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file()
        )


def test_round_trip_keeps_only_ciphertext_at_rest(tmp_path: Path, cipher: EnvelopeCipher) -> None:
    store = LocalStore(tmp_path / "s", cipher)
    ref = store.put_blob(MODEL)
    store.put_doc("audits/a.json", b'{"secret": "report"}')
    assert ref.sha256 == digest(MODEL) and ref.size == len(MODEL)  # addressed by plaintext
    blob_file = (tmp_path / "s" / ref.key).read_bytes()
    assert MODEL[:64] not in blob_file
    assert b"report" not in (tmp_path / "s" / "docs/audits/a.json").read_bytes()
    assert store.get_blob(ref) == MODEL
    assert store.get_doc("audits/a.json") == b'{"secret": "report"}'
    assert store.put_blob(MODEL) == ref
    assert (tmp_path / "s" / ref.key).read_bytes() == blob_file  # idempotent: not re-encrypted


@pytest.mark.parametrize("offset", [0, len(MODEL) // 2, -1])
def test_a_flipped_ciphertext_byte_is_refused(
    tmp_path: Path, cipher: EnvelopeCipher, offset: int
) -> None:
    store = LocalStore(tmp_path / "s", cipher)
    ref = store.put_blob(MODEL)
    path = tmp_path / "s" / ref.key
    stored = bytearray(path.read_bytes())
    header = len(stored) - len(MODEL) - TAG_BYTES
    stored[header + offset if offset >= 0 else offset] ^= 0x01
    path.write_bytes(bytes(stored))
    with pytest.raises(IntegrityError, match=ref.key):
        store.get_blob(ref)


def test_a_changed_document_is_refused(tmp_path: Path, cipher: EnvelopeCipher) -> None:
    store = LocalStore(tmp_path / "s", cipher)
    store.put_doc("audits/a.json", b'{"verdict": "backdoored"}')
    store.put_doc("audits/b.json", b'{"verdict": "clean"}')
    # swapping whole files (envelope and ciphertext) between objects is refused too
    clean = (tmp_path / "s" / "docs/audits/b.json").read_bytes()
    (tmp_path / "s" / "docs/audits/a.json").write_bytes(clean)
    with pytest.raises(IntegrityError, match=re.escape("docs/audits/a.json")):
        store.get_doc("audits/a.json")


def test_plaintext_objects_are_refused_when_encryption_is_on(
    tmp_path: Path, cipher: EnvelopeCipher
) -> None:
    ref = LocalStore(tmp_path / "s").put_blob(MODEL)
    with pytest.raises(IntegrityError, match=f"{ref.key} is not encrypted"):
        LocalStore(tmp_path / "s", cipher).get_blob(ref)


def test_a_wrong_key_is_refused(tmp_path: Path, cipher: EnvelopeCipher) -> None:
    ref = LocalStore(tmp_path / "s", cipher).put_blob(MODEL)
    impostor = keyring_of({"platform": ("p1", {"p1": new_key()})}, tmp_path)  # same id
    with pytest.raises(IntegrityError, match=f"{ref.key}: key 'p1'.*does not unwrap"):
        LocalStore(tmp_path / "s", EnvelopeCipher(impostor)).get_blob(ref)


def test_rotation_keeps_retired_keys_readable_until_removed(
    tmp_path: Path, platform_keys: dict[str, str], cipher: EnvelopeCipher
) -> None:
    old = LocalStore(tmp_path / "s", cipher).put_blob(MODEL)
    p2 = new_key()
    rotated = keyring_of({"platform": ("p2", {**platform_keys, "p2": p2})}, tmp_path)
    store = LocalStore(tmp_path / "s", EnvelopeCipher(rotated))
    new = store.put_blob(b"written after the rotation")
    assert stored_envelope(store, new.key)[0].kek_id == "p2"
    assert store.get_blob(old) == MODEL  # p1 retired but listed
    without_p1 = keyring_of({"platform": ("p2", {"p2": p2})}, tmp_path)
    trimmed = LocalStore(tmp_path / "s", EnvelopeCipher(without_p1))
    assert trimmed.get_blob(new) == b"written after the rotation"
    with pytest.raises(IntegrityError, match=f"{old.key} is wrapped by key 'p1'.*no longer"):
        trimmed.get_blob(old)


def test_rewrap_moves_data_keys_to_the_active_key_without_touching_ciphertext(
    tmp_path: Path, platform_keys: dict[str, str], cipher: EnvelopeCipher
) -> None:
    before = LocalStore(tmp_path / "s", cipher)
    refs = [before.put_blob(MODEL), before.put_blob(b"second")]
    before.put_doc("audits/a.json", b"{}")
    p2 = new_key()
    rotated = keyring_of({"platform": ("p2", {**platform_keys, "p2": p2})}, tmp_path)
    store = LocalStore(tmp_path / "s", EnvelopeCipher(rotated))
    store.put_blob(b"already under p2")
    ciphertexts = {ref.key: stored_envelope(store, ref.key)[1] for ref in refs}
    nonces = {ref.key: stored_envelope(store, ref.key)[0].nonce for ref in refs}

    report = rewrap_keys(store)

    assert (report.rewrapped, report.current, report.plaintext, report.failed) == (3, 1, 0, {})
    for ref in refs:
        envelope, ciphertext = stored_envelope(store, ref.key)
        assert envelope.kek_id == "p2" and envelope.nonce == nonces[ref.key]
        assert ciphertext == ciphertexts[ref.key]
    assert rewrap_keys(store).current == 4  # nothing left to do
    # the old key can go now
    only_p2 = keyring_of({"platform": ("p2", {"p2": p2})}, tmp_path)
    store = LocalStore(tmp_path / "s", EnvelopeCipher(only_p2))
    assert store.get_blob(refs[0]) == MODEL and store.get_doc("audits/a.json") == b"{}"


def test_rewrap_reports_objects_it_cannot_unwrap(tmp_path: Path, cipher: EnvelopeCipher) -> None:
    ref = LocalStore(tmp_path / "s", cipher).put_blob(MODEL)
    LocalStore(tmp_path / "s").put_doc("legacy.json", b"{}")
    lost = keyring_of({"platform": ("p9", {"p9": new_key()})}, tmp_path)
    report = LocalStore(tmp_path / "s", EnvelopeCipher(lost)).rewrap_keys()
    assert report.plaintext == 1 and list(report.failed) == [ref.key]
    assert "no longer" in report.failed[ref.key]
    with pytest.raises(InvalidInput, match="encryption on"):
        rewrap_keys(LocalStore(tmp_path / "s"))


def test_signed_artifacts_come_back_as_signed(tmp_path: Path, cipher: EnvelopeCipher) -> None:
    """What a device downloads is the plaintext that was signed: decryption sits below the
    digest and signature checks, not in place of them."""
    signer = Signer.generate()
    store = LocalStore(tmp_path / "s", cipher)
    ref = store.put_blob(MODEL, media_type="application/x-safetensors")
    signature = signer.sign(ref.sha256, "carrier")
    downloaded = store.get_blob(ref)
    signer.verify(digest(downloaded), signature, kind="carrier")
    assert downloaded == MODEL


# --- settings ------------------------------------------------------------------------------


def test_settings_turn_encryption_on(tmp_path: Path, platform_keys: dict[str, str]) -> None:
    keyring = write_keyring(tmp_path / "keyring.json", {"platform": ("p1", platform_keys)})
    platform = PlatformSettings(
        store_dir=tmp_path / "store", encrypt_artifacts=True, encryption_keyring_file=str(keyring)
    )
    store = build_store(platform)
    assert isinstance(store, LocalStore) and store.cipher is not None
    ref = store.put_blob(MODEL)
    assert MODEL[:64] not in (tmp_path / "store" / ref.key).read_bytes()
    plain = build_store(PlatformSettings(store_dir=tmp_path / "plain"))
    assert isinstance(plain, LocalStore) and plain.cipher is None
    with pytest.raises(InvalidInput, match="KEYRING_FILE"):
        build_store(PlatformSettings(store_dir=tmp_path / "s", encrypt_artifacts=True))
    assert isinstance(make_store("local", root=tmp_path / "m", keyring_file=keyring), LocalStore)


def test_rewrap_can_encrypt_what_was_written_before_encryption(
    tmp_path: Path, cipher: EnvelopeCipher
) -> None:
    plain = LocalStore(tmp_path / "s")
    ref = plain.put_blob(MODEL)
    plain.put_doc("audits/a.json", b'{"verdict": "clean"}')
    damaged = plain.put_blob(b"original")
    (tmp_path / "s" / damaged.key).write_bytes(b"tampered")
    store = LocalStore(tmp_path / "s", cipher)
    assert store.rewrap_keys().plaintext == 3  # reported, left alone without the flag

    report = rewrap_keys(store, encrypt_plaintext=True)

    assert (report.encrypted, list(report.failed)) == (2, [damaged.key])
    assert "corrupted" in report.failed[damaged.key]
    assert MODEL[:64] not in (tmp_path / "s" / ref.key).read_bytes()
    assert store.get_blob(ref) == MODEL
    assert store.get_doc("audits/a.json") == b'{"verdict": "clean"}'
    assert rewrap_keys(store, encrypt_plaintext=True).current == 2
