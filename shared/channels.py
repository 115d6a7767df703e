"""Client channels to ModelGuard's gRPC APIs: plaintext or TLS (optionally with a client
certificate, for servers that require mTLS), carrying the caller's bearer token and, when
tracing is on, the caller's trace context."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc
from opentelemetry.trace import SpanKind

from modelguard import tracing
from modelguard.errors import InvalidInput


@dataclass(frozen=True)
class ClientTls:
    """TLS towards the server: ``ca_file`` verifies it (empty: the system's roots);
    ``cert_file`` and ``key_file`` are this client's certificate for mTLS."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @classmethod
    def of(cls, ca_file: str = "", cert_file: str = "", key_file: str = "") -> ClientTls | None:
        """None (plaintext) when no file is given."""
        if not (ca_file or cert_file or key_file):
            return None
        if bool(cert_file) != bool(key_file):
            raise InvalidInput("a client certificate needs both its cert and its key file")
        return cls(ca_file, cert_file, key_file)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "CA certificate"),
            private_key=_read(self.key_file, "client key"),
            certificate_chain=_read(self.cert_file, "client certificate"),
        )


def _read(path: str, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise InvalidInput(f"cannot read the {what} {path}: {err.strerror}") from None


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call. An interceptor rather than
    call credentials, because gRPC sends call credentials over TLS channels only."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> _CallDetails:
        return _with_metadata(details, [self._metadata])

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


def _with_metadata(details: Any, entries: Sequence[tuple[str, str]]) -> _CallDetails:
    return _CallDetails(
        details.method,
        details.timeout,
        [*(details.metadata or ()), *entries],
        details.credentials,
        getattr(details, "wait_for_ready", None),
        getattr(details, "compression", None),
    )


class TraceContextClient(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """A client span per call, whose context goes to the server as ``traceparent``
    metadata (the server's `modelguard.interceptors.TracingInterceptor` continues it).
    The span covers a blocking unary call whole; for the other kinds, the call's start."""

    def _call(self, continuation: Any, details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        with tracing.tracer().start_as_current_span(
            method.lstrip("/"), kind=SpanKind.CLIENT, attributes={"rpc.system": "grpc"}
        ):
            carrier = dict(tracing.inject_headers({}) or {})
            return continuation(_with_metadata(details, list(carrier.items())), request)

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return self._call(continuation, client_call_details, request)

    def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return self._call(continuation, client_call_details, request)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self._call(continuation, client_call_details, request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self._call(continuation, client_call_details, request_iterator)


def open_channel(
    target: str,
    *,
    token: str = "",
    tls: ClientTls | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    channel = (
        grpc.secure_channel(target, tls.credentials(), options=list(options))
        if tls is not None
        else grpc.insecure_channel(target, options=list(options))
    )
    if token:
        channel = grpc.intercept_channel(channel, BearerToken(token))
    if tracing.enabled():  # decided when the channel opens: no cost while tracing is off
        channel = grpc.intercept_channel(channel, TraceContextClient())
    return channel
