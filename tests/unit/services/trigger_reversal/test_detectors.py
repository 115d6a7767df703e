"""trigger-reversal runs the detector an audit (or a ReverseTriggers call) names, through
the registry: the default is the batched Neural Cleanse, the sequential one gives its own
algorithm's result, an unknown name is refused, and the Kafka handler passes the audit's
option on."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from modelguard.bus.memory import MemoryBus
from modelguard.config import PlatformSettings, TriggerReversalSettings
from modelguard.convert import ref_to_proto, spec_to_proto
from modelguard.datasets import Dataset, dataset_to_npz
from modelguard.detection.neural_cleanse import PAPER, ReversalConfig
from modelguard.detection.neural_cleanse_sequential import reverse_triggers_sequential
from modelguard.errors import InvalidInput
from modelguard.formats.loader import LoadedModel
from modelguard.jobdata import ModelAndData
from modelguard.metrics import ServiceMetrics
from modelguard.proto.modelguard.v1 import common_pb2, jobs_pb2
from modelguard.runtime import Runtime
from modelguard.services.trigger_reversal.handler import AuditHandler
from modelguard.services.trigger_reversal.service import StoredReversal, TriggerReversalService
from modelguard.signing import Signer
from modelguard.spec import InputSpec
from modelguard.stage import StageReporter
from modelguard.store.base import ArtifactRef
from modelguard.store.local import LocalStore
from modelguard.topics import STAGE_TRIGGER_REVERSAL
from tests.conftest import MNIST_SPEC, InfectedModel

SPEC = InputSpec(shape=(1, 6, 6))


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


def tiny_data(n: int = 48) -> Dataset:
    generator = torch.Generator().manual_seed(1)
    return Dataset(torch.rand(n, 1, 6, 6, generator=generator), torch.arange(n) % 3)


@pytest.fixture()
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    bus = MemoryBus()
    yield Runtime(
        PlatformSettings(store_dir=tmp_path), bus, LocalStore(tmp_path), Signer.generate()
    )
    bus.close()


@pytest.fixture()
def service(runtime: Runtime) -> TriggerReversalService:
    return TriggerReversalService(
        runtime, TriggerReversalSettings(), ServiceMetrics(CollectorRegistry(), "trigger-reversal")
    )


def test_the_named_detector_runs(service: TriggerReversalService) -> None:
    inputs = ModelAndData(LoadedModel(tiny_model(), "torchscript", "", 3), tiny_data(), SPEC)
    stored = service.reverse(inputs, steps=15, rule=PAPER, detector="neural-cleanse-sequential")
    assert stored.summary["detector"] == "neural-cleanse-sequential"
    config = ReversalConfig.paper(steps=15)
    direct = reverse_triggers_sequential(tiny_model(), tiny_data(), SPEC, config)
    assert stored.result.flagged == direct.flagged
    assert torch.equal(stored.result.masks, direct.masks)
    assert service.reverse(inputs, steps=5).summary["detector"] == "neural-cleanse"
    with pytest.raises(InvalidInput, match="unknown detector"):
        service.reverse(inputs, steps=5, detector="nc")


def test_the_handler_passes_the_audit_detector_on(
    runtime: Runtime, service: TriggerReversalService, monkeypatch: pytest.MonkeyPatch
) -> None:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(tiny_model()), buffer)
    spec = spec_to_proto(SPEC)
    request = jobs_pb2.AuditRequested(
        audit_id="audit-1",
        model=common_pb2.ModelSpec(
            artifact=ref_to_proto(runtime.store.put_blob(buffer.getvalue())), input=spec
        ),
        data=ref_to_proto(runtime.store.put_blob(dataset_to_npz(tiny_data()))),
        options=jobs_pb2.AuditOptions(detector="neural-cleanse-sequential", detection_rule=PAPER),
    )
    seen: dict[str, Any] = {}

    def reverse(inputs: ModelAndData, **kwargs: Any) -> StoredReversal:
        seen.update(kwargs)
        ref = ArtifactRef("0" * 64, "k", 0, "")
        return StoredReversal(SimpleNamespace(verdict="clean", flagged=()), ref, ref, {})  # type: ignore[arg-type]

    monkeypatch.setattr(service, "reverse", reverse)
    reporter = StageReporter(runtime.bus, STAGE_TRIGGER_REVERSAL, service.metrics)
    AuditHandler(service, reporter).handle(request, lambda fraction, message="": None)
    assert seen["detector"] == "neural-cleanse-sequential" and seen["rule"] == PAPER


def test_an_audit_names_its_reference_and_the_stage_sets_its_triggers_aside(
    runtime: Runtime,
    service: TriggerReversalService,
    infected_lenet: InfectedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reference travels as an artifact of the audit's options: the infected model as
    its own reference shares its trigger, so the stage says clean and hands nothing on to
    neuron scoring; a reference of another task fails the stage with the reason, before
    any reversal."""
    import modelguard.services.trigger_reversal.handler as handler

    store = runtime.store
    model = common_pb2.ModelSpec(
        artifact=ref_to_proto(store.put_blob(infected_lenet.weights)),
        arch="lenet5",
        input=spec_to_proto(MNIST_SPEC),
    )
    request = jobs_pb2.AuditRequested(
        audit_id="audit-1",
        model=model,
        data=ref_to_proto(store.put_blob(infected_lenet.clean_npz_path.read_bytes())),
        options=jobs_pb2.AuditOptions(reference_model=model.artifact),
    )
    published: list[Any] = []
    monkeypatch.setattr(handler, "publish_proto", lambda *args, **kwargs: published.append(args))
    reporter = StageReporter(runtime.bus, STAGE_TRIGGER_REVERSAL, service.metrics)
    outcome = AuditHandler(service, reporter).handle(request, lambda fraction, message="": None)
    assert outcome.message == "verdict clean; flagged labels: none"
    assert outcome.summary["evidence"]["reference"]["inherited"] == [infected_lenet.target]
    assert published == []

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(784, 3))), buffer)
    request.options.reference_model.CopyFrom(ref_to_proto(store.put_blob(buffer.getvalue())))

    def no_reversal(*args: Any, **kwargs: Any) -> StoredReversal:
        raise AssertionError("the reversal ran before the reference was checked")

    monkeypatch.setattr(service, "reverse", no_reversal)
    with pytest.raises(InvalidInput, match="declared 10 classes but the model outputs 3"):
        AuditHandler(service, reporter).handle(request, lambda fraction, message="": None)
