"""OpenTelemetry tracing across gRPC calls and bus records, off unless configured.

`configure_tracing` reads the standard ``OTEL_*`` variables (`modelguard.config.
TracingSettings`); without an exporter nothing is set up, every helper here returns at its
first check and no span is made. When on, the W3C trace context (``traceparent``,
``tracestate``) travels in gRPC metadata and in record headers: `inject_headers` adds it
to what is published, `consuming` continues the publisher's trace around each delivery of
a record, and the gRPC interceptors (`modelguard.interceptors.TracingInterceptor`,
`modelguard.channels.TraceContextClient`) do the same for calls. One audit is then one
trace: the submission, each stage's job, the events and the report.

The tracer provider is this module's own, not OpenTelemetry's global one, so a process
(or a test) can configure it again and `shutdown_tracing` turns it off.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, SynchronousMultiSpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import NoOpTracer, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from modelguard.errors import InvalidInput
from modelguard.logs import current_job

if TYPE_CHECKING:
    from modelguard.bus.base import Message
    from modelguard.config import TracingSettings

#: The instrumentation scope of every span made here.
TRACER_NAME = "modelguard"
#: The W3C trace-context header names, in gRPC metadata and record headers alike.
TRACE_HEADERS = ("traceparent", "tracestate")

_PROPAGATOR = TraceContextTextMapPropagator()
_NO_OP = NoOpTracer()


@dataclass
class _Tracing:
    provider: TracerProvider
    processor: SynchronousMultiSpanProcessor
    resource: Resource
    #: tracers that sample a share of root spans (hot paths), by ratio
    sampled: dict[float, Tracer] = field(default_factory=dict)


_state: _Tracing | None = None
_lock = threading.Lock()


def sampler_from(name: str, argument: str) -> Sampler:
    """The sampler an ``OTEL_TRACES_SAMPLER`` name (and ``_ARG``) stands for."""
    try:
        ratio = float(argument) if argument else 1.0
    except ValueError:
        raise InvalidInput(f"OTEL_TRACES_SAMPLER_ARG {argument!r} is not a number") from None
    samplers: dict[str, Sampler] = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": TraceIdRatioBased(ratio),
        "parentbased_always_on": ParentBased(ALWAYS_ON),
        "parentbased_always_off": ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": ParentBased(TraceIdRatioBased(ratio)),
    }
    if name not in samplers:
        raise InvalidInput(f"OTEL_TRACES_SAMPLER {name!r} unknown; use " + ", ".join(samplers))
    return samplers[name]


def _exporters(names: str) -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    for name in (n.strip() for n in names.split(",")):
        if name in ("", "none"):
            continue
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            # reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, _HEADERS, _TIMEOUT itself
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        else:
            raise InvalidInput(f"OTEL_TRACES_EXPORTER {name!r} unknown; use otlp, console or none")
    return exporters


def configure_tracing(
    settings: TracingSettings,
    service: str,
    *,
    exporters: Sequence[SpanExporter] = (),
) -> bool:
    """Turn tracing on for this process if ``settings`` name an exporter (or
    ``exporters`` are given: they receive each span as it ends, e.g. an in-memory one in
    tests); returns whether tracing is on. Replaces an earlier configuration."""
    processors: list[SpanProcessor] = [SimpleSpanProcessor(e) for e in exporters]
    if not settings.sdk_disabled:
        processors += [BatchSpanProcessor(e) for e in _exporters(settings.traces_exporter)]
    shutdown_tracing()
    if not processors or settings.sdk_disabled:
        return False
    resource = Resource.create({SERVICE_NAME: settings.service_name or service})
    processor = SynchronousMultiSpanProcessor()
    for each in processors:
        processor.add_span_processor(each)
    provider = TracerProvider(
        sampler=sampler_from(settings.traces_sampler, settings.traces_sampler_arg),
        resource=resource,
        shutdown_on_exit=False,
        active_span_processor=processor,
    )
    global _state
    with _lock:
        _state = _Tracing(provider, processor, resource)
    return True


def shutdown_tracing() -> None:
    """Export what is pending and turn tracing off."""
    global _state
    with _lock:
        state, _state = _state, None
    if state is not None:
        state.provider.shutdown()


atexit.register(shutdown_tracing)


def enabled() -> bool:
    return _state is not None


def tracer() -> Tracer:
    """The process's tracer (a no-op one while tracing is off)."""
    state = _state
    return state.provider.get_tracer(TRACER_NAME) if state is not None else _NO_OP


def sampled_tracer(ratio: float) -> Tracer:
    """A tracer for a hot path: a span that starts a trace is kept with probability
    ``ratio`` (by trace id, so all of one trace is kept or dropped); a span whose parent
    was sampled is always kept, one whose parent was not never is. Spans go to the same
    exporters as `tracer`'s."""
    state = _state
    if state is None:
        return _NO_OP
    with _lock:
        found = state.sampled.get(ratio)
        if found is None:
            provider = TracerProvider(
                sampler=ParentBased(TraceIdRatioBased(ratio)),
                resource=state.resource,
                shutdown_on_exit=False,
                active_span_processor=state.processor,
            )
            found = state.sampled[ratio] = provider.get_tracer(TRACER_NAME)
        return found


# --- propagation ------------------------------------------------------------------------


def inject_headers(headers: Mapping[str, str] | None) -> Mapping[str, str] | None:
    """``headers`` plus the current trace context (W3C ``traceparent``/``tracestate``);
    ``headers`` themselves when tracing is off or no span is current."""
    if _state is None or not trace.get_current_span().get_span_context().is_valid:
        return headers
    carrier: dict[str, str] = dict(headers or {})
    _PROPAGATOR.inject(carrier)
    return carrier


def context_from(carrier: Mapping[str, str]) -> otel_context.Context:
    """The trace context ``carrier`` (headers or metadata, lower-case keys) carries."""
    return _PROPAGATOR.extract(carrier)


def metadata_carrier(metadata: Sequence[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """The trace-context entries of gRPC metadata, as a carrier for `context_from`."""
    return {
        key: value if isinstance(value, str) else value.decode("ascii", "replace")
        for key, value in (metadata or ())
        if key in TRACE_HEADERS
    }


@contextmanager
def consuming(message: Message) -> Iterator[None]:
    """Around one delivery of ``message`` to its handler: a consumer span continuing the
    trace its publisher carried in the record's headers (a new trace if none)."""
    state = _state
    if state is None:
        yield
        return
    with state.provider.get_tracer(TRACER_NAME).start_as_current_span(
        f"{message.topic} process",
        context=context_from(message.headers),
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "kafka",
            "messaging.operation": "process",
            "messaging.destination.name": message.topic,
            "messaging.kafka.message.offset": message.offset,
            "messaging.kafka.destination.partition": message.partition,
            "modelguard.job_id": message.job_id,
            "modelguard.attempt": message.attempt,
        },
    ):
        yield


# --- spans ---------------------------------------------------------------------------------


@contextmanager
def span(name: str, **attributes: str | int | float | bool) -> Iterator[Span]:
    """A span of this process's work, child of the current one, carrying the job fields
    bound by `modelguard.logs.job_context` (audit_id, stage, tenant, attempt) and
    ``attributes``. Exceptions are recorded on it and mark it as an error."""
    state = _state
    if state is None:
        yield trace.INVALID_SPAN
        return
    fields: dict[str, str | int | float | bool] = {
        f"modelguard.{k}": v for k, v in current_job().items()
    }
    fields.update({f"modelguard.{k}": v for k, v in attributes.items()})
    with state.provider.get_tracer(TRACER_NAME).start_as_current_span(
        name, attributes=fields
    ) as current:
        yield current


def set_attributes(target: Span, **attributes: str | int | float | bool) -> None:
    """Add ``attributes`` (named ``modelguard.<name>``) to a span from `span`."""
    if target.is_recording():
        target.set_attributes({f"modelguard.{k}": v for k, v in attributes.items()})


def mark_error(target: Span, description: str) -> None:
    if target.is_recording():
        target.set_status(Status(StatusCode.ERROR, description))
