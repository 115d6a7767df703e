"""An audit's record, kept as a JSON document in the artifact store so that a restarted
(or another) orchestrator replica continues where the last one stopped."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from modelguard.errors import InvalidInput, NotFound
from modelguard.store.base import ArtifactStore
from modelguard.topics import AUDIT_STAGES

AUDIT_PREFIX = "audits/"
IDEMPOTENCY_PREFIX = "idempotency/"
OWNERS_PREFIX = "owners/"

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
FINAL_JOB_STATES = (SUCCEEDED, FAILED)
# stage states
NOT_RUN, PENDING, STAGE_RUNNING, DONE, STAGE_FAILED, SKIPPED = (
    "not_run",
    "pending",
    "running",
    "done",
    "failed",
    "skipped",
)
FINAL_STAGE_STATES = (NOT_RUN, DONE, STAGE_FAILED, SKIPPED)


@dataclass
class ArtifactRecord:
    sha256: str
    key: str
    size: int
    media_type: str
    signature: str = ""


@dataclass
class StageRecord:
    name: str
    state: str = PENDING
    progress: float = 0.0
    message: str = ""
    error_code: str = ""
    error: str = ""
    result: ArtifactRecord | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    updated_at: float = 0.0

    @property
    def final(self) -> bool:
        return self.state in FINAL_STAGE_STATES


@dataclass
class AuditRecord:
    audit_id: str
    model: dict[str, Any]  # ModelSpec as JSON (protobuf json_format)
    data: dict[str, Any]
    options: dict[str, Any]
    tenant: str = ""
    state: str = QUEUED
    stages: dict[str, StageRecord] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    report_json: ArtifactRecord | None = None
    report_html: ArtifactRecord | None = None
    repaired_model: ArtifactRecord | None = None
    error: str = ""
    version: int = 0

    @property
    def final(self) -> bool:
        return self.state in FINAL_JOB_STATES

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> AuditRecord:
        raw = json.loads(data)
        stages = {}
        for name, stage in raw.pop("stages").items():
            result = stage.pop("result")
            stages[name] = StageRecord(**stage, result=ArtifactRecord(**result) if result else None)
        artifacts = {
            key: ArtifactRecord(**raw[key]) if raw.get(key) else None
            for key in ("report_json", "report_html", "repaired_model")
        }
        raw.update(artifacts)
        return cls(**raw, stages=stages)

    @classmethod
    def new(
        cls,
        audit_id: str,
        model: dict[str, Any],
        data: dict[str, Any],
        options: dict[str, Any],
        tenant: str = "",
        stages: tuple[str, ...] = AUDIT_STAGES,
    ) -> AuditRecord:
        return cls(
            audit_id=audit_id,
            model=model,
            data=data,
            options=options,
            tenant=tenant,
            stages={name: StageRecord(name=name) for name in stages},
        )


def _validate_id(audit_id: str) -> str:
    if not audit_id or not all(c.isalnum() or c in "-_" for c in audit_id) or len(audit_id) > 64:
        raise InvalidInput(f"audit id {audit_id!r} is not valid")
    return audit_id


class AuditRepository:
    """Reads and writes audit records; one lock per audit serialises this process's
    updates (across replicas, Kafka's per-key partitioning routes an audit's events to
    one consumer)."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._changed = threading.Condition()

    def lock(self, audit_id: str) -> threading.Lock:
        return self._locks[audit_id]

    def get(self, audit_id: str) -> AuditRecord:
        try:
            return AuditRecord.from_json(self.store.get_doc(AUDIT_PREFIX + _validate_id(audit_id)))
        except NotFound:
            raise NotFound(f"no audit {audit_id!r}") from None

    def put(self, record: AuditRecord) -> None:
        record.version += 1
        record.updated_at = time.time()
        self.store.put_doc(AUDIT_PREFIX + record.audit_id, record.to_json())
        with self._changed:
            self._changed.notify_all()

    def list(self, limit: int = 50) -> list[AuditRecord]:
        keys = self.store.list_docs(AUDIT_PREFIX)
        records = [self.get(key[len(AUDIT_PREFIX) :]) for key in keys]
        records.sort(key=lambda r: r.created_at, reverse=True)
        return records[:limit]

    def wait_for_change(self, timeout: float) -> None:
        with self._changed:
            self._changed.wait(timeout)

    def find_idempotent(self, key_hash: str) -> str | None:
        try:
            return self.store.get_doc(IDEMPOTENCY_PREFIX + key_hash).decode()
        except NotFound:
            return None

    def remember_idempotent(self, key_hash: str, audit_id: str) -> None:
        self.store.put_doc(IDEMPOTENCY_PREFIX + key_hash, audit_id.encode())


class ArtifactOwners:
    """Which tenants may use a content-addressed artifact: those who uploaded its bytes and
    those whose audit produced it. One empty document per (sha256, tenant): granting is an
    idempotent write with no read-modify-write, so replicas cannot lose a grant."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    def grant(self, sha256: str, tenant: str) -> None:
        self.store.put_doc(f"{OWNERS_PREFIX}{sha256}/{tenant}", b"")

    def owns(self, sha256: str, tenant: str) -> bool:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            return False
        try:
            self.store.get_doc(f"{OWNERS_PREFIX}{sha256}/{tenant}")
        except NotFound:
            return False
        return True


def artifact_digests(value: Any) -> set[str]:
    """The sha256 of every artifact reference (a dict with ``sha256``) inside ``value``, a
    record's JSON: stage results, summaries (trigger images, repaired model), reports."""
    found: set[str] = set()
    if isinstance(value, dict):
        digest = value.get("sha256")
        if isinstance(digest, str) and len(digest) == 64:
            found.add(digest)
        for item in value.values():
            found |= artifact_digests(item)
    elif isinstance(value, list):
        for item in value:
            found |= artifact_digests(item)
    return found
