"""The robustness stage of an audit, through the in-memory bus and a local store: the
orchestrator accepts the audit, trigger-reversal's robustness worker (as its `build`
wires it: its own consumer group) attacks a tiny model and reports progress and its
summary, which the orchestrator records and puts in the report. An audit without ε
leaves the stage not run; bad options are refused at submission; a failure inside the
stage is recorded with its reason."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from modelguard.bus.memory import MemoryBus
from modelguard.config import PlatformSettings, PruningOrchestratorSettings, TriggerReversalSettings
from modelguard.convert import ref_to_proto, spec_to_proto
from modelguard.datasets import Dataset, dataset_to_npz
from modelguard.errors import InvalidInput
from modelguard.metrics import ServiceMetrics
from modelguard.proto.modelguard.v1 import common_pb2, jobs_pb2
from modelguard.robustness import (
    FRAGILE,
    MASKED_GRADIENTS,
    ROBUST,
    ROBUST_ACCURACY_FLOOR,
    evaluate_robustness,
)
from modelguard.runtime import Runtime
from modelguard.services.pruning_orchestrator.handler import EventsHandler
from modelguard.services.pruning_orchestrator.service import Orchestrator
from modelguard.services.pruning_orchestrator.state import AuditRecord
from modelguard.services.trigger_reversal import service as service_module
from modelguard.services.trigger_reversal.main import build
from modelguard.services.trigger_reversal.service import RobustnessStage
from modelguard.signing import Signer
from modelguard.spec import InputSpec
from modelguard.store.local import LocalStore
from modelguard.topics import (
    AUDIT_EVENTS,
    AUDIT_REQUESTED,
    STAGE_LEAK_DETECTOR,
    STAGE_ROBUSTNESS,
    STAGE_TRIGGER_REVERSAL,
)

SPEC = InputSpec(shape=(1, 6, 6))
ROBUSTNESS_GROUP = "trigger-reversal-robustness"
WAIT_SECONDS = 120.0


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).eval()


def tiny_data(n: int = 24) -> Dataset:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 6, 6, generator=generator)
    with torch.no_grad():  # the model's own labels: every image starts correct
        y = tiny_model()(x).argmax(1)
    return Dataset(x, y)


@dataclass
class World:
    orchestrator: Orchestrator
    stage: RobustnessStage
    bus: MemoryBus


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    bus = MemoryBus()
    # one attempt: a failure is reported at once instead of after the bus's retries
    runtime = Runtime(
        PlatformSettings(store_dir=tmp_path, job_max_attempts=1),
        bus,
        LocalStore(tmp_path),
        Signer.generate(),
    )
    orchestrator = Orchestrator(
        runtime,
        PruningOrchestratorSettings(),
        ServiceMetrics(CollectorRegistry(), "pruning-orchestrator"),
    )
    app = build(
        TriggerReversalSettings(robustness_images=24, robustness_time_budget_seconds=60.0),
        runtime,
        ServiceMetrics(CollectorRegistry(), "trigger-reversal"),
    )
    # the robustness worker exactly as the service wires it (the reversal's is not run here)
    [worker] = [w for w in app.workers if w.group == ROBUSTNESS_GROUP]
    assert worker.topics == [AUDIT_REQUESTED]
    subscriptions = [
        bus.subscribe(worker.topics, worker.group, worker.handler),
        bus.subscribe([AUDIT_EVENTS], "pruning-orchestrator-events", EventsHandler(orchestrator)),
    ]
    yield World(orchestrator, app.components["robustness"], bus)
    for subscription in subscriptions:
        subscription.stop()
    bus.close()


def _submit(orchestrator: Orchestrator, **options: object) -> AuditRecord:
    store = orchestrator.runtime.store
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(tiny_model()), buffer)
    model = common_pb2.ModelSpec(
        artifact=ref_to_proto(store.put_blob(buffer.getvalue())), input=spec_to_proto(SPEC)
    )
    data = ref_to_proto(store.put_blob(dataset_to_npz(tiny_data())))
    return orchestrator.submit(model, data, jobs_pb2.AuditOptions(**options))  # type: ignore[arg-type]


def _wait(condition: object, orchestrator: Orchestrator) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        orchestrator.repository.wait_for_change(0.2)


def _stage_final(orchestrator: Orchestrator, audit_id: str) -> AuditRecord:
    _wait(lambda: orchestrator.get(audit_id).stages[STAGE_ROBUSTNESS].final, orchestrator)
    return orchestrator.get(audit_id)


def _finish_other_stages(orchestrator: Orchestrator, audit_id: str) -> AuditRecord:
    """Play the other stages' part: leak detector and reversal skipped (the reversal's
    skip skips the stages after it)."""
    for stage in (STAGE_LEAK_DETECTOR, STAGE_TRIGGER_REVERSAL):
        status = common_pb2.StageStatus(stage=stage, state=common_pb2.STAGE_STATE_SKIPPED)
        orchestrator.apply_event(jobs_pb2.AuditEvent(audit_id=audit_id, stage=status))
    record = orchestrator.get(audit_id)
    assert record.final
    return record


def _robustness_events(bus: MemoryBus, audit_id: str) -> list[common_pb2.StageStatus]:
    events = (jobs_pb2.AuditEvent.FromString(m.value) for m in bus.records(AUDIT_EVENTS))
    return [e.stage for e in events if e.audit_id == audit_id and e.stage.stage == STAGE_ROBUSTNESS]


def test_the_stage_runs_through_the_bus_and_its_summary_reaches_the_report(world: World) -> None:
    orchestrator = world.orchestrator
    audit_id = _submit(
        orchestrator, robustness_eps=[0.3, 0.02], robustness_steps=3, seed=5
    ).audit_id
    record = _stage_final(orchestrator, audit_id)
    stage = record.stages[STAGE_ROBUSTNESS]
    assert stage.state == "done", stage.error
    summary = stage.summary
    # the library's result as the stage's summary: the same figures as a direct run
    config = world.stage.config([0.02, 0.3], steps=3, seed=5)
    direct = evaluate_robustness(tiny_model(), tiny_data(), SPEC, config).to_dict()
    for key in ("eps", "norm", "steps", "images", "clean_accuracy", "points", "masking"):
        assert summary[key] == direct[key], key
    assert summary["eps"] == [0.02, 0.3] and summary["clean_accuracy"] == 1.0
    largest = summary["points"][-1]["robust_accuracy"]
    expected = (
        MASKED_GRADIENTS
        if summary["masking"]["flagged"]
        else ROBUST
        if largest >= ROBUST_ACCURACY_FLOOR
        else FRAGILE
    )
    assert summary["verdict"] == expected
    assert stage.message.startswith(f"verdict {expected}; robust accuracy ")
    # the stored summary is the recorded one
    assert stage.result is not None
    stored = orchestrator.runtime.store.get_blob(stage.result.sha256)
    assert json.loads(stored) == summary
    # progress while it ran: RUNNING events of this stage with a growing fraction
    running = [
        e.progress
        for e in _robustness_events(world.bus, audit_id)
        if e.state == common_pb2.STAGE_STATE_RUNNING
    ]
    assert running[0] == 0.0 and max(running) > 0.0
    # the finished audit's report has the stage's section with its chart
    record = _finish_other_stages(orchestrator, audit_id)
    assert record.state == "succeeded"
    assert record.report_html is not None and record.report_json is not None
    page = orchestrator.runtime.store.get_blob(record.report_html.sha256).decode()
    assert 'id="stage-robustness"' in page
    assert 'alt="Accuracy against ε under untargeted fgsm, pgd, pgd-strong' in page
    report = json.loads(orchestrator.runtime.store.get_blob(record.report_json.sha256))
    assert report["verdicts"][STAGE_ROBUSTNESS] == expected


def test_an_audit_without_eps_does_not_run_the_stage(world: World) -> None:
    orchestrator = world.orchestrator
    record = _submit(orchestrator)
    stage = record.stages[STAGE_ROBUSTNESS]
    assert (stage.state, stage.message) == ("skipped", "robustness not requested (no ε given)")
    # the worker reads the request and lets it go without a word
    _wait(
        lambda: (
            world.bus.committed_offset(ROBUSTNESS_GROUP, AUDIT_REQUESTED)
            == world.bus.end_offset(AUDIT_REQUESTED)
        ),
        orchestrator,
    )
    assert _robustness_events(world.bus, record.audit_id) == []
    # and the audit finishes as it did before the stage existed
    assert _finish_other_stages(orchestrator, record.audit_id).state == "succeeded"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"robustness_eps": [2.0]}, "exceeds the value range 0..1"),
        ({"robustness_eps": [-0.1]}, "eps takes one or more positive numbers"),
        ({"robustness_eps": [0.1], "robustness_norm": "l3"}, "norm must be one of"),
    ],
)
def test_bad_robustness_options_are_refused_at_submission(
    world: World, options: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        _submit(world.orchestrator, **options)
    assert world.bus.records(AUDIT_REQUESTED) == []


def test_a_failure_inside_the_stage_is_recorded_with_its_reason(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise RuntimeError("not enough memory for the attack's batch")

    monkeypatch.setattr(service_module, "evaluate_robustness", out_of_memory)
    orchestrator = world.orchestrator
    audit_id = _submit(orchestrator, robustness_eps=[0.1]).audit_id
    stage = _stage_final(orchestrator, audit_id).stages[STAGE_ROBUSTNESS]
    assert stage.state == "failed"
    assert (stage.error_code, stage.error) == (
        "INTERNAL",
        "not enough memory for the attack's batch",
    )
    record = _finish_other_stages(orchestrator, audit_id)
    assert record.state == "failed"
    assert record.error == "robustness: not enough memory for the attack's batch"
