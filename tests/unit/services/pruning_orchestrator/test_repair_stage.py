"""The repair stage through its Kafka handlers: neuron-scoring publishes its ranking in
``NeuronsScored``, the pruning-orchestrator's repair use case consumes it (no second
scoring) and repairs exactly as when it scores for itself; submission validates repair
modes, detectors and rules through the registries."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from modelguard.bus.base import Message
from modelguard.bus.memory import MemoryBus
from modelguard.config import NeuronScoringSettings, PlatformSettings, PruningOrchestratorSettings
from modelguard.convert import ref_to_proto, spec_to_proto
from modelguard.convert_ranking import carried_ranking
from modelguard.datasets import dataset_to_npz
from modelguard.detection.registry import DETECTORS
from modelguard.detection.triggers import save_triggers
from modelguard.errors import InvalidInput
from modelguard.formats.loader import load_model
from modelguard.jobdata import load_inputs
from modelguard.metrics import ServiceMetrics
from modelguard.proto.modelguard.v1 import common_pb2, jobs_pb2
from modelguard.repair import rollback
from modelguard.repair.registry import REPAIR_CHOICES, REPAIR_MODES
from modelguard.repair.scoring import NeuronRanking
from modelguard.runtime import Runtime
from modelguard.services.neuron_scoring.handler import TriggersHandler
from modelguard.services.neuron_scoring.service import NeuronScoringService
from modelguard.services.pruning_orchestrator.handler import RepairHandler
from modelguard.services.pruning_orchestrator.service import Orchestrator, RepairRequest
from modelguard.signing import Signer
from modelguard.stage import StageOutcome, StageReporter
from modelguard.store.base import ArtifactRef
from modelguard.store.local import LocalStore
from modelguard.topics import AUDIT_EVENTS, NEURONS_SCORED, STAGE_NEURON_SCORING, STAGE_REPAIR
from tests.unit import repairkit

TORCHSCRIPT = "application/vnd.modelguard.torchscript"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    bus = MemoryBus()
    yield Runtime(
        PlatformSettings(store_dir=tmp_path), bus, LocalStore(tmp_path), Signer.generate()
    )
    bus.close()


@pytest.fixture()
def orchestrator(runtime: Runtime) -> Orchestrator:
    return Orchestrator(
        runtime,
        PruningOrchestratorSettings(),
        ServiceMetrics(CollectorRegistry(), "pruning-orchestrator"),
    )


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(repairkit.backdoored()), buffer)
    return buffer.getvalue()


def triggers_reversed(runtime: Runtime, model_bytes: bytes) -> jobs_pb2.TriggersReversed:
    """The message trigger-reversal publishes for an infected model: label 0 flagged."""
    store = runtime.store
    spec = spec_to_proto(repairkit.SPEC)
    spec.num_classes = 4
    model = common_pb2.ModelSpec(
        artifact=ref_to_proto(store.put_blob(model_bytes, TORCHSCRIPT)), input=spec
    )
    data = ref_to_proto(store.put_blob(dataset_to_npz(repairkit.clean_data())))
    trigger = repairkit.trigger()
    masks = torch.stack([trigger.mask] + [torch.zeros(8, 8)] * 3)
    patterns = torch.stack([trigger.pattern] * 4)
    reversal = ref_to_proto(store.put_blob(save_triggers(masks, patterns)))
    request = jobs_pb2.AuditRequested(
        audit_id="audit-1", model=model, data=data, options=jobs_pb2.AuditOptions()
    )
    return jobs_pb2.TriggersReversed(
        request=request, reversal=reversal, flagged_labels=[repairkit.TARGET], infected=True
    )


class ScoringSpy:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = rollback.score_neurons

        def spy(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(rollback, "score_neurons", spy)


def ignore(fraction: float, message: str = "") -> None:
    pass


def test_repair_stage_uses_the_carried_ranking_and_repairs_as_before(
    runtime: Runtime,
    orchestrator: Orchestrator,
    model_bytes: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    metrics = ServiceMetrics(CollectorRegistry(), "neuron-scoring")
    scoring = TriggersHandler(
        NeuronScoringService(runtime, NeuronScoringSettings(shapley=False), metrics),
        StageReporter(runtime.bus, STAGE_NEURON_SCORING, metrics),
    )
    scoring.handle(triggers_reversed(runtime, model_bytes), ignore)
    (published,) = runtime.bus.records(NEURONS_SCORED)  # type: ignore[attr-defined]
    scored = jobs_pb2.NeuronsScored.FromString(published.value)
    ranking = carried_ranking(scored)
    assert ranking is not None
    assert (ranking.layer, ranking.neurons, ranking.source) == ("fc1", 24, "graph")
    assert ranking.target_labels == (repairkit.TARGET,)

    repairing = RepairHandler(
        orchestrator, StageReporter(runtime.bus, STAGE_REPAIR, orchestrator.metrics)
    )
    spy = ScoringSpy(monkeypatch)
    carried = repairing.repair(scored, ignore)
    assert spy.calls == 0  # the stage's ranking, not a second scoring

    legacy = jobs_pb2.NeuronsScored()
    legacy.CopyFrom(scored)
    legacy.ClearField("ranking")  # a message from before the field: the repair scores
    own = repairing.repair(legacy, ignore)
    assert spy.calls == 1

    def decisions(outcome: StageOutcome) -> dict[str, Any]:
        keys = ("mode", "verdict", "pruned", "curve", "before", "after", "notes", "images")
        return {key: outcome.summary.get(key) for key in keys}

    assert decisions(carried) == decisions(own)
    assert carried.summary["mode"] == "rollback" and len(carried.summary["curve"]) > 10
    # the stage's message says what the repair did to the attack, not only the prunes
    before, after = carried.summary["before"], carried.summary["after"]
    assert carried.message == (
        f"{len(carried.summary['pruned'])} neurons pruned, reversed ASR "
        f"{before['reversed_asr']:.3f} → {after['reversed_asr']:.3f}"
    )
    # the same repaired model, still TorchScript
    assert carried.summary["repaired_model"] == own.summary["repaired_model"]
    assert carried.summary["repaired_model"]["media_type"] == TORCHSCRIPT
    stored = runtime.store.get_blob(ArtifactRef(**carried.summary["repaired_model"]))
    assert isinstance(load_model(stored, repairkit.SPEC).module, torch.jit.ScriptModule)


def test_repair_use_case_defaults_and_refusals(
    runtime: Runtime, orchestrator: Orchestrator, model_bytes: bytes
) -> None:
    message = triggers_reversed(runtime, model_bytes)
    request = message.request
    inputs = load_inputs(runtime.store, request.model, request.data, runtime.platform)
    trigger = repairkit.trigger()
    outcome = orchestrator.repair(
        RepairRequest(inputs, [trigger], mode="fine-pruning", media_type=TORCHSCRIPT)
    )
    assert outcome.mode == outcome.summary["mode"] == outcome.result.mode == "fine-pruning"
    assert outcome.summary["verdict"] in ("repaired", "partially repaired")
    assert runtime.store.get_blob(outcome.model)
    with pytest.raises(InvalidInput, match="unknown repair mode"):
        orchestrator.repair(RepairRequest(inputs, [trigger], mode="magic"))
    wrong = NeuronRanking("fc2", 4, (0, 1, 2, 3), (0, 1, 2, 3))
    with pytest.raises(InvalidInput, match="ranking is of fc2"):
        orchestrator.repair(RepairRequest(inputs, [trigger], ranking=wrong))


def test_submission_validates_through_the_registries(
    runtime: Runtime, orchestrator: Orchestrator, model_bytes: bytes
) -> None:
    request = triggers_reversed(runtime, model_bytes).request
    model, data = request.model, request.data
    for mode in ("", *REPAIR_CHOICES):
        orchestrator.submit(model, data, jobs_pb2.AuditOptions(repair_mode=mode))
    with pytest.raises(InvalidInput, match="repair mode 'magic' unknown") as caught:
        orchestrator.submit(model, data, jobs_pb2.AuditOptions(repair_mode="magic"))
    assert all(name in str(caught.value) for name in REPAIR_MODES)
    for detector in ("", *DETECTORS):
        record = orchestrator.submit(
            model, data, jobs_pb2.AuditOptions(detector=detector, detection_rule="paper")
        )
        assert orchestrator.request_message(record).options.detector == detector
    with pytest.raises(InvalidInput, match="unknown detector"):
        orchestrator.submit(model, data, jobs_pb2.AuditOptions(detector="nc"))
    with pytest.raises(InvalidInput, match="detection rule 'nc' unknown for neural-cleanse"):
        orchestrator.submit(model, data, jobs_pb2.AuditOptions(detection_rule="nc"))
    none = orchestrator.submit(model, data, jobs_pb2.AuditOptions(repair_mode="none"))
    assert none.stages[STAGE_REPAIR].state == "skipped"


def test_a_redelivered_repair_whose_outcome_is_recorded_is_not_run_again(
    runtime: Runtime,
    orchestrator: Orchestrator,
    model_bytes: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message = triggers_reversed(runtime, model_bytes)
    request = message.request
    repairing = RepairHandler(
        orchestrator, StageReporter(runtime.bus, STAGE_REPAIR, orchestrator.metrics)
    )
    runs: list[str] = []

    def counted(scored: jobs_pb2.NeuronsScored, progress: Any) -> StageOutcome:
        runs.append(scored.triggers.request.audit_id)
        return StageOutcome(skipped=True, message="counted only")

    monkeypatch.setattr(repairing, "repair", counted)

    def deliver(audit_id: str) -> None:
        scored = jobs_pb2.NeuronsScored()
        scored.triggers.CopyFrom(message)
        scored.triggers.request.audit_id = audit_id
        repairing(Message(NEURONS_SCORED, scored.SerializeToString()))

    # the repair stage is final at submission when no repair was asked for: a message for
    # it (a redelivery) neither runs the repair nor publishes a second outcome
    done = orchestrator.submit(
        request.model, request.data, jobs_pb2.AuditOptions(repair_mode="none")
    )
    deliver(done.audit_id)
    assert runs == [] and runtime.bus.records(AUDIT_EVENTS) == []  # type: ignore[attr-defined]
    # a pending repair, or an audit without a record, runs as before
    pending = orchestrator.submit(request.model, request.data, jobs_pb2.AuditOptions())
    deliver(pending.audit_id)
    deliver("no-such-audit")
    assert runs == [pending.audit_id, "no-such-audit"]
