"""The artifact store: content-addressed blobs (sha256, verified on every read) plus
named documents (mutable JSON state such as an audit's record).

Two implementations share these semantics and one test suite:
`modelguard.store.local.LocalStore` (a directory) and `modelguard.store.s3.S3Store` (MinIO SDK).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from modelguard.errors import InvalidInput, ResourceExhausted

BLOB_PREFIX = "blobs/sha256/"


@dataclass(frozen=True)
class ArtifactRef:
    sha256: str
    key: str
    size: int
    media_type: str = "application/octet-stream"


def blob_key(sha256_hex: str) -> str:
    return f"{BLOB_PREFIX}{sha256_hex[:2]}/{sha256_hex}"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def join_upload(chunks: Iterable[tuple[bytes, str]], max_bytes: int) -> tuple[bytes, str]:
    """A client-streamed upload as one artifact: its bytes and media type (named on the
    first chunk). Refused as soon as it passes ``max_bytes``, before the rest is read."""
    parts: list[bytes] = []
    size = 0
    media_type = "application/octet-stream"
    for index, (data, chunk_media_type) in enumerate(chunks):
        if index == 0 and chunk_media_type:
            media_type = chunk_media_type
        size += len(data)
        if size > max_bytes:
            raise ResourceExhausted(f"upload exceeds {max_bytes} bytes; refused")
        parts.append(data)
    if size == 0:
        raise InvalidInput("empty upload")
    return b"".join(parts), media_type


class ArtifactStore(Protocol):
    def put_blob(self, data: bytes, media_type: str = "application/octet-stream") -> ArtifactRef:
        """Store bytes under their digest; idempotent (same bytes, same ref, one object)."""
        ...

    def get_blob(self, ref: ArtifactRef | str) -> bytes:
        """Return the bytes; raise IntegrityError when they no longer match the digest,
        NotFound when absent. ``ref`` may be an ArtifactRef or a sha256 hex digest."""
        ...

    def has_blob(self, sha256_hex: str) -> bool: ...

    def put_doc(self, key: str, data: bytes) -> None:
        """Write (or overwrite) a named document atomically."""
        ...

    def get_doc(self, key: str) -> bytes:
        """Raise NotFound when absent."""
        ...

    def list_docs(self, prefix: str) -> list[str]:
        """Keys of named documents under ``prefix``, sorted."""
        ...

    def delete_doc(self, key: str) -> None: ...

    def ping(self) -> None:
        """Raise Unavailable when the store cannot be reached."""
        ...
