"""The orchestrator under faults, with the in-memory bus and a local store whose writes
can be made to fail: an event applied again after a crash writes the same report, a
retried submission whose request never reached the broker is requested again, and a
watch waits through a store outage."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from modelguard.bus.memory import MemoryBus
from modelguard.config import PlatformSettings, PruningOrchestratorSettings
from modelguard.convert import ref_to_proto, spec_to_proto
from modelguard.datasets import Dataset, dataset_to_npz
from modelguard.errors import Unavailable
from modelguard.formats.loader import weights_to_safetensors
from modelguard.metrics import ServiceMetrics
from modelguard.nn.architectures import build
from modelguard.proto.modelguard.v1 import common_pb2, jobs_pb2
from modelguard.runtime import Runtime
from modelguard.services.pruning_orchestrator.service import Orchestrator
from modelguard.services.pruning_orchestrator.state import AUDIT_PREFIX, AuditRecord
from modelguard.signing import Signer
from modelguard.spec import InputSpec
from modelguard.store.local import LocalStore
from modelguard.topics import AUDIT_REQUESTED, AUDIT_STAGES

SPEC = InputSpec((1, 28, 28))


class FlakyStore(LocalStore):
    """A local store whose next audit-record writes, or all reads, fail as if S3 were
    unreachable."""

    fail_record_writes = 0
    down = False

    def put_doc(self, key: str, data: bytes) -> None:
        if self.down or (key.startswith(AUDIT_PREFIX) and self.fail_record_writes):
            self.fail_record_writes = max(0, self.fail_record_writes - 1)
            raise Unavailable("S3 at 127.0.0.1:9000 unreachable")
        super().put_doc(key, data)

    def get_doc(self, key: str) -> bytes:
        if self.down:
            raise Unavailable("S3 at 127.0.0.1:9000 unreachable")
        return super().get_doc(key)


class FlakyBus(MemoryBus):
    down = False

    def publish(self, topic: str, value: bytes, **kwargs: object) -> None:
        if self.down:
            raise Unavailable("Kafka did not acknowledge a record")
        super().publish(topic, value, **kwargs)  # type: ignore[arg-type]


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[tuple[Orchestrator, FlakyStore, FlakyBus]]:
    bus = FlakyBus()
    store = FlakyStore(tmp_path)
    runtime = Runtime(PlatformSettings(store_dir=tmp_path), bus, store, Signer.generate())
    settings = PruningOrchestratorSettings(watch_poll_seconds=0.01)
    metrics = ServiceMetrics(CollectorRegistry(), "pruning-orchestrator")
    yield Orchestrator(runtime, settings, metrics), store, bus
    bus.close()


def _submit(orchestrator: Orchestrator, key: str = "") -> AuditRecord:
    store = orchestrator.runtime.store
    model_ref = store.put_blob(weights_to_safetensors(build("lenet5")))
    data = Dataset(torch.rand(8, 1, 28, 28), torch.arange(8) % 10)
    data_ref = store.put_blob(dataset_to_npz(data))
    model = common_pb2.ModelSpec(
        artifact=ref_to_proto(model_ref), arch="lenet5", input=spec_to_proto(SPEC)
    )
    return orchestrator.submit(
        model, ref_to_proto(data_ref), jobs_pb2.AuditOptions(skip_repair=True), idempotency_key=key
    )


def _done(audit_id: str, stage: str, message: str = "ok") -> jobs_pb2.AuditEvent:
    status = common_pb2.StageStatus(stage=stage, state=common_pb2.STAGE_STATE_DONE, message=message)
    return jobs_pb2.AuditEvent(audit_id=audit_id, stage=status)


def _reports(store: LocalStore) -> int:
    blobs = [p for p in Path(store.root).rglob("*") if p.is_file() and "blobs" in p.parts]
    return sum(1 for p in blobs if b'"finished_at"' in p.read_bytes())


def test_the_final_event_applied_again_after_a_crash_writes_the_same_report(
    world: tuple[Orchestrator, FlakyStore, FlakyBus],
) -> None:
    """The record write fails after the report was written (a crash there, or S3 going
    away): the redelivered event must not leave a second, different report behind (it
    did: the report held the time of each attempt)."""
    orchestrator, store, _bus = world
    audit_id = _submit(orchestrator).audit_id
    stages = [s for s in AUDIT_STAGES if s != "repair"]
    for stage in stages[:-1]:
        orchestrator.apply_event(_done(audit_id, stage), at=1000.0)
    last = _done(audit_id, stages[-1])
    store.fail_record_writes = 1
    with pytest.raises(Unavailable):
        orchestrator.apply_event(last, at=2000.0)
    assert orchestrator.get(audit_id).state != "succeeded"
    orchestrator.apply_event(last, at=2000.0)  # the redelivery: same record timestamp
    record = orchestrator.get(audit_id)
    assert record.state == "succeeded"
    assert _reports(store) == 1
    signatures = store.list_docs("signatures/")
    assert len(signatures) == 2  # the JSON and the HTML report, once each


def test_a_retried_submission_whose_request_was_lost_is_requested_again(
    world: tuple[Orchestrator, FlakyStore, FlakyBus],
) -> None:
    orchestrator, _store, bus = world
    bus.down = True
    with pytest.raises(Unavailable):
        _submit(orchestrator, key="client-key-1")  # record stored, request not published
    bus.down = False
    record = _submit(orchestrator, key="client-key-1")  # the client's retry
    [message] = bus.records(AUDIT_REQUESTED)
    assert jobs_pb2.AuditRequested.FromString(message.value).audit_id == record.audit_id
    # once a stage has reported, a retry returns the audit without asking again
    orchestrator.apply_event(_done(record.audit_id, "leak-detector"))
    assert _submit(orchestrator, key="client-key-1").audit_id == record.audit_id
    assert len(bus.records(AUDIT_REQUESTED)) == 1


def test_watch_waits_through_a_store_outage(
    world: tuple[Orchestrator, FlakyStore, FlakyBus],
) -> None:
    orchestrator, store, _bus = world
    audit_id = _submit(orchestrator).audit_id
    seen: list[str] = []
    outage = threading.Event()

    def active() -> bool:
        return len(seen) < 10

    def follow() -> None:
        for record in orchestrator.watch(audit_id, active):
            seen.append(record.state)
            if len(seen) == 1:
                store.down = True  # the store goes away under the open stream
                outage.set()

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()
    assert outage.wait(10)
    store.down = False
    for stage in ("leak-detector", "trigger-reversal", "neuron-scoring"):
        orchestrator.apply_event(_done(audit_id, stage))
    watcher.join(10)
    assert not watcher.is_alive()
    assert seen[0] == "queued" and seen[-1] == "succeeded"
