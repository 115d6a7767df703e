"""The audit state machine through the in-memory bus and a local store (no workers: the
tests play the stages' part by publishing their events)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from modelguard.bus.memory import MemoryBus
from modelguard.config import PlatformSettings, PruningOrchestratorSettings
from modelguard.convert import ref_to_proto, spec_to_proto
from modelguard.datasets import Dataset, dataset_to_npz
from modelguard.errors import IntegrityError, InvalidInput, NotFound
from modelguard.formats.loader import weights_to_safetensors
from modelguard.metrics import ServiceMetrics
from modelguard.nn.architectures import build
from modelguard.proto.modelguard.v1 import common_pb2, jobs_pb2
from modelguard.runtime import Runtime
from modelguard.services.pruning_orchestrator.service import Orchestrator
from modelguard.services.pruning_orchestrator.state import AuditRecord
from modelguard.signing import Signer
from modelguard.spec import InputSpec
from modelguard.store.local import LocalStore
from modelguard.topics import AUDIT_REQUESTED

SPEC = InputSpec((1, 28, 28))


@pytest.fixture()
def orchestrator(tmp_path: Path) -> Iterator[Orchestrator]:
    bus = MemoryBus()
    runtime = Runtime(
        PlatformSettings(store_dir=tmp_path),
        bus,
        LocalStore(tmp_path),
        Signer.generate(),
    )
    yield Orchestrator(
        runtime,
        PruningOrchestratorSettings(),
        ServiceMetrics(CollectorRegistry(), "pruning-orchestrator"),
    )
    bus.close()


def _submit(orchestrator: Orchestrator, **options: object) -> AuditRecord:
    import torch

    store = orchestrator.runtime.store
    model_ref = store.put_blob(weights_to_safetensors(build("lenet5")))
    data = Dataset(torch.rand(20, 1, 28, 28), torch.arange(20) % 10)
    data_ref = store.put_blob(dataset_to_npz(data))
    model = common_pb2.ModelSpec(
        artifact=ref_to_proto(model_ref), arch="lenet5", input=spec_to_proto(SPEC)
    )
    return orchestrator.submit(model, ref_to_proto(data_ref), jobs_pb2.AuditOptions(**options))  # type: ignore[arg-type]


def _event(
    orchestrator: Orchestrator,
    audit_id: str,
    stage: str,
    state: int,
    summary: dict[str, object] | None = None,
    error: str = "",
) -> None:
    status = common_pb2.StageStatus(
        stage=stage,
        state=state,  # type: ignore[arg-type]
        summary_json=json.dumps(summary) if summary else "",
    )
    if error:
        status.error.CopyFrom(common_pb2.ErrorDetail(code="INVALID_ARGUMENT", message=error))
    orchestrator.apply_event(jobs_pb2.AuditEvent(audit_id=audit_id, stage=status))


def test_submit_stores_state_and_publishes_a_reference_only_request(
    orchestrator: Orchestrator,
) -> None:
    record = _submit(orchestrator)
    assert orchestrator.get(record.audit_id).state == "queued"
    bus = orchestrator.runtime.bus
    assert isinstance(bus, MemoryBus)
    [message] = bus.records(AUDIT_REQUESTED)
    request = jobs_pb2.AuditRequested.FromString(message.value)
    assert request.audit_id == record.audit_id
    assert len(message.value) < 2000  # references, never model bytes
    assert request.model.input.num_classes == 10  # filled in from the model


def test_bad_submissions_fail_at_once_with_reasons(orchestrator: Orchestrator) -> None:
    store = orchestrator.runtime.store
    model_ref = ref_to_proto(store.put_blob(weights_to_safetensors(build("lenet5"))))
    data_ref = ref_to_proto(store.put_blob(b"garbage"))
    with pytest.raises(InvalidInput, match="input spec is missing"):
        orchestrator.submit(
            common_pb2.ModelSpec(artifact=model_ref, arch="lenet5"),
            data_ref,
            jobs_pb2.AuditOptions(),
        )
    model = common_pb2.ModelSpec(artifact=model_ref, arch="lenet5", input=spec_to_proto(SPEC))
    with pytest.raises(InvalidInput, match="npz"):
        orchestrator.submit(model, data_ref, jobs_pb2.AuditOptions())
    with pytest.raises(InvalidInput, match="repair mode"):
        orchestrator.submit(model, data_ref, jobs_pb2.AuditOptions(repair_mode="magic"))
    missing = common_pb2.ArtifactRef(sha256="0" * 64)
    with pytest.raises(NotFound):
        orchestrator.submit(
            common_pb2.ModelSpec(artifact=missing, arch="lenet5", input=spec_to_proto(SPEC)),
            data_ref,
            jobs_pb2.AuditOptions(),
        )


def test_a_layer_the_model_does_not_have_is_refused_at_submission(
    orchestrator: Orchestrator,
) -> None:
    # refused before anything is queued, whatever the detection will say: on a model found
    # clean the repair stage (the only one that reads the layer) would never run
    with pytest.raises(InvalidInput, match=r"'fc_1' is not a prunable .*did you mean fc1"):
        _submit(orchestrator, layer="fc_1")
    bus = orchestrator.runtime.bus
    assert isinstance(bus, MemoryBus)
    assert bus.records(AUDIT_REQUESTED) == []
    assert orchestrator.list() == []
    for layer in ("fc1", "fc1:in", "conv2"):
        assert _submit(orchestrator, layer=layer).options["layer"] == layer


def test_idempotency_key_returns_the_same_audit(orchestrator: Orchestrator) -> None:
    store = orchestrator.runtime.store
    import torch

    model = common_pb2.ModelSpec(
        artifact=ref_to_proto(store.put_blob(weights_to_safetensors(build("lenet5")))),
        arch="lenet5",
        input=spec_to_proto(SPEC),
    )
    data = ref_to_proto(
        store.put_blob(dataset_to_npz(Dataset(torch.rand(4, 1, 28, 28), torch.arange(4))))
    )
    first = orchestrator.submit(model, data, jobs_pb2.AuditOptions(), idempotency_key="k1")
    second = orchestrator.submit(model, data, jobs_pb2.AuditOptions(), idempotency_key="k1")
    assert first.audit_id == second.audit_id
    assert len(orchestrator.list()) == 1


def test_stage_events_drive_the_audit_to_a_signed_report(orchestrator: Orchestrator) -> None:
    record = _submit(orchestrator)
    audit_id = record.audit_id
    done, running = common_pb2.STAGE_STATE_DONE, common_pb2.STAGE_STATE_RUNNING
    _event(orchestrator, audit_id, "leak-detector", running)
    assert orchestrator.get(audit_id).state == "running"
    _event(
        orchestrator,
        audit_id,
        "leak-detector",
        done,
        {"verdict": "benign", "layers": [{"layer": "fc1.weight", "count": 48000}]},
    )
    _event(
        orchestrator,
        audit_id,
        "trigger-reversal",
        done,
        {
            "verdict": "infected",
            "flagged": [7],
            "labels": [{"label": 7, "l1_norm": 3.0, "anomaly_index": 4.2}],
        },
    )
    _event(orchestrator, audit_id, "neuron-scoring", done, {"layer": "fc1"})
    assert not orchestrator.get(audit_id).final
    _event(
        orchestrator,
        audit_id,
        "repair",
        done,
        {"before": {"reversed_asr": 0.99}, "after": {"reversed_asr": 0.02}},
    )
    final = orchestrator.get(audit_id)
    assert final.state == "succeeded"
    assert final.report_json is not None and final.report_html is not None
    report = json.loads(orchestrator.download(_ref(final.report_json)))
    assert report["verdicts"] == {
        "leak-detector": "benign",
        "trigger-reversal": "infected",
        "robustness": "skipped",  # no ε asked for: final from the start
        "neuron-scoring": "done",
        "repair": "done",
    }
    html = orchestrator.download(_ref(final.report_html)).decode()
    assert "fc1.weight" in html and "infected" in html and "<script" not in html


def test_duplicate_and_late_events_are_ignored(orchestrator: Orchestrator) -> None:
    audit_id = _submit(orchestrator).audit_id
    _event(
        orchestrator, audit_id, "leak-detector", common_pb2.STAGE_STATE_DONE, {"verdict": "benign"}
    )
    # a redelivered job reports again with another outcome: the first one stands
    _event(orchestrator, audit_id, "leak-detector", common_pb2.STAGE_STATE_FAILED, error="x")
    _event(orchestrator, audit_id, "leak-detector", common_pb2.STAGE_STATE_RUNNING)
    stage = orchestrator.get(audit_id).stages["leak-detector"]
    assert stage.state == "done" and stage.summary == {"verdict": "benign"}
    assert orchestrator.metrics.job_count("duplicate") == 2


def test_a_failed_stage_skips_its_followers_and_fails_the_audit(
    orchestrator: Orchestrator,
) -> None:
    audit_id = _submit(orchestrator).audit_id
    _event(
        orchestrator,
        audit_id,
        "trigger-reversal",
        common_pb2.STAGE_STATE_FAILED,
        error="model returns NaN",
    )
    record = orchestrator.get(audit_id)
    assert record.stages["neuron-scoring"].state == "skipped"
    assert record.stages["repair"].state == "skipped"
    _event(orchestrator, audit_id, "leak-detector", common_pb2.STAGE_STATE_DONE)
    record = orchestrator.get(audit_id)
    assert record.state == "failed" and "NaN" in record.error
    assert record.report_json is not None  # a failed audit still gets its report


def test_skip_repair_option(orchestrator: Orchestrator) -> None:
    record = _submit(orchestrator, skip_repair=True)
    assert record.stages["repair"].state == "skipped"


def test_events_for_unknown_audits_are_bad_input(orchestrator: Orchestrator) -> None:
    with pytest.raises(InvalidInput):
        _event(orchestrator, "nope", "repair", common_pb2.STAGE_STATE_DONE)
    audit_id = _submit(orchestrator).audit_id
    with pytest.raises(InvalidInput, match="stage"):
        _event(orchestrator, audit_id, "astrology", common_pb2.STAGE_STATE_DONE)


def test_state_survives_a_new_orchestrator_on_the_same_store(
    orchestrator: Orchestrator,
) -> None:
    audit_id = _submit(orchestrator).audit_id
    _event(orchestrator, audit_id, "leak-detector", common_pb2.STAGE_STATE_DONE)
    restarted = Orchestrator(
        orchestrator.runtime,
        orchestrator.settings,
        ServiceMetrics(CollectorRegistry(), "pruning-orchestrator"),
    )
    assert restarted.get(audit_id).stages["leak-detector"].state == "done"
    assert restarted.resume_unfinished() == 1


def test_watch_streams_changes_until_final(orchestrator: Orchestrator) -> None:
    audit_id = _submit(orchestrator, skip_repair=True).audit_id
    seen: list[str] = []
    finished = threading.Event()

    def watcher() -> None:
        for record in orchestrator.watch(audit_id, lambda: True):
            seen.append(record.state)
        finished.set()

    thread = threading.Thread(target=watcher)
    thread.start()
    for stage in ("leak-detector", "trigger-reversal", "neuron-scoring"):
        _event(orchestrator, audit_id, stage, common_pb2.STAGE_STATE_DONE)
    assert finished.wait(10)
    thread.join()
    assert seen[0] == "queued" and seen[-1] == "succeeded"


def test_tampered_report_is_refused(orchestrator: Orchestrator, tmp_path: Path) -> None:
    audit_id = _submit(orchestrator, skip_repair=True).audit_id
    for stage in ("leak-detector", "trigger-reversal", "neuron-scoring"):
        _event(orchestrator, audit_id, stage, common_pb2.STAGE_STATE_DONE)
    report = orchestrator.get(audit_id).report_json
    assert report is not None
    orchestrator.runtime.store.put_doc(f"signatures/{report.sha256}", b"forged")
    with pytest.raises(IntegrityError, match="signature"):
        orchestrator.download(_ref(report))


def _ref(record: object) -> object:
    from modelguard.services.pruning_orchestrator.service import ref_of

    return ref_of(record)  # type: ignore[arg-type]
