"""gRPC server interceptors: error mapping (one place where the project's errors become
status codes) and request metrics.

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
