"""The gRPC server runner every service uses: health service, server reflection, error,
metrics and (optional) authentication interceptors, optional TLS/mTLS, the /metrics
endpoint, and graceful shutdown on SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from modelguard.auth import AuthInterceptor, TokenStore
from modelguard.errors import InvalidInput
from modelguard.executor import CallExecutor
from modelguard.interceptors import (
    ErrorInterceptor,
    MethodInterceptor,
    MetricsInterceptor,
    TracingInterceptor,
    wrap_method,
)
from modelguard.metrics import ServiceMetrics, serve_metrics

log = logging.getLogger(__name__)

#: Messages up to this size (uploads are chunked far below it; Map batches stay small).
MAX_MESSAGE_BYTES = 64 << 20


@dataclass(frozen=True)
class ServerTls:
    """Server certificate and key; with ``client_ca_file``, clients must present a
    certificate signed by that CA (mTLS) or the handshake fails."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""

    @classmethod
    def of(cls, cert_file: str, key_file: str, client_ca_file: str = "") -> ServerTls | None:
        """None (plaintext) when no file is given; refuses half a configuration, since a
        server that silently fell back to plaintext would be worse than one that fails."""
        if not (cert_file or key_file or client_ca_file):
            return None
        if not (cert_file and key_file):
            raise InvalidInput(
                "TLS needs both MODELGUARD_TLS_CERT_FILE and MODELGUARD_TLS_KEY_FILE"
            )
        return cls(cert_file, key_file, client_ca_file)

    def credentials(self) -> grpc.ServerCredentials:
        def read(path: str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as err:
                raise InvalidInput(f"cannot read TLS file {path}: {err.strerror}") from None

        ca = read(self.client_ca_file) if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(read(self.key_file), read(self.cert_file))],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


class GrpcServer:
    """One gRPC server with health and reflection; ``register`` adds servicers before
    ``start``. The health status of every registered service follows ``set_serving``."""

    def __init__(
        self,
        metrics: ServiceMetrics,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        workers: int = 8,
        metrics_port: int = 0,
        tokens: TokenStore | None = None,
        tls: ServerTls | None = None,
    ) -> None:
        self.metrics = metrics
        self.host = host
        self._requested_port = port
        self._metrics_port = metrics_port
        self.tls = tls
        # Outermost first: metrics count refusals too; authentication runs before the
        # error interceptor decodes the request, so strangers never reach a parser. They
        # wrap each method's handler once, at registration (`_Wrapping`), not per call.
        #: a server span per call (when tracing is on); see `register`'s ``trace_ratio``
        self.tracing = TracingInterceptor()
        interceptors: list[MethodInterceptor] = [MetricsInterceptor(metrics), self.tracing]
        if tokens is not None:
            interceptors.append(AuthInterceptor(tokens))
        interceptors.append(ErrorInterceptor())
        # grpcio types the pool as a ThreadPoolExecutor; it only calls submit() and the
        # result's add_done_callback(), which CallExecutor provides with less per call
        self._executor = CallExecutor(workers, thread_name_prefix=metrics.service)
        self._grpc_server = grpc.server(
            self._executor,  # type: ignore[arg-type]
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        #: What servicers are added to: the gRPC server, with every handler wrapped.
        self.server: grpc.Server = _Wrapping(self._grpc_server, interceptors)  # type: ignore[assignment]
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = [health.SERVICE_NAME, reflection.SERVICE_NAME]
        self.port = 0
        self.metrics_port = 0
        self._metrics_server: Any = None

    def register(
        self,
        add_to_server: Callable[[Any, grpc.Server], None],
        servicer: Any,
        full_name: str,
        *,
        trace_ratio: float | None = None,
    ) -> None:
        """``add_to_server`` is the generated ``add_XServicer_to_server``; ``full_name``
        the service's full proto name (for health and reflection). ``trace_ratio``: the
        share of calls traced, for a hot path (None: the process's sampler decides)."""
        if trace_ratio is not None:
            self.tracing.sample_service(full_name, trace_ratio)
        add_to_server(servicer, self.server)
        self._service_names.append(full_name)

    def start(self) -> None:
        reflection.enable_server_reflection(self._service_names, self.server)
        address = f"{self.host}:{self._requested_port}"
        if self.tls is not None:
            self.port = self._grpc_server.add_secure_port(address, self.tls.credentials())
        else:
            self.port = self._grpc_server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"cannot bind gRPC port {self.host}:{self._requested_port}")
        self._grpc_server.start()
        if self._metrics_port >= 0:
            self._metrics_server, self.metrics_port = serve_metrics(
                self.metrics.registry, self.host, self._metrics_port
            )
        self.set_serving(True)
        log.info(
            "%s gRPC%s on %s:%d, metrics on :%d",
            self.metrics.service,
            "" if self.tls is None else (" (mTLS)" if self.tls.client_ca_file else " (TLS)"),
            self.host,
            self.port,
            self.metrics_port,
        )

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self._service_names):
            self.health.set(name, status)

    def stop(self, grace: float = 5.0) -> None:
        self.set_serving(False)
        self._grpc_server.stop(grace).wait(grace + 1)
        self._executor.shutdown(wait=False)  # calls still running past the grace finish
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose method handlers come out wrapped (each once)."""

    def __init__(self, inner: grpc.GenericRpcHandler, interceptors: list[MethodInterceptor]):
        self.inner = inner
        self.interceptors = interceptors
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self.inner.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, wrap_method(method, handler, self.interceptors))
            if len(self._wrapped) < MethodInterceptor.MAX_CACHED:
                self._wrapped[method] = cached
        return cached[1]


class _Wrapping:
    """The gRPC server as servicers see it (``add_XServicer_to_server(servicer, server)``):
    registration wraps every method handler with the interceptors once, and everything
    else goes to the real server. A call then costs the wrappers only, where grpc's
    interceptor pipeline would run every interceptor's ``intercept_service`` and rebuild
    the handler on every call."""

    def __init__(self, server: grpc.Server, interceptors: list[MethodInterceptor]) -> None:
        self._server = server
        self._interceptors = interceptors

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_WrappedGeneric(handler, self._interceptors) for handler in handlers)
        )

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self._server.add_registered_method_handlers(
            service,
            {
                name: wrap_method(f"/{service}/{name}", handler, self._interceptors)
                for name, handler in handlers.items()
            },
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def wait_for_termination(
    stop: Callable[[], None], signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)
) -> None:
    """Block until SIGTERM/SIGINT, then call ``stop`` (which drains gracefully)."""
    done = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        done.set()

    for sig in signals:
        signal.signal(sig, on_signal)
    done.wait()
    stop()
