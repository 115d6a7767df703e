"""Tracing: off by default; when on, one trace follows a job through bus records (W3C
trace context in the headers) and gRPC calls (in the metadata); hot paths are sampled."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry

from modelguard import tracing
from modelguard.bus.base import Message, RetryPolicy
from modelguard.bus.memory import MemoryBus
from modelguard.channels import open_channel
from modelguard.config import PlatformSettings, ResultMapperSettings, TracingSettings
from modelguard.errors import InvalidInput
from modelguard.grpc_server import GrpcServer
from modelguard.metrics import ServiceMetrics
from modelguard.proto.modelguard.v1 import (
    common_pb2,
    jobs_pb2,
    trigger_reversal_pb2,
    trigger_reversal_pb2_grpc,
)
from modelguard.services.launcher import build_service
from modelguard.stage import Progress, StageOutcome, StageReporter, run_audit_stage
from modelguard.topics import AUDIT_EVENTS

TRIGGER_REVERSAL = "modelguard.v1.TriggerReversal"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for the test, every span ending in memory."""
    exporter = InMemorySpanExporter()
    assert tracing.configure_tracing(TracingSettings(), "test", exporters=[exporter])
    yield exporter
    tracing.shutdown_tracing()


@pytest.fixture(autouse=True)
def _tracing_off_afterwards() -> Iterator[None]:
    yield
    tracing.shutdown_tracing()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def one(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = named(exporter, name)
    assert len(found) == 1, [s.name for s in exporter.get_finished_spans()]
    return found[0]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


class Status(trigger_reversal_pb2_grpc.TriggerReversalServicer):
    """Answers GetStatus (noting the trace it ran in); ReverseTriggers is bad input."""

    def __init__(self) -> None:
        self.trace_ids: list[int] = []

    def GetStatus(
        self, request: common_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> common_pb2.ServiceStatus:
        self.trace_ids.append(trace.get_current_span().get_span_context().trace_id)
        return common_pb2.ServiceStatus(service="trigger-reversal")

    def ReverseTriggers(
        self, request: trigger_reversal_pb2.ReverseTriggersRequest, context: grpc.ServicerContext
    ) -> trigger_reversal_pb2.ReverseTriggersResponse:
        raise InvalidInput("no model given")


def serve(trace_ratio: float | None = None) -> tuple[GrpcServer, Status]:
    servicer = Status()
    server = GrpcServer(ServiceMetrics(CollectorRegistry(), "trigger-reversal"), metrics_port=-1)
    server.register(
        trigger_reversal_pb2_grpc.add_TriggerReversalServicer_to_server,
        servicer,
        TRIGGER_REVERSAL,
        trace_ratio=trace_ratio,
    )
    server.start()
    return server, servicer


# --- settings and the default ---------------------------------------------------------


def test_tracing_is_off_by_default_and_leaves_no_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert not tracing.configure_tracing(TracingSettings(), "test")
    assert not tracing.enabled()
    with tracing.span("audit submit") as current:
        assert not current.is_recording()
        bus = MemoryBus()
        bus.publish("jobs", b"x", headers={"job-id": "a-1"})
    assert dict(bus.records("jobs")[0].headers) == {"job-id": "a-1"}
    server, servicer = serve()
    try:
        with open_channel(server.address) as channel:
            trigger_reversal_pb2_grpc.TriggerReversalStub(channel).GetStatus(
                common_pb2.StatusRequest(), timeout=5
            )
    finally:
        server.stop(0.5)
    assert servicer.trace_ids == [0]  # no span: the handler was not wrapped at all


def test_the_standard_variables_configure_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "orchestrator-eu")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "1.0")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")  # the exporter's
    settings = TracingSettings()
    assert (settings.traces_exporter, settings.service_name) == ("console", "orchestrator-eu")
    assert settings.traces_sampler_arg == "1.0"
    assert tracing.configure_tracing(settings, "pruning-orchestrator")
    with tracing.span("x") as current:
        assert current.is_recording()
        assert isinstance(current, ReadableSpan) and current.resource is not None
        assert current.resource.attributes["service.name"] == "orchestrator-eu"
    assert "TraceIdRatioBased{0.5}" in tracing.sampler_from("traceidratio", "0.5").get_description()
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.configure_tracing(TracingSettings(), "pruning-orchestrator")
    assert not tracing.enabled()


def test_unknown_exporters_and_samplers_are_refused() -> None:
    with pytest.raises(InvalidInput, match="zipkin"):
        tracing.configure_tracing(TracingSettings(traces_exporter="zipkin"), "test")
    with pytest.raises(InvalidInput, match="sometimes"):
        tracing.sampler_from("sometimes", "")
    with pytest.raises(InvalidInput, match="half"):
        tracing.sampler_from("traceidratio", "half")


# --- bus records -----------------------------------------------------------------------


def test_a_stage_job_continues_the_trace_carried_in_the_record_headers(
    spans: InMemorySpanExporter,
) -> None:
    bus = MemoryBus()
    reporter = StageReporter(
        bus, "leak-detector", ServiceMetrics(CollectorRegistry(), "leak-detector"), max_attempts=2
    )
    done = threading.Event()

    def work(_request: jobs_pb2.AuditRequested, _progress: Progress) -> StageOutcome:
        return StageOutcome(message="benign")

    def handler(message: Message) -> None:
        try:
            run_audit_stage(
                reporter, message, jobs_pb2.AuditRequested, lambda m: m.audit_id, work,
                tenant=lambda m: m.tenant,
            )  # fmt: skip
        finally:
            done.set()

    sub = bus.subscribe(["jobs"], "g", handler, retry=RetryPolicy(max_attempts=1))
    try:
        with tracing.tracer().start_as_current_span("audit submit"):
            request = jobs_pb2.AuditRequested(audit_id="a-42", tenant="acme")
            bus.publish("jobs", request.SerializeToString(), headers={"job-id": "a-42"})
        assert done.wait(10)
    finally:
        sub.stop()
        bus.close()
    submit = one(spans, "audit submit")
    record = bus.records("jobs")[0]
    assert record.headers["job-id"] == "a-42"  # the caller's headers are kept
    version, trace_hex, parent_hex, flags = record.headers["traceparent"].split("-")
    assert version == "00" and int(flags, 16) & 1  # sampled
    assert (int(trace_hex, 16), int(parent_hex, 16)) == (trace_id(submit), span_id(submit))

    consumed = one(spans, "jobs process")
    assert consumed.kind is SpanKind.CONSUMER
    assert parent_of(consumed) == span_id(submit)
    assert consumed.attributes is not None
    assert consumed.attributes["messaging.destination.name"] == "jobs"
    stage = one(spans, "stage leak-detector")
    assert parent_of(stage) == span_id(consumed)
    assert stage.attributes is not None
    assert {k: stage.attributes[k] for k in stage.attributes if k.startswith("modelguard.")} == {
        "modelguard.audit_id": "a-42",
        "modelguard.stage": "leak-detector",
        "modelguard.tenant": "acme",
        "modelguard.attempt": 1,
    }
    assert {trace_id(s) for s in spans.get_finished_spans()} == {trace_id(submit)}
    # the stage's events are published in the stage's span: the trace goes on from there
    events = bus.records(AUDIT_EVENTS)
    assert events
    for event in events:
        assert event.headers["traceparent"].split("-")[1:3] == [
            f"{trace_id(stage):032x}",
            f"{span_id(stage):016x}",
        ]


def test_a_failing_attempt_is_an_error_span_and_the_retry_its_own(
    spans: InMemorySpanExporter,
) -> None:
    bus = MemoryBus()
    attempts: list[int] = []
    done = threading.Event()

    def handler(message: Message) -> None:
        attempts.append(message.attempt)
        if message.attempt == 1:
            raise RuntimeError("flaky")
        done.set()

    retry = RetryPolicy(max_attempts=2, initial_backoff_s=0.01)
    sub = bus.subscribe(["jobs"], "g", handler, retry=retry)
    try:
        with tracing.tracer().start_as_current_span("publisher"):
            bus.publish("jobs", b"x")
        assert done.wait(10)
    finally:
        sub.stop()
        bus.close()
    first, second = sorted(named(spans, "jobs process"), key=lambda s: s.start_time or 0)
    assert first.status.status_code is StatusCode.ERROR
    assert second.status.status_code is StatusCode.UNSET
    assert first.attributes is not None and second.attributes is not None
    assert (first.attributes["modelguard.attempt"], second.attributes["modelguard.attempt"]) == (
        1,
        2,
    )
    assert parent_of(first) == parent_of(second) == span_id(one(spans, "publisher"))


# --- gRPC -----------------------------------------------------------------------------


def test_grpc_calls_carry_the_trace_from_client_to_server(spans: InMemorySpanExporter) -> None:
    server, servicer = serve()
    try:
        with open_channel(server.address) as channel:
            stub = trigger_reversal_pb2_grpc.TriggerReversalStub(channel)
            with tracing.tracer().start_as_current_span("cli"):
                stub.GetStatus(common_pb2.StatusRequest(), timeout=5)
                with pytest.raises(grpc.RpcError):
                    stub.ReverseTriggers(trigger_reversal_pb2.ReverseTriggersRequest(), timeout=5)
    finally:
        server.stop(0.5)
    cli = one(spans, "cli")
    clients = [
        s for s in named(spans, f"{TRIGGER_REVERSAL}/GetStatus") if s.kind is SpanKind.CLIENT
    ]
    servers = [
        s for s in named(spans, f"{TRIGGER_REVERSAL}/GetStatus") if s.kind is SpanKind.SERVER
    ]
    assert len(clients) == len(servers) == 1
    assert parent_of(clients[0]) == span_id(cli)
    assert parent_of(servers[0]) == span_id(clients[0])
    assert servicer.trace_ids == [trace_id(cli)]  # the span is current in the servicer
    assert servers[0].attributes is not None
    assert servers[0].attributes["rpc.grpc.status_code"] == 0
    failed = [
        s for s in named(spans, f"{TRIGGER_REVERSAL}/ReverseTriggers") if s.kind is SpanKind.SERVER
    ]
    assert len(failed) == 1 and failed[0].status.status_code is StatusCode.ERROR
    assert failed[0].status.description is not None
    assert "INVALID_ARGUMENT" in failed[0].status.description
    assert {trace_id(s) for s in spans.get_finished_spans()} == {trace_id(cli)}


def test_the_server_continues_a_traceparent_sent_by_any_client(
    spans: InMemorySpanExporter,
) -> None:
    server, servicer = serve()
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    try:
        with grpc.insecure_channel(server.address) as channel:
            trigger_reversal_pb2_grpc.TriggerReversalStub(channel).GetStatus(
                common_pb2.StatusRequest(),
                metadata=[("traceparent", f"00-{caller_trace}-00f067aa0ba902b7-01")],
                timeout=5,
            )
    finally:
        server.stop(0.5)
    served = one(spans, f"{TRIGGER_REVERSAL}/GetStatus")
    assert served.kind is SpanKind.SERVER
    assert trace_id(served) == int(caller_trace, 16)
    assert parent_of(served) == 0x00F067AA0BA902B7
    assert servicer.trace_ids == [int(caller_trace, 16)]


def test_a_streamed_response_is_one_span_current_while_the_handler_runs(
    spans: InMemorySpanExporter,
) -> None:
    seen: list[int] = []

    def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for index in range(3):
            seen.append(trace.get_current_span().get_span_context().span_id)
            yield bytes([index])

    server = GrpcServer(ServiceMetrics(CollectorRegistry(), "test"), metrics_port=-1)
    server.server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Counter", {"Count": grpc.unary_stream_rpc_method_handler(count)}
            ),
        )
    )
    server.start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            replies = list(channel.unary_stream("/test.Counter/Count")(b"", timeout=5))
    finally:
        server.stop(0.5)
    assert replies == [b"\x00", b"\x01", b"\x02"]
    streamed = one(spans, "test.Counter/Count")
    assert seen == [span_id(streamed)] * 3


# --- hot paths -------------------------------------------------------------------------


@pytest.mark.parametrize(("ratio", "low", "high"), [(0.0, 0, 0), (1.0, 60, 60), (0.5, 15, 45)])
def test_a_sampled_service_traces_its_share_of_calls(
    spans: InMemorySpanExporter, ratio: float, low: int, high: int
) -> None:
    server, _servicer = serve(trace_ratio=ratio)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = trigger_reversal_pb2_grpc.TriggerReversalStub(channel)
            for _ in range(60):
                stub.GetStatus(common_pb2.StatusRequest(), timeout=5)
    finally:
        server.stop(0.5)
    # 0.5: 30 ± 3.9 (one standard deviation) expected; the bounds are ± 3.9 sigma
    assert low <= len(named(spans, f"{TRIGGER_REVERSAL}/GetStatus")) <= high


def test_the_hot_path_sampler_keeps_its_ratio_and_follows_a_sampled_caller(
    spans: InMemorySpanExporter,
) -> None:
    hot = tracing.sampled_tracer(0.1)
    assert tracing.sampled_tracer(0.1) is hot
    for _ in range(2000):
        with hot.start_as_current_span("Map"):
            pass
    kept = len(named(spans, "Map"))
    assert 130 <= kept <= 270  # 200 ± 13.4: about ± 5 sigma
    spans.clear()
    never = tracing.sampled_tracer(0.0)
    with tracing.tracer().start_as_current_span("caller"):
        for _ in range(20):
            with never.start_as_current_span("Map"):
                pass
    assert len(named(spans, "Map")) == 20  # the caller's sampled trace decides


def test_result_mapper_samples_map_and_model_infer(tmp_path: Path) -> None:
    tracing.configure_tracing(
        TracingSettings(), "result-mapper", exporters=[InMemorySpanExporter()]
    )
    settings = ResultMapperSettings(
        grpc_port=0, metrics_port=-1, worker=False, profile_scoring=False, trace_ratio=0.02
    )
    app = build_service("result-mapper", PlatformSettings(store_dir=tmp_path), settings)
    assert app.grpc.tracing.ratios == {
        "modelguard.v1.ResultMapper": 0.02,
        "inference.GRPCInferenceService": 0.02,
    }
    assert ResultMapperSettings().trace_ratio == 0.01
