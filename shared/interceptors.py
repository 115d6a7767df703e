"""gRPC server interceptors: error mapping (one place where the project's errors become
status codes), request metrics and tracing.

Each is a `MethodInterceptor`: it wraps a method's handler once (``wrap(method, handler)``)
and does its per-call work inside the wrapped behaviour. `modelguard.grpc_server.GrpcServer`
applies the wrappers when a servicer is registered, so a call costs only the wrappers
themselves; grpc's per-call interceptor pipeline (which would rebuild every handler on
every call) is not used. As plain ``grpc.ServerInterceptor`` s they still work, with the
wrapped handler cached per method."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from modelguard import tracing
from modelguard.errors import InvalidInput, ModelGuardError
from modelguard.metrics import ServiceMetrics

log = logging.getLogger(__name__)

Behaviour = Callable[[Any, grpc.ServicerContext], Any]
Continuation = Callable[[grpc.HandlerCallDetails], "grpc.RpcMethodHandler[Any, Any] | None"]


_KEEP: Any = object()


class MethodInterceptor(grpc.ServerInterceptor):
    """An interceptor that wraps each method's handler once: subclasses implement
    `wrap` and do all per-call work inside the wrapped behaviour (read metadata from
    ``context.invocation_metadata()``, not from the handler call details)."""

    #: Wrapped handlers remembered (methods are few; the bound only guards misuse).
    MAX_CACHED = 4096

    def __init__(self) -> None:
        self._wrapped: dict[tuple[str, int], tuple[Any, Any]] = {}

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        raise NotImplementedError

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        key = (handler_call_details.method, id(handler))
        cached = self._wrapped.get(key)
        if cached is not None and cached[0] is handler:
            return cached[1]  # type: ignore[no-any-return]
        wrapped = self.wrap(handler_call_details.method, handler)
        if len(self._wrapped) < self.MAX_CACHED:
            self._wrapped[key] = (handler, wrapped)  # the handler is kept: ids stay unique
        return wrapped


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    wrap_unary: Callable[[Behaviour], Behaviour],
    wrap_stream: Callable[[Behaviour], Behaviour],
    request_deserializer: Any = _KEEP,
) -> grpc.RpcMethodHandler[Any, Any]:
    """Rebuild ``handler`` with its behaviour wrapped: ``wrap_unary`` for RPCs returning
    one response, ``wrap_stream`` for RPCs returning a stream (generator) of responses.
    ``request_deserializer`` replaces the handler's (None: raw bytes reach the wrapper)."""
    deserializer = (
        handler.request_deserializer if request_deserializer is _KEEP else request_deserializer
    )
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, wrap_unary),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, wrap_stream),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, wrap_unary),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, wrap_stream),
    )
    for attribute, factory, wrap in kinds:
        behaviour = getattr(handler, attribute)
        if behaviour is not None:
            return factory(
                wrap(behaviour),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


#: Longest error message sent back: gRPC refuses metadata above 16 KiB, and an error that
#: quotes a huge input would otherwise become a transport error instead of the real one.
MAX_MESSAGE_CHARS = 500


def _short(text: str) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return text[: MAX_MESSAGE_CHARS - 20] + f"… ({len(text)} chars)"


class ErrorInterceptor(MethodInterceptor):
    """Turns `ModelGuardError` into its status code with the error's message, and any other
    exception into INTERNAL with an id that matches the server log line. Requests are
    decoded here rather than by gRPC, so that undecodable bytes are INVALID_ARGUMENT (gRPC's
    own decoder answers INTERNAL)."""

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        decode = handler.request_deserializer

        def decoded(raw: Any) -> Any:
            if decode is None:
                return raw
            try:
                return decode(raw)
            except Exception as err:  # DecodeError, UnicodeDecodeError, …
                raise InvalidInput(f"request is not a valid {method} message: {err}") from None

        def decoded_stream(raws: Iterator[Any]) -> Iterator[Any]:
            for raw in raws:
                yield decoded(raw)

        def abort(context: grpc.ServicerContext, err: Exception) -> None:
            if isinstance(err, ModelGuardError):
                retry_after = getattr(err, "retry_after", None)
                if retry_after is not None:  # a machine-readable hint beside the message
                    context.set_trailing_metadata((("retry-after", f"{retry_after:.3f}"),))
                context.abort(err.code, _short(str(err)))
            incident = uuid.uuid4().hex[:12]
            log.exception("unhandled error in %s (incident %s)", method, incident)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")

        prepare = decoded_stream if handler.request_streaming else decoded

        def wrap_unary(behaviour: Behaviour) -> Behaviour:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return behaviour(prepare(request), context)
                except Exception as err:
                    if _is_abort(err):
                        raise
                    abort(context, err)

            return call

        def wrap_stream(behaviour: Behaviour) -> Behaviour:
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from behaviour(prepare(request), context)
                except Exception as err:
                    if _is_abort(err):
                        raise
                    abort(context, err)

            return call

        return wrap_handler(handler, wrap_unary, wrap_stream, request_deserializer=None)


def _is_abort(err: Exception) -> bool:
    # context.abort() raises a bare Exception subclass private to grpc; let it through.
    return type(err).__module__.startswith("grpc")


class MetricsInterceptor(MethodInterceptor):
    """Counts every RPC by method and final status code, and times it. The label children
    are bound once per method (a ``labels()`` look-up costs more than the increment)."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if method.startswith("/grpc."):
            return handler  # health checks and reflection would drown the figures
        name = method.rsplit("/", 1)[-1]
        requests = self.metrics.grpc_requests
        by_code = {"OK": requests.labels(name, "OK")}
        seconds = self.metrics.grpc_seconds.labels(name)
        clock = time.perf_counter

        def observe(context: grpc.ServicerContext, started: float) -> None:
            code = context.code()  # type: ignore[attr-defined]
            key = code.name if isinstance(code, grpc.StatusCode) else "OK"
            counter = by_code.get(key)
            if counter is None:
                counter = by_code[key] = requests.labels(name, key)
            counter.inc()
            seconds.observe(clock() - started)

        def wrap_unary(behaviour: Behaviour) -> Behaviour:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                started = clock()
                try:
                    return behaviour(request, context)
                finally:
                    observe(context, started)

            return call

        def wrap_stream(behaviour: Behaviour) -> Behaviour:
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                started = clock()
                try:
                    yield from behaviour(request, context)
                finally:
                    observe(context, started)

            return call

        return wrap_handler(handler, wrap_unary, wrap_stream)


class TracingInterceptor(MethodInterceptor):
    """A server span per call, continuing the caller's trace from the ``traceparent``
    metadata. While tracing is off (`modelguard.tracing.enabled`) when a method is
    wrapped, its handler is left as it is: no per-call cost. The calls of a service given
    a ratio (`sample_service`, for hot paths) are traced with that probability unless the
    caller's trace decides."""

    def __init__(self) -> None:
        super().__init__()
        self.ratios: dict[str, float] = {}

    def sample_service(self, service: str, ratio: float) -> None:
        """Trace only a share ``ratio`` of the calls of ``service`` (its full proto name);
        before its servicer is registered."""
        self.ratios[service] = ratio

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if method.startswith("/grpc.") or not tracing.enabled():
            return handler
        service, _, name = method.lstrip("/").partition("/")
        ratio = self.ratios.get(service)
        tracer = tracing.tracer() if ratio is None else tracing.sampled_tracer(ratio)
        span_name = method.lstrip("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}

        def start(context: grpc.ServicerContext) -> trace.Span:
            parent = tracing.context_from(tracing.metadata_carrier(context.invocation_metadata()))
            return tracer.start_span(
                span_name, context=parent, kind=SpanKind.SERVER, attributes=attributes
            )

        def end(span: trace.Span, context: grpc.ServicerContext) -> None:
            code = context.code()  # type: ignore[attr-defined]
            if not isinstance(code, grpc.StatusCode):  # None: the handler set no code
                code = grpc.StatusCode.OK
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code is not grpc.StatusCode.OK:
                details = context.details()  # type: ignore[attr-defined]
                span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details or ''}"))
            span.end()

        def wrap_unary(behaviour: Behaviour) -> Behaviour:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                span = start(context)
                try:
                    with trace.use_span(span, end_on_exit=False):
                        return behaviour(request, context)
                finally:
                    end(span, context)

            return call

        def wrap_stream(behaviour: Behaviour) -> Behaviour:
            # the span is current only while the handler runs for the next response, not
            # across the yields (the caller's context is not ours to change)
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                span = start(context)
                in_span = trace.set_span_in_context(span)
                try:
                    token = otel_context.attach(in_span)
                    try:
                        responses = iter(behaviour(request, context))
                    finally:
                        otel_context.detach(token)
                    while True:
                        token = otel_context.attach(in_span)
                        try:
                            response = next(responses)
                        except StopIteration:
                            return
                        finally:
                            otel_context.detach(token)
                        yield response
                finally:
                    end(span, context)

            return call

        return wrap_handler(handler, wrap_unary, wrap_stream)


def wrap_method(
    method: str,
    handler: grpc.RpcMethodHandler[Any, Any],
    interceptors: list[MethodInterceptor],
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` wrapped by ``interceptors``, the first outermost (as ``grpc.server``
    orders its interceptors)."""
    for interceptor in reversed(interceptors):
        handler = interceptor.wrap(method, handler)
    return handler
