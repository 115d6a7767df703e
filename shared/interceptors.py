"""gRPC server interceptors: error mapping (one place where the project's errors become
status codes) and request metrics."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from shared.errors import InvalidInput, ModelGuardError
from shared.metrics import ServiceMetrics

log = logging.getLogger(__name__)

Behaviour = Callable[[Any, grpc.ServicerContext], Any]
Continuation = Callable[[grpc.HandlerCallDetails], "grpc.RpcMethodHandler[Any, Any] | None"]


_KEEP: Any = object()


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


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns `ModelGuardError` into its status code with the error's message, and any other
    exception into INTERNAL with an id that matches the server log line. Requests are
    decoded here rather than by gRPC, so that undecodable bytes are INVALID_ARGUMENT (gRPC's
    own decoder answers INTERNAL)."""

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
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

        def prepare(request: Any) -> Any:
            streaming = handler.request_streaming
            return decoded_stream(request) if streaming else decoded(request)

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


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every RPC by method and final status code, and times it."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith("/grpc."):
            return handler  # health checks and reflection would drown the figures
        method = handler_call_details.method.rsplit("/", 1)[-1]
        metrics = self.metrics

        def observe(context: grpc.ServicerContext, started: float) -> None:
            code = context.code()  # type: ignore[attr-defined]
            name = code.name if isinstance(code, grpc.StatusCode) else "OK"
            metrics.grpc_requests.labels(method, name).inc()
            metrics.grpc_seconds.labels(method).observe(time.perf_counter() - started)

        def wrap_unary(behaviour: Behaviour) -> Behaviour:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                started = time.perf_counter()
                try:
                    return behaviour(request, context)
                finally:
                    observe(context, started)

            return call

        def wrap_stream(behaviour: Behaviour) -> Behaviour:
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                started = time.perf_counter()
                try:
                    yield from behaviour(request, context)
                finally:
                    observe(context, started)

            return call

        return wrap_handler(handler, wrap_unary, wrap_stream)
