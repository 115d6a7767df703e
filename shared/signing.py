"""Integrity of what ModelGuard hands out: reports, repaired models, carriers
and mappers are signed with HMAC-SHA256 over their sha256 digest. Content addressing
already refuses bytes that changed under their key; the signature also refuses a record
that was pointed at other bytes, or bytes ModelGuard never produced."""

from __future__ import annotations

import hashlib
import hmac

from modelguard.errors import IntegrityError


class Signer:
    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("signing key must be at least 16 bytes")
        self._key = key

    def sign(self, sha256_hex: str) -> str:
        return hmac.new(self._key, sha256_hex.encode(), hashlib.sha256).hexdigest()

    def verify(self, sha256_hex: str, signature: str, what: str = "artifact") -> None:
        if not hmac.compare_digest(self.sign(sha256_hex), signature or ""):
            raise IntegrityError(
                f"{what} {sha256_hex[:16]}… has an invalid signature: it was not produced by "
                "this ModelGuard deployment or was modified; refused"
            )
