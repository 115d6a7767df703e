"""gRPC server interceptors: error mapping (one place where the project's errors become
status codes) and request metrics."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from shared.errors import ModelGuardError
from shared.metrics import ServiceMetrics

log = logging.getLogger(__name__)

Behaviour = Callable[[Any, grpc.ServicerContext], Any]
Continuation = Callable[[grpc.HandlerCallDetails], "grpc.RpcMethodHandler[Any, Any] | None"]


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    wrap_unary: Callable[[Behaviour], Behaviour],
    wrap_stream: Callable[[Behaviour], Behaviour],
) -> grpc.RpcMethodHandler[Any, Any]:
    """Rebuild ``handler`` with its behaviour wrapped: ``wrap_unary`` for RPCs returning
    one response, ``wrap_stream`` for RPCs returning a stream (generator) of responses."""
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
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns `ModelGuardError` into its status code with the error's message, and any other
    exception into INTERNAL with an id that matches the server log line."""

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def abort(context: grpc.ServicerContext, err: Exception) -> None:
            if isinstance(err, ModelGuardError):
                context.abort(err.code, str(err))
            incident = uuid.uuid4().hex[:12]
            log.exception("unhandled error in %s (incident %s)", method, incident)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")

        def wrap_unary(behaviour: Behaviour) -> Behaviour:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return behaviour(request, context)
                except Exception as err:
                    if _is_abort(err):
                        raise
                    abort(context, err)

            return call

        def wrap_stream(behaviour: Behaviour) -> Behaviour:
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from behaviour(request, context)
                except Exception as err:
                    if _is_abort(err):
                        raise
                    abort(context, err)

            return call

        return wrap_handler(handler, wrap_unary, wrap_stream)


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
