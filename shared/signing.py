"""Signatures anyone can check: reports, repaired models, carriers, mappers and query
profiles are signed with Ed25519 (RFC 8032). Whoever holds the deployment's public key
verifies them offline (`modelguard verify`); only the services hold the private key.

What is signed (the *message*) is the UTF-8 text::

    modelguard-signature/v1\\n<kind>\\n<sha256 of the artifact, lowercase hex>

The domain prefix keeps these signatures from being valid for anything else signed with
the same key, and ``kind`` (``report``, ``repaired-model``, ``carrier``, ``mapper``, ...)
keeps a signed report from passing as a signed model.

A signature travels as a small JSON document (stored beside the artifact, saved next to a
downloaded file as ``FILE.sig``)::

    {"format": "modelguard-signature/v1", "algorithm": "ed25519",
     "key_id": "sha256:<hex>", "kind": "report", "sha256": "<hex>",
     "signature": "<base64 of the 64-byte Ed25519 signature>"}

``key_id`` is the SHA-256 fingerprint of the raw 32-byte public key, so a verifier can
tell "signed by another key" from "changed". Content addressing already refuses bytes
that changed under their key; the signature also refuses a record that was pointed at
other bytes, or bytes this deployment never produced.

Without a configured key (MODELGUARD_SIGNING_KEY_FILE empty) the services use the
*development key*, derived from a published seed so that every process of a local stack
(the embedded demo, the integration tests, separate local processes sharing a store)
signs and verifies alike without configuration. Anyone can forge its signatures: services
refuse it beyond loopback (`modelguard.runtime.check_signing_key`) and `modelguard verify`
says so when it meets it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from modelguard.errors import IntegrityError, InvalidInput

SIGNATURE_FORMAT = "modelguard-signature/v1"
ALGORITHM = "ed25519"
#: Suffix of a signature saved next to its file (``report.json`` -> ``report.json.sig``).
SIGNATURE_SUFFIX = ".sig"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_KIND = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
#: Seed of the published development key. Not a secret: see the module docstring.
_DEVELOPMENT_SEED = hashlib.sha256(b"modelguard published development signing key").digest()


def signed_message(kind: str, sha256_hex: str) -> bytes:
    """The bytes an Ed25519 signature covers (see the module docstring)."""
    return f"{SIGNATURE_FORMAT}\n{kind}\n{sha256_hex}".encode()


def key_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    """SubjectPublicKeyInfo PEM, as ``openssl pkey -pubout`` writes it."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def development_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(_DEVELOPMENT_SEED)


DEVELOPMENT_KEY_ID = key_id_of(development_key().public_key())


@dataclass(frozen=True)
class Signature:
    """One artifact's signature document (see the module docstring)."""

    kind: str
    sha256: str
    key_id: str
    value: bytes  # the 64-byte Ed25519 signature

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": SIGNATURE_FORMAT,
                "algorithm": ALGORITHM,
                "key_id": self.key_id,
                "kind": self.kind,
                "sha256": self.sha256,
                "signature": base64.b64encode(self.value).decode(),
            },
            separators=(",", ":"),
        )

    @classmethod
    def parse(cls, text: str | bytes) -> Signature:
        """The document, or IntegrityError saying what is malformed."""
        try:
            document: Any = json.loads(text)
        except (ValueError, UnicodeDecodeError):
            raise _malformed("not a JSON signature document") from None
        if not isinstance(document, dict):
            raise _malformed("not a JSON object")
        if document.get("format") != SIGNATURE_FORMAT:
            raise _malformed(f"format {document.get('format')!r} is not {SIGNATURE_FORMAT}")
        if document.get("algorithm") != ALGORITHM:
            raise _malformed(f"algorithm {document.get('algorithm')!r} is not {ALGORITHM}")
        fields = {name: document.get(name) for name in ("key_id", "kind", "sha256", "signature")}
        missing = [name for name, value in fields.items() if not isinstance(value, str)]
        if missing:
            raise _malformed("missing " + ", ".join(missing))
        kind, sha256, key_id = str(fields["kind"]), str(fields["sha256"]), str(fields["key_id"])
        if not _KIND.fullmatch(kind):
            raise _malformed(f"kind {kind!r} is not a ModelGuard artifact kind")
        if not _SHA256_HEX.fullmatch(sha256):
            raise _malformed("sha256 is not 64 lowercase hex digits")
        try:
            value = base64.b64decode(str(fields["signature"]), validate=True)
        except (binascii.Error, ValueError):
            raise _malformed("signature is not base64") from None
        if len(value) != 64:
            raise _malformed(f"an Ed25519 signature has 64 bytes, this one {len(value)}")
        return cls(kind, sha256, key_id, value)


@dataclass(frozen=True)
class PublishedKey:
    """What a deployment publishes so that users can verify its signatures."""

    algorithm: str
    key_id: str
    pem: str
    development: bool  # the published development key: its signatures prove nothing


def _malformed(reason: str) -> IntegrityError:
    return IntegrityError(f"the signature is malformed: {reason}")


class Verifier:
    """Checks signatures with a public key only: what `modelguard verify` uses offline."""

    def __init__(self, public_key: Ed25519PublicKey) -> None:
        self.public_key = public_key
        self.key_id = key_id_of(public_key)

    @classmethod
    def from_pem(cls, pem: bytes, source: str = "public key") -> Verifier:
        """An Ed25519 public key (PEM), or the public half of a private key PEM."""
        try:
            if b"PRIVATE KEY" in pem:
                private = serialization.load_pem_private_key(pem, password=None)
                key: Any = private.public_key()
            else:
                key = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError) as err:
            raise InvalidInput(f"{source} is not a PEM key: {err}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise InvalidInput(f"{source} is a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    @property
    def public_key_pem(self) -> str:
        return public_key_pem(self.public_key)

    @property
    def is_development_key(self) -> bool:
        return self.key_id == DEVELOPMENT_KEY_ID

    def published(self) -> PublishedKey:
        return PublishedKey(ALGORITHM, self.key_id, self.public_key_pem, self.is_development_key)

    def check(self, sha256_hex: str, signature: str | bytes, kind: str | None = None) -> Signature:
        """The parsed signature if it vouches for ``sha256_hex`` (and ``kind``, when
        given) under this key; otherwise IntegrityError naming the reason."""
        what = f"{kind or 'artifact'} {sha256_hex[:16]}…"
        try:
            parsed = Signature.parse(signature)
        except IntegrityError as err:
            raise IntegrityError(f"{what} has an invalid signature: {err}; refused") from None
        if parsed.sha256 != sha256_hex:
            raise IntegrityError(
                f"{what} has an invalid signature: it signs other bytes (sha256 "
                f"{parsed.sha256[:16]}…), so the file changed or this is another file's "
                "signature; refused"
            )
        if kind is not None and parsed.kind != kind:
            raise IntegrityError(
                f"{what} has an invalid signature: it signs a {parsed.kind}, not a {kind}; refused"
            )
        if parsed.key_id != self.key_id:
            raise IntegrityError(
                f"{what} has an invalid signature: it was made with key {parsed.key_id}, "
                f"not with the verifying key {self.key_id}; refused"
            )
        try:
            self.public_key.verify(parsed.value, signed_message(parsed.kind, parsed.sha256))
        except InvalidSignature:
            raise IntegrityError(
                f"{what} has an invalid signature: it was not produced by this key's owner "
                "or was modified; refused"
            ) from None
        return parsed

    def verify(self, sha256_hex: str, signature: str, kind: str | None = None) -> None:
        self.check(sha256_hex, signature, kind)


class Signer(Verifier):
    """Signs with the deployment's Ed25519 private key (and verifies with its public half)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        super().__init__(private_key.public_key())
        self._private_key = private_key

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def development(cls) -> Signer:
        """The published development key (see the module docstring): forgeable."""
        return cls(development_key())

    @classmethod
    def from_private_pem(cls, pem: bytes, source: str = "signing key") -> Signer:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as err:
            raise InvalidInput(
                f"{source} is not an unencrypted PEM private key ({err}); make one with "
                "`openssl genpkey -algorithm ed25519 -out signing-key.pem`"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise InvalidInput(f"{source} is a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    @classmethod
    def from_file(cls, path: str | Path) -> Signer:
        try:
            pem = Path(path).read_bytes()
        except OSError as err:
            raise InvalidInput(f"cannot read the signing key file {path}: {err.strerror}") from None
        return cls.from_private_pem(pem, f"signing key file {path}")

    def private_key_pem(self) -> bytes:
        """PKCS#8 PEM, as ``openssl genpkey -algorithm ed25519`` writes it."""
        return self._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(self, sha256_hex: str, kind: str) -> str:
        """The signature document (JSON) of the artifact with this digest."""
        if not _KIND.fullmatch(kind):
            raise ValueError(f"artifact kind {kind!r}: lowercase letters, digits, - and _")
        value = self._private_key.sign(signed_message(kind, sha256_hex))
        return Signature(kind, sha256_hex, self.key_id, value).to_json()


def signature_path(path: Path) -> Path:
    """Where the signature of a downloaded file is saved (and looked for by default)."""
    return path.with_name(path.name + SIGNATURE_SUFFIX)


def verify_file(path: Path, signature: bytes, verifier: Verifier) -> Signature:
    """Check a file on disk against its signature document with a public key only."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return verifier.check(digest.hexdigest(), signature)
