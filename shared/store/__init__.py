"""The artifact store (see `modelguard.store.base`): pick an implementation by setting."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from modelguard.errors import InvalidInput
from modelguard.store.base import ArtifactRef, ArtifactStore, blob_key, digest
from modelguard.store.encryption import EnvelopeCipher, KeyRewrapping, Keyring, RewrapReport
from modelguard.store.local import LocalStore

__all__ = [
    "ArtifactRef",
    "ArtifactStore",
    "LocalStore",
    "blob_key",
    "digest",
    "make_store",
    "rewrap_keys",
]


def make_store(
    kind: str,
    *,
    root: Path | str | None = None,
    endpoint: str = "",
    access_key: str = "",
    secret_key: str = "",
    bucket: str = "modelguard",
    secure: bool = False,
    region: str = "us-east-1",
    keyring_file: Path | str = "",
    credentials: Literal["static", "aws-chain"] = "static",
    **s3_options: Any,
) -> ArtifactStore:
    """``"local"`` needs ``root``; ``"s3"`` needs ``endpoint`` and, with ``credentials``
    ``"static"``, the keys (``"aws-chain"``: the AWS SDKs' chain, see
    `modelguard.store.s3.aws_credential_chain`; ``s3_options`` go to `S3Store`, e.g.
    timeouts). ``keyring_file`` given: every object is encrypted (see
    `modelguard.store.encryption`)."""
    cipher = EnvelopeCipher(Keyring.load(keyring_file)) if keyring_file else None
    if kind == "local":
        if root is None:
            raise InvalidInput("the local artifact store needs a root directory")
        return LocalStore(Path(root), cipher)
    if kind == "s3":
        if not endpoint:
            raise InvalidInput("the S3 artifact store needs an endpoint (host:port)")
        from modelguard.store.s3 import S3Store, aws_credential_chain  # minio loads when used

        if credentials == "aws-chain":
            s3_options["credentials"] = aws_credential_chain()
        elif credentials != "static":
            raise InvalidInput(f"unknown S3 credentials {credentials!r}: use static or aws-chain")
        return S3Store(
            endpoint, access_key, secret_key, bucket, secure, region, cipher=cipher, **s3_options
        )
    raise InvalidInput(f"unknown store kind {kind!r}: use 'local' or 's3'")


def rewrap_keys(store: ArtifactStore, encrypt_plaintext: bool = False) -> RewrapReport:
    """Re-wrap every stored data key under its tenant's active key-encryption key (and
    with ``encrypt_plaintext`` encrypt objects written before encryption was on)."""
    if not isinstance(store, KeyRewrapping):
        raise InvalidInput(f"{type(store).__name__} does not hold encrypted objects")
    return store.rewrap_keys(encrypt_plaintext)
