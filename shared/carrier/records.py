"""A user's carrier record in the artifact store: current generation, credential hash,
state, and the artifacts of the ready carrier. Owned by carrier-trainer; result-mapper
only reads it (to reload an evicted mapper)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from modelguard.errors import InvalidInput, NotFound
from modelguard.store.base import ArtifactStore

CARRIER_PREFIX = "carriers/"
QUEUED, TRAINING, READY, FAILED, REVOKED = "queued", "training", "ready", "failed", "revoked"


@dataclass
class CarrierRecord:
    user_id: str
    generation: int
    credential_hash: str
    state: str = QUEUED
    options: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> ref dict
    signatures: dict[str, str] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    revoked_reason: str = ""
    updated_at: float = field(default_factory=time.time)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> CarrierRecord:
        return cls(**json.loads(data))


def check_user_id(user_id: str) -> str:
    if not user_id or len(user_id) > 128 or not all(c.isalnum() or c in "-_.@" for c in user_id):
        raise InvalidInput(
            f"user id {user_id!r} is not valid: 1-128 characters of letters, digits, -_.@"
        )
    return user_id


class CarrierRepository:
    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    def get(self, user_id: str) -> CarrierRecord:
        try:
            return CarrierRecord.from_json(
                self.store.get_doc(CARRIER_PREFIX + check_user_id(user_id))
            )
        except NotFound:
            raise NotFound(f"no carrier for user {user_id!r}: enrol first") from None

    def find(self, user_id: str) -> CarrierRecord | None:
        try:
            return self.get(user_id)
        except NotFound:
            return None

    def put(self, record: CarrierRecord) -> None:
        record.updated_at = time.time()
        self.store.put_doc(CARRIER_PREFIX + check_user_id(record.user_id), record.to_json())
