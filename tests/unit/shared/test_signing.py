"""Ed25519 signatures (issue 19): a round trip, and the refusals a user relies on when
checking a downloaded file with the public key only — one changed byte, another key, a
signature for another kind of artifact, a malformed or forged signature document."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from modelguard.errors import IntegrityError, InvalidInput
from modelguard.signing import (
    DEVELOPMENT_KEY_ID,
    SIGNATURE_FORMAT,
    Signature,
    Signer,
    Verifier,
    signature_path,
    verify_file,
)

PAYLOAD = b'{"verdicts": {"trigger-reversal": "infected"}}'
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.generate()


@pytest.fixture(scope="module")
def verifier(signer: Signer) -> Verifier:
    """What a user holds: the public key's PEM and nothing else."""
    return Verifier.from_pem(signer.public_key_pem.encode())


def test_a_signature_round_trips_with_the_public_key_only(
    signer: Signer, verifier: Verifier
) -> None:
    document = signer.sign(DIGEST, "report")
    checked = verifier.check(DIGEST, document, "report")
    assert (checked.kind, checked.sha256, checked.key_id) == ("report", DIGEST, signer.key_id)
    assert verifier.key_id == signer.key_id
    assert verifier.key_id.startswith("sha256:") and len(verifier.key_id) == 7 + 64
    # Ed25519 is deterministic: signing again (a redelivered event) writes the same bytes
    assert signer.sign(DIGEST, "report") == document


def test_the_signature_covers_the_documented_message(signer: Signer) -> None:
    """Anyone with another Ed25519 implementation can check it: the message is the one
    the module documents, the value plain base64."""
    document = json.loads(signer.sign(DIGEST, "repaired-model"))
    assert document["format"] == SIGNATURE_FORMAT and document["algorithm"] == "ed25519"
    raw = signer.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    Ed25519PublicKey.from_public_bytes(raw).verify(
        base64.b64decode(document["signature"]),
        f"modelguard-signature/v1\nrepaired-model\n{DIGEST}".encode(),
    )
    assert document["key_id"] == "sha256:" + hashlib.sha256(raw).hexdigest()


def test_one_changed_byte_is_refused(signer: Signer, verifier: Verifier, tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_bytes(PAYLOAD)
    signature = signer.sign(DIGEST, "report").encode()
    assert verify_file(path, signature, verifier).sha256 == DIGEST
    changed = bytearray(PAYLOAD)
    changed[len(changed) // 2] ^= 0x01
    path.write_bytes(bytes(changed))
    with pytest.raises(IntegrityError, match=r"signs other bytes .* the file changed"):
        verify_file(path, signature, verifier)


def test_a_signature_made_with_another_key_is_refused(signer: Signer) -> None:
    document = signer.sign(DIGEST, "report")
    other = Verifier.from_pem(Signer.generate().public_key_pem.encode())
    with pytest.raises(IntegrityError, match=rf"made with key {signer.key_id}, not with"):
        other.check(DIGEST, document)


def test_a_forged_signature_under_the_right_key_id_is_refused(
    signer: Signer, verifier: Verifier
) -> None:
    """The key id is only a label: the Ed25519 check decides."""
    forger = Signer.generate()
    forged = json.loads(forger.sign(DIGEST, "report"))
    forged["key_id"] = signer.key_id
    with pytest.raises(IntegrityError, match="not produced by this key's owner"):
        verifier.check(DIGEST, json.dumps(forged))
    # nor may a signature be moved to another kind: the kind is part of the message
    moved = json.loads(signer.sign(DIGEST, "report"))
    moved["kind"] = "repaired-model"
    with pytest.raises(IntegrityError, match="not produced by this key's owner"):
        verifier.check(DIGEST, json.dumps(moved))


def test_a_signature_of_another_kind_is_refused_when_the_kind_is_expected(
    signer: Signer, verifier: Verifier
) -> None:
    document = signer.sign(DIGEST, "profile")
    with pytest.raises(IntegrityError, match=r"mapper .* it signs a profile, not a mapper"):
        verifier.check(DIGEST, document, "mapper")


def _valid(signer: Signer) -> dict[str, str]:
    return dict(json.loads(signer.sign(DIGEST, "report")))


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda d: "forged", "not a JSON signature document"),
        (lambda d: "[1, 2]", "not a JSON object"),
        (lambda d: json.dumps({**d, "format": "hmac"}), "format 'hmac' is not"),
        (lambda d: json.dumps({**d, "algorithm": "rsa"}), "algorithm 'rsa' is not ed25519"),
        (lambda d: json.dumps({k: v for k, v in d.items() if k != "kind"}), "missing kind"),
        (lambda d: json.dumps({**d, "sha256": d["sha256"].upper()}), "64 lowercase hex"),
        (lambda d: json.dumps({**d, "signature": "***"}), "not base64"),
        (lambda d: json.dumps({**d, "signature": "AAAA"}), "64 bytes, this one 3"),
        (lambda d: json.dumps({**d, "kind": "../etc"}), "not a ModelGuard artifact kind"),
    ],
)
def test_a_malformed_signature_is_refused_with_what_is_wrong(
    signer: Signer, verifier: Verifier, edit: object, reason: str
) -> None:
    document = edit(_valid(signer))  # type: ignore[operator]
    expected = r"invalid signature: the signature is malformed: .*" + re.escape(reason)
    with pytest.raises(IntegrityError, match=expected):
        verifier.check(DIGEST, document)


def test_keys_load_from_pem_and_other_key_types_are_refused(signer: Signer) -> None:
    again = Signer.from_private_pem(signer.private_key_pem())
    assert again.key_id == signer.key_id
    # the private key's PEM also yields its public half (an operator may point at it)
    assert Verifier.from_pem(signer.private_key_pem()).key_id == signer.key_id
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(InvalidInput, match="not an Ed25519 key"):
        Verifier.from_pem(ec_pem)
    with pytest.raises(InvalidInput, match="not a PEM key"):
        Verifier.from_pem(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(InvalidInput, match="openssl genpkey"):
        Signer.from_private_pem(b"not a key")


def test_the_development_key_is_fixed_and_recognisable() -> None:
    development = Signer.development()
    assert development.key_id == DEVELOPMENT_KEY_ID == Signer.development().key_id
    assert development.is_development_key and development.published().development
    assert not Signer.generate().is_development_key


def test_signature_documents_parse_back_and_sit_next_to_their_file(signer: Signer) -> None:
    parsed = Signature.parse(signer.sign(DIGEST, "carrier_png"))
    assert Signature.parse(parsed.to_json()) == parsed
    assert signature_path(Path("out/repaired-model.safetensors")) == Path(
        "out/repaired-model.safetensors.sig"
    )
    with pytest.raises(ValueError, match="artifact kind"):
        signer.sign(DIGEST, "Report Card")


def test_the_dev_overlays_bootstrap_makes_a_key_pair_the_services_load() -> None:
    import importlib.util

    script = Path(__file__).parents[3] / "deploy/k8s/overlays/dev/bootstrap-secrets.py"
    spec = importlib.util.spec_from_file_location("bootstrap_secrets", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    private_pem, public_pem = module.signing_key_pair()
    signer = Signer.from_private_pem(private_pem.encode())
    assert public_pem == signer.public_key_pem  # the published ConfigMap matches the Secret
    assert not signer.is_development_key
    assert private_pem != module.signing_key_pair()[0]  # a new key each time
