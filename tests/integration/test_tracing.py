"""One audit, one trace: submitted over gRPC, its jobs and events through a real Kafka
broker (Tansu), the trace context carried in the record headers from the submission to
each stage's job and on to the report. The services run in this process so that an
in-memory exporter sees every span."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from modelguard import tracing
from modelguard.config import (
    SERVICE_SETTINGS,
    NeuronScoringSettings,
    PlatformSettings,
    TracingSettings,
    TriggerReversalSettings,
)
from modelguard.datasets import Dataset, dataset_to_npz
from modelguard.formats.loader import weights_to_safetensors
from modelguard.nn.architectures import build
from modelguard.proto.modelguard.v1 import common_pb2, jobs_pb2
from modelguard.runtime import ServiceApp
from modelguard.services.audit_client import AuditClient
from modelguard.services.launcher import build_service
from modelguard.topics import ALL_TOPICS
from tests.conftest import MNIST_SPEC

pytestmark = pytest.mark.integration

SERVICES = ("pruning-orchestrator", "leak-detector", "trigger-reversal", "neuron-scoring")


@pytest.fixture()
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.configure_tracing(TracingSettings(), "integration", exporters=[exporter])
    yield exporter
    tracing.shutdown_tracing()


@pytest.fixture()
def stack(tansu: Any, spans: InMemorySpanExporter, tmp_path: Path) -> Iterator[ServiceApp]:
    """The audit's services in this process, each on its own Kafka client (tracing is on
    before they are built: gRPC handlers are wrapped at registration)."""
    platform = PlatformSettings(
        bus="kafka", kafka_bootstrap=tansu.bootstrap, store_dir=tmp_path / "store"
    )
    cheap = {
        "trigger-reversal": TriggerReversalSettings(steps=20, clean_samples=20),
        "neuron-scoring": NeuronScoringSettings(shapley=False),
    }
    suffix = uuid.uuid4().hex[:8]
    apps: list[ServiceApp] = []
    try:
        for name in SERVICES:
            settings = cheap.get(name) or SERVICE_SETTINGS[name]()
            settings = settings.model_copy(
                update={"grpc_port": 0, "metrics_port": -1, "group": f"{name}-{suffix}"}
            )
            app = build_service(name, platform, settings)
            app.runtime.bus.ensure_topics(list(ALL_TOPICS))
            app.start()
            apps.append(app)
        yield apps[0]
    finally:
        for app in reversed(apps):
            app.stop(2.0)
            app.runtime.bus.close()


def spans_named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def test_an_audit_is_one_trace_from_submit_through_the_broker_to_the_report(
    stack: ServiceApp, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = tmp_path / "model.safetensors"
    model.write_bytes(weights_to_safetensors(build("lenet5")))
    data = dataset_to_npz(Dataset(torch.rand(20, 1, 28, 28), torch.arange(20) % 10))
    options = jobs_pb2.AuditOptions(reversal_steps=20, skip_repair=True, seed=0)
    with AuditClient(stack.address, timeout=60) as client:
        audit = client.submit(model, data, MNIST_SPEC, arch="lenet5", options=options)
        final = list(client.watch(audit.audit_id))[-1]
    assert final.state in (common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED), final

    [submit] = [
        s
        for s in spans_named(spans.get_finished_spans(), "audit submit")
        if s.attributes is not None and s.attributes["modelguard.audit_id"] == audit.audit_id
    ]
    assert submit.context is not None
    trace_id = submit.context.trace_id
    deadline = time.monotonic() + 10  # the report span ends as the final state is stored
    while True:
        in_trace = [
            s
            for s in spans.get_finished_spans()
            if s.context is not None and s.context.trace_id == trace_id
        ]
        if spans_named(in_trace, "audit report") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    names = {s.name for s in in_trace}
    # the submission: the client's call, the server's span, the use case
    submit_rpc = "modelguard.v1.PruningOrchestrator/SubmitAudit"
    assert {s.kind for s in spans_named(in_trace, submit_rpc)} == {
        SpanKind.CLIENT,
        SpanKind.SERVER,
    }
    # every stage that ran, continued from the request record's headers
    for stage in ("leak-detector", "trigger-reversal"):
        [job] = spans_named(in_trace, f"stage {stage}")
        assert job.attributes is not None
        assert job.attributes["modelguard.audit_id"] == audit.audit_id
        assert job.attributes["modelguard.attempt"] == 1
        [consumed] = [
            s
            for s in in_trace
            if s.kind is SpanKind.CONSUMER
            and job.parent is not None
            and s.context is not None
            and s.context.span_id == job.parent.span_id
        ]
        assert consumed.name == "modelguard.audit.requested process", consumed.name
    # the report, built when the last stage event arrived
    [report] = spans_named(in_trace, "audit report")
    assert report.attributes is not None
    assert report.attributes["modelguard.audit_id"] == audit.audit_id
    assert "modelguard.audit.events process" in names
    assert report.start_time is not None and submit.start_time is not None
    assert report.start_time > submit.start_time
