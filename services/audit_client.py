"""A small client of the pruning-orchestrator's gRPC API, used by the CLI and the demo:
upload, submit, watch, fetch artifacts."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc

from modelguard.channels import ClientTls, open_channel
from modelguard.convert import FORMAT_TO_PROTO, spec_to_proto
from modelguard.errors import (
    IntegrityError,
    InvalidInput,
    ModelGuardError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from modelguard.formats.registry import get_format
from modelguard.proto.modelguard.v1 import (
    common_pb2,
    jobs_pb2,
    pruning_orchestrator_pb2,
    pruning_orchestrator_pb2_grpc,
)
from modelguard.signing import PublishedKey, signature_path
from modelguard.spec import InputSpec

UPLOAD_CHUNK = 1 << 20
Chunk = TypeVar("Chunk")


def upload_chunks(data: bytes, media_type: str, chunk: Callable[..., Chunk]) -> Iterator[Chunk]:
    """``data`` as the messages of a client-streamed upload (``chunk(data=, media_type=)``),
    the media type on the first."""
    for start in range(0, max(len(data), 1), UPLOAD_CHUNK):
        yield chunk(
            data=data[start : start + UPLOAD_CHUNK], media_type=media_type if start == 0 else ""
        )


#: Status codes after which a watch reconnects: the server is down or restarting
#: (CANCELLED: a stopping server cancels the streams it still serves).
RECONNECT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
RECONNECT_INITIAL_S = 0.2
RECONNECT_MAX_S = 2.0
T = TypeVar("T")
STATUS_ERRORS: dict[grpc.StatusCode, type[ModelGuardError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DATA_LOSS: IntegrityError,
}


def error_from_rpc(err: grpc.RpcError) -> ModelGuardError:
    """The server's error as the project's own type, with the server's message."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    kind = STATUS_ERRORS.get(code, ModelGuardError)
    if kind is ResourceExhausted:
        trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
        hints = [str(m.value) for m in trailers or () if m.key == "retry-after"]
        return ResourceExhausted(details or code.name, float(hints[0]) if hints else None)
    return kind(details or code.name)


def sniff_format(data: bytes) -> str:
    """The model file's format (registry name), after the full scan: an unsafe file is
    refused here, before it is uploaded."""
    from modelguard.formats.scan import scan_model_bytes

    return scan_model_bytes(data).kind


class AuditClient:
    """``token``: the tenant's bearer token (servers with authentication on refuse calls
    without one); ``tls``: TLS/mTLS towards the server (None: plaintext)."""

    def __init__(
        self,
        target: str,
        timeout: float = 60.0,
        *,
        token: str = "",
        tls: ClientTls | None = None,
    ) -> None:
        self.channel = open_channel(
            target,
            token=token,
            tls=tls,
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
            ],
        )
        self.stub = pruning_orchestrator_pb2_grpc.PruningOrchestratorStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> AuditClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def upload(self, data: bytes, media_type: str) -> common_pb2.ArtifactRef:
        chunks = upload_chunks(data, media_type, pruning_orchestrator_pb2.UploadChunk)
        try:
            return self.stub.UploadArtifact(chunks, timeout=self.timeout)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    def submit(
        self,
        model_path: Path,
        data: Path | bytes,
        spec: InputSpec,
        *,
        arch: str = "",
        options: jobs_pb2.AuditOptions | None = None,
        idempotency_key: str = "",
        reference: Path | None = None,
    ) -> pruning_orchestrator_pb2.Audit:
        """Upload the model and the clean data (an .npz file, or the bytes of one the CLI
        made from a folder of images), and ``reference`` (the model the submitted one was
        fine-tuned from, `AuditOptions.reference_model`) when given, and submit the
        audit."""
        model_bytes = _read(model_path, "model")
        data_bytes = data if isinstance(data, bytes) else _read(data, "dataset")
        reference_bytes = None if reference is None else _read(reference, "reference model")
        fmt = get_format(sniff_format(model_bytes))
        # an unsafe or unknown reference is refused here too, before any upload
        reference_type = None if reference_bytes is None else sniff_format(reference_bytes)
        model_ref = self.upload(model_bytes, fmt.media_type)
        data_ref = self.upload(data_bytes, "application/x-npz")
        if reference_bytes is not None and reference_type is not None:
            options = jobs_pb2.AuditOptions() if options is None else _copied(options)
            options.reference_model.CopyFrom(
                self.upload(reference_bytes, get_format(reference_type).media_type)
            )
        model = common_pb2.ModelSpec(
            artifact=model_ref,
            format=FORMAT_TO_PROTO[fmt.name],
            arch=arch,
            input=spec_to_proto(spec),
        )
        if not idempotency_key:
            # resubmitting the same files and options returns the same audit
            digest = hashlib.sha256(model_ref.sha256.encode() + data_ref.sha256.encode())
            digest.update((options or jobs_pb2.AuditOptions()).SerializeToString())
            digest.update(repr(spec.to_dict()).encode() + arch.encode())
            idempotency_key = digest.hexdigest()
        request = pruning_orchestrator_pb2.SubmitAuditRequest(
            model=model, data=data_ref, options=options, idempotency_key=idempotency_key
        )
        return self._call(self.stub.SubmitAudit, request)

    def get(self, audit_id: str) -> pruning_orchestrator_pb2.Audit:
        return self._call(
            self.stub.GetAudit, pruning_orchestrator_pb2.GetAuditRequest(audit_id=audit_id)
        )

    def list(self, limit: int = 50) -> list[pruning_orchestrator_pb2.Audit]:
        response = self._call(
            self.stub.ListAudits, pruning_orchestrator_pb2.ListAuditsRequest(limit=limit)
        )
        return list(response.audits)

    def watch(self, audit_id: str) -> Iterator[pruning_orchestrator_pb2.Audit]:
        """Stream updates until the audit is final, across orchestrator restarts: a
        broken stream, or one that ends before the audit is final (a graceful shutdown
        ends it cleanly), is opened again with backoff; an update already yielded is not
        repeated. Raises `Unavailable` after ``timeout`` seconds without a stream."""
        request = pruning_orchestrator_pb2.GetAuditRequest(audit_id=audit_id)
        last = b""
        delay = RECONNECT_INITIAL_S
        give_up: float | None = None
        while True:
            try:
                for audit in self.stub.WatchAudit(request):
                    delay, give_up = RECONNECT_INITIAL_S, None
                    seen = audit.SerializeToString(deterministic=True)
                    if seen != last:  # a reconnect starts with the current state again
                        last = seen
                        yield audit
                    if audit.state in (common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED):
                        return
            except grpc.RpcError as err:
                if err.code() not in RECONNECT_CODES:
                    raise error_from_rpc(err) from None
                reason = f"{err.code().name}: {err.details()}"
            else:
                reason = "the stream ended before the audit was final"
            now = time.monotonic()
            give_up = give_up or now + self.timeout
            if now >= give_up:
                raise Unavailable(
                    f"lost the watch of audit {audit_id}: no stream from the orchestrator "
                    f"for {self.timeout:.0f} s ({reason})"
                )
            time.sleep(delay)  # backoff: a restarting server refuses calls for a while
            delay = min(delay * 2, RECONNECT_MAX_S)

    def download(self, ref: common_pb2.ArtifactRef) -> bytes:
        try:
            return b"".join(c.data for c in self.stub.DownloadArtifact(ref, timeout=self.timeout))
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    def public_key(self) -> PublishedKey:
        """The public key that verifies the deployment's signatures."""
        key = self._call(self.stub.GetPublicKey, pruning_orchestrator_pb2.GetPublicKeyRequest())
        return PublishedKey(key.algorithm, key.key_id, key.public_key_pem, key.development_key)

    def _call(self, method: Callable[..., T], request: object) -> T:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None


def write_signed(
    audit: pruning_orchestrator_pb2.Audit, ref: common_pb2.ArtifactRef, path: Path, data: bytes
) -> list[Path]:
    """Write a downloaded artifact of ``audit`` to ``path`` and, for a signed one (reports,
    repaired model), its signature document to ``path.sig``, where `modelguard verify`
    looks by default. Returns the files written."""
    path.write_bytes(data)
    signature = audit.signatures.get(ref.sha256, "")
    if not signature:
        return [path]
    signature_file = signature_path(path)
    signature_file.write_text(signature + "\n", encoding="utf-8")
    return [path, signature_file]


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise InvalidInput(f"cannot read the {what} file {path}: {err.strerror}") from None


def _copied(options: jobs_pb2.AuditOptions) -> jobs_pb2.AuditOptions:
    copy = jobs_pb2.AuditOptions()
    copy.CopyFrom(options)
    return copy
