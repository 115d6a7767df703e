"""Envelope encryption of stored artifacts.

Every object gets its own random 256-bit data key and is encrypted with AES-256-GCM
(NIST SP 800-38D) under a random 96-bit nonce; the associated data binds the ciphertext
to the object's name (a blob's name holds its plaintext sha256), so ciphertexts cannot be
swapped between objects. The data key is wrapped with AES Key Wrap (RFC 3394) under the
writing tenant's key-encryption key (KEK). The envelope (algorithm, tenant, KEK id,
wrapped key, nonce) travels with the object as metadata: S3 user metadata in `S3Store`, a
header in front of the ciphertext in `LocalStore`.

KEKs come from a keyring file mounted from a Secret::

    {"tenants": {
       "platform": {"active": "platform-2026-12", "keys": {"platform-2026-12": "<base64>"}},
       "acme": {"active": "acme-2027-01",
                "keys": {"acme-2027-01": "<base64>", "acme-2026-06": "<base64>"}}}}

Keys are 32 bytes, base64. A tenant's ``active`` key wraps new objects; its other listed
keys are retired but still unwrap older objects; a key removed from the file makes its
objects unreadable (refused with an error naming the object and the key). Tenants without
an entry of their own share the ``platform`` entry. Rotating: add a key, make it active,
run ``modelguard keys rewrap`` (data keys are re-wrapped, ciphertexts stay as they are),
then remove the old key.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import json
import os
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from modelguard.auth import current_identity
from modelguard.errors import IntegrityError, InvalidInput
from modelguard.store.base import BLOB_PREFIX, digest

ALGORITHM = "AES-256-GCM/AES-KW"
PLATFORM_TENANT = "platform"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16

# Metadata names: lowercase ASCII, as S3 returns user metadata (x-amz-meta-<name>).
META_ALGORITHM = "mg-enc-alg"
META_TENANT = "mg-enc-tenant"
META_KEK = "mg-enc-kek"
META_WRAPPED_KEY = "mg-enc-wrapped-key"
META_NONCE = "mg-enc-nonce"
META_NAMES = (META_ALGORITHM, META_TENANT, META_KEK, META_WRAPPED_KEY, META_NONCE)

# LocalStore keeps the envelope in front of the ciphertext: magic, header length, JSON.
LOCAL_MAGIC = b"MGENC1\n"
_LENGTH = struct.Struct(">I")


@dataclass(frozen=True)
class Envelope:
    """What it takes, besides the tenant's KEK, to decrypt one object."""

    tenant: str
    kek_id: str
    wrapped_key: bytes
    nonce: bytes
    algorithm: str = ALGORITHM

    def to_metadata(self) -> dict[str, str]:
        return {
            META_ALGORITHM: self.algorithm,
            META_TENANT: self.tenant,
            META_KEK: self.kek_id,
            META_WRAPPED_KEY: base64.b64encode(self.wrapped_key).decode("ascii"),
            META_NONCE: base64.b64encode(self.nonce).decode("ascii"),
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], name: str) -> Envelope | None:
        """None when the object carries no envelope at all; IntegrityError when it carries
        a damaged or foreign one."""
        present = {k: metadata[k] for k in META_NAMES if k in metadata}
        if not present:
            return None
        if len(present) != len(META_NAMES):
            missing = sorted(set(META_NAMES) - set(present))
            raise IntegrityError(f"artifact {name}: its encryption envelope lacks {missing}")
        if present[META_ALGORITHM] != ALGORITHM:
            raise IntegrityError(
                f"artifact {name} is encrypted with {present[META_ALGORITHM]!r}; "
                f"this version reads {ALGORITHM!r} only"
            )
        try:
            wrapped = base64.b64decode(present[META_WRAPPED_KEY], validate=True)
            nonce = base64.b64decode(present[META_NONCE], validate=True)
        except binascii.Error as err:
            raise IntegrityError(f"artifact {name}: damaged encryption envelope ({err})") from None
        return cls(present[META_TENANT], present[META_KEK], wrapped, nonce)


@dataclass(frozen=True)
class TenantKeys:
    """One tenant's KEKs: ``active`` wraps new data keys; every listed key unwraps."""

    active: str
    keys: Mapping[str, bytes]

    def __post_init__(self) -> None:
        if self.active not in self.keys:
            raise InvalidInput(f"active key {self.active!r} is not among the listed keys")
        for key_id, key in self.keys.items():
            if len(key) != KEY_BYTES:
                raise InvalidInput(
                    f"key {key_id!r} has {len(key)} bytes; key-encryption keys have "
                    f"{KEY_BYTES} (e.g. `openssl rand -base64 32`)"
                )


@dataclass(frozen=True)
class Keyring:
    """Per-tenant KEKs; tenants without an entry use the ``platform`` entry."""

    tenants: Mapping[str, TenantKeys]
    source: str = "keyring"

    def __post_init__(self) -> None:
        if PLATFORM_TENANT not in self.tenants:
            raise InvalidInput(
                f"{self.source}: needs a {PLATFORM_TENANT!r} tenant (its keys wrap the objects "
                "of tenants without keys of their own)"
            )

    @classmethod
    def load(cls, path: Path | str) -> Keyring:
        """Read the keyring file (see the module docstring); errors name the file."""
        source = str(path)
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as err:
            raise InvalidInput(f"cannot read the encryption keyring {source}: {err}") from err
        except ValueError as err:
            raise InvalidInput(f"encryption keyring {source} is not valid JSON: {err}") from err
        return cls.parse(document, source)

    @classmethod
    def parse(cls, document: object, source: str = "keyring") -> Keyring:
        tenants_doc = document.get("tenants") if isinstance(document, dict) else None
        if not isinstance(tenants_doc, dict):
            raise InvalidInput(f"{source}: expected {{'tenants': {{tenant: {{...}}}}}}")
        tenants: dict[str, TenantKeys] = {}
        for tenant, entry in tenants_doc.items():
            where = f"{source}: tenant {tenant!r}"
            if not isinstance(entry, dict) or not isinstance(entry.get("keys"), dict):
                raise InvalidInput(f"{where}: expected {{'active': ID, 'keys': {{ID: base64}}}}")
            keys: dict[str, bytes] = {}
            for key_id, encoded in entry["keys"].items():
                try:
                    keys[key_id] = base64.b64decode(str(encoded), validate=True)
                except binascii.Error:
                    raise InvalidInput(f"{where}: key {key_id!r} is not base64") from None
            try:
                tenants[tenant] = TenantKeys(str(entry.get("active", "")), keys)
            except InvalidInput as err:
                raise InvalidInput(f"{where}: {err}") from None
        return cls(tenants, source)

    def entry_for(self, tenant: str) -> tuple[str, TenantKeys]:
        """The tenant whose keys wrap ``tenant``'s objects, and those keys."""
        if tenant in self.tenants:
            return tenant, self.tenants[tenant]
        return PLATFORM_TENANT, self.tenants[PLATFORM_TENANT]


# --- whose objects are being written ---------------------------------------------------------
_writing_tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "modelguard_writing_tenant", default=None
)


@contextmanager
def writing_for(tenant: str) -> Iterator[None]:
    """Objects written inside this block are wrapped with ``tenant``'s key (job handlers
    use it: a job carries its tenant; RPCs take the caller's)."""
    token = _writing_tenant.set(tenant or None)
    try:
        yield
    finally:
        _writing_tenant.reset(token)


def current_tenant() -> str:
    """The tenant of the current job, else the authenticated caller, else the platform."""
    tenant = _writing_tenant.get()
    if tenant:
        return tenant
    caller = current_identity()
    return caller.tenant if caller is not None else PLATFORM_TENANT


# --- the cipher --------------------------------------------------------------------------------
def associated_data(name: str, tenant: str) -> bytes:
    """Binds a ciphertext to its object (and to the tenant whose key wraps it)."""
    return b"modelguard-artifact\x00" + name.encode() + b"\x00" + tenant.encode()


@dataclass
class RewrapReport:
    """What `modelguard keys rewrap` did, object by object."""

    rewrapped: int = 0
    current: int = 0
    #: objects without an envelope (written before encryption was on), left as they are
    plaintext: int = 0
    #: ... or encrypted now (``encrypt_plaintext``)
    encrypted: int = 0
    changed: int = 0
    #: object name -> why it could not be rewrapped
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        done = self.rewrapped + self.current + self.plaintext + self.encrypted + self.changed
        return done + len(self.failed)


@runtime_checkable
class KeyRewrapping(Protocol):
    """A store whose objects' data keys can be re-wrapped in place."""

    def rewrap_keys(self, encrypt_plaintext: bool = False) -> RewrapReport: ...


class EnvelopeCipher:
    """Seals and opens objects; errors name the object (``name``: its key in the store)."""

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring

    def seal(
        self, name: str, plaintext: bytes, tenant: str | None = None
    ) -> tuple[bytes, Envelope]:
        owner, keys = self.keyring.entry_for(tenant or current_tenant())
        data_key = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, associated_data(name, owner))
        wrapped = aes_key_wrap(keys.keys[keys.active], data_key)
        return ciphertext, Envelope(owner, keys.active, wrapped, nonce)

    def open(self, name: str, ciphertext: bytes, envelope: Envelope | None) -> bytes:
        if envelope is None:
            raise IntegrityError(
                f"artifact {name} is not encrypted although encryption is on: it was written "
                "before encryption was enabled, changed behind the store's back, or the S3 "
                "server drops user metadata; it will not be used"
            )
        data_key = self._unwrap(name, envelope)
        try:
            return AESGCM(data_key).decrypt(
                envelope.nonce, ciphertext, associated_data(name, envelope.tenant)
            )
        except (InvalidTag, ValueError):
            raise IntegrityError(
                f"artifact {name} failed decryption: its ciphertext or envelope was changed "
                "(or belongs to another object); it will not be used"
            ) from None

    def rewrap(self, name: str, envelope: Envelope) -> Envelope | None:
        """The envelope with its data key wrapped by the tenant's active key; None when it
        already is."""
        keys = self._tenant_keys(name, envelope)
        if envelope.kek_id == keys.active:
            return None
        data_key = self._unwrap(name, envelope)
        wrapped = aes_key_wrap(keys.keys[keys.active], data_key)
        return Envelope(envelope.tenant, keys.active, wrapped, envelope.nonce)

    def _tenant_keys(self, name: str, envelope: Envelope) -> TenantKeys:
        keys = self.keyring.tenants.get(envelope.tenant)
        if keys is None:
            raise IntegrityError(
                f"artifact {name} is wrapped by key {envelope.kek_id!r} of tenant "
                f"{envelope.tenant!r}, which has no keys in {self.keyring.source}"
            )
        return keys

    def _unwrap(self, name: str, envelope: Envelope) -> bytes:
        keys = self._tenant_keys(name, envelope)
        kek = keys.keys.get(envelope.kek_id)
        if kek is None:
            raise IntegrityError(
                f"artifact {name} is wrapped by key {envelope.kek_id!r} of tenant "
                f"{envelope.tenant!r}, which is no longer in {self.keyring.source} (retired "
                "and removed); it cannot be decrypted"
            )
        try:
            return aes_key_unwrap(kek, envelope.wrapped_key)
        except (InvalidUnwrap, ValueError):
            raise IntegrityError(
                f"artifact {name}: key {envelope.kek_id!r} of tenant {envelope.tenant!r} does "
                "not unwrap its data key (a different key under the same id, or a changed "
                "envelope); it will not be used"
            ) from None


def check_plaintext(name: str, data: bytes) -> None:
    """Before a plaintext object is encrypted in place: a blob must still match its digest
    (encrypting a damaged blob would not repair it)."""
    if name.startswith(BLOB_PREFIX) and digest(data) != name.rsplit("/", 1)[-1]:
        raise IntegrityError(f"artifact {name} is corrupted: not encrypted (re-upload it)")


# --- LocalStore's on-disk form ---------------------------------------------------------------
def pack(envelope: Envelope, ciphertext: bytes) -> bytes:
    header = json.dumps(envelope.to_metadata(), sort_keys=True).encode()
    return LOCAL_MAGIC + _LENGTH.pack(len(header)) + header + ciphertext


def unpack(name: str, stored: bytes) -> tuple[Envelope | None, bytes]:
    """The envelope and the ciphertext of a stored file; (None, bytes) when it has none."""
    if not stored.startswith(LOCAL_MAGIC):
        return None, stored
    start = len(LOCAL_MAGIC) + _LENGTH.size
    if len(stored) < start:
        raise IntegrityError(f"artifact {name}: truncated encryption header")
    (length,) = _LENGTH.unpack_from(stored, len(LOCAL_MAGIC))
    try:
        metadata = json.loads(stored[start : start + length])
    except ValueError:
        raise IntegrityError(f"artifact {name}: damaged encryption header") from None
    if not isinstance(metadata, dict):
        raise IntegrityError(f"artifact {name}: damaged encryption header")
    envelope = Envelope.from_metadata({str(k): str(v) for k, v in metadata.items()}, name)
    if envelope is None:
        raise IntegrityError(f"artifact {name}: damaged encryption header")
    return envelope, stored[start + length :]
