"""An `ArtifactStore` proxy that counts failed operations by kind (unreachable store,
integrity violation) on the service's metrics; the alert rules watch the counter."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from prometheus_client import Counter

from modelguard.errors import IntegrityError, Unavailable
from modelguard.store.base import ArtifactRef, ArtifactStore

T = TypeVar("T")


class InstrumentedStore:
    def __init__(self, inner: ArtifactStore, errors: Counter) -> None:
        self.inner = inner
        self.errors = errors

    def _count(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except Unavailable:
            self.errors.labels("unavailable").inc()
            raise
        except IntegrityError:
            self.errors.labels("integrity").inc()
            raise

    def put_blob(self, data: bytes, media_type: str = "application/octet-stream") -> ArtifactRef:
        return self._count(lambda: self.inner.put_blob(data, media_type))

    def get_blob(self, ref: ArtifactRef | str) -> bytes:
        return self._count(lambda: self.inner.get_blob(ref))

    def has_blob(self, sha256_hex: str) -> bool:
        return self._count(lambda: self.inner.has_blob(sha256_hex))

    def put_doc(self, key: str, data: bytes) -> None:
        self._count(lambda: self.inner.put_doc(key, data))

    def get_doc(self, key: str) -> bytes:
        return self._count(lambda: self.inner.get_doc(key))

    def list_docs(self, prefix: str) -> list[str]:
        return self._count(lambda: self.inner.list_docs(prefix))

    def delete_doc(self, key: str) -> None:
        self._count(lambda: self.inner.delete_doc(key))

    def ping(self) -> None:
        self._count(self.inner.ping)
