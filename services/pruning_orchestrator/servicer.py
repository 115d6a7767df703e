"""Thin gRPC servicer: protobuf in, Orchestrator call, protobuf out."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
from google.protobuf import json_format

from modelguard.auth import current_identity
from modelguard.convert import ref_from_proto, ref_to_proto
from modelguard.proto.modelguard.v1 import (
    common_pb2,
    pruning_orchestrator_pb2,
    pruning_orchestrator_pb2_grpc,
)
from modelguard.services.pruning_orchestrator.service import Orchestrator, ref_of
from modelguard.services.pruning_orchestrator.state import (
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    ArtifactRecord,
    AuditRecord,
)
from modelguard.status import service_status
from modelguard.topics import AUDIT_STAGES

DOWNLOAD_CHUNK = 1 << 20
STAGE_ORDER = {name: index for index, name in enumerate(AUDIT_STAGES)}
JOB_STATES = {
    QUEUED: common_pb2.JOB_STATE_QUEUED,
    RUNNING: common_pb2.JOB_STATE_RUNNING,
    SUCCEEDED: common_pb2.JOB_STATE_SUCCEEDED,
    FAILED: common_pb2.JOB_STATE_FAILED,
}
STAGE_STATES = {
    "not_run": common_pb2.STAGE_STATE_NOT_RUN,
    "pending": common_pb2.STAGE_STATE_PENDING,
    "running": common_pb2.STAGE_STATE_RUNNING,
    "done": common_pb2.STAGE_STATE_DONE,
    "failed": common_pb2.STAGE_STATE_FAILED,
    "skipped": common_pb2.STAGE_STATE_SKIPPED,
}


def _ref(record: ArtifactRecord | None) -> common_pb2.ArtifactRef:
    return ref_to_proto(ref_of(record)) if record else common_pb2.ArtifactRef()


def audit_to_proto(record: AuditRecord) -> pruning_orchestrator_pb2.Audit:
    audit = pruning_orchestrator_pb2.Audit(
        audit_id=record.audit_id,
        state=JOB_STATES[record.state],
        created_at=record.created_at,
        updated_at=record.updated_at,
        report_json=_ref(record.report_json),
        report_html=_ref(record.report_html),
        repaired_model=_ref(record.repaired_model),
    )
    for signed in (record.report_json, record.report_html, record.repaired_model):
        if signed is not None and signed.signature:
            audit.signatures[signed.sha256] = signed.signature
    json_format.ParseDict(record.model, audit.model)
    if record.error:
        audit.error.CopyFrom(
            common_pb2.ErrorDetail(code="FAILED_PRECONDITION", message=record.error)
        )
    ordered = sorted(record.stages.values(), key=lambda s: STAGE_ORDER.get(s.name, 99))
    for stage in ordered:
        status = audit.stages.add(
            stage=stage.name,
            state=STAGE_STATES[stage.state],
            progress=stage.progress,
            message=stage.message,
            result=_ref(stage.result),
            summary_json=json.dumps(stage.summary) if stage.summary else "",
        )
        if stage.error:
            status.error.CopyFrom(
                common_pb2.ErrorDetail(code=stage.error_code, message=stage.error, stage=stage.name)
            )
    return audit


class PruningOrchestratorServicer(pruning_orchestrator_pb2_grpc.PruningOrchestratorServicer):
    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator

    def UploadArtifact(
        self,
        request_iterator: Iterator[pruning_orchestrator_pb2.UploadChunk],
        context: grpc.ServicerContext,
    ) -> common_pb2.ArtifactRef:
        ref = self.orchestrator.upload(
            ((c.data, c.media_type) for c in request_iterator), current_identity()
        )
        return ref_to_proto(ref)

    def SubmitAudit(
        self, request: pruning_orchestrator_pb2.SubmitAuditRequest, context: grpc.ServicerContext
    ) -> pruning_orchestrator_pb2.Audit:
        record = self.orchestrator.submit(
            request.model,
            request.data,
            request.options,
            idempotency_key=request.idempotency_key,
            caller=current_identity(),
        )
        return audit_to_proto(record)

    def GetAudit(
        self, request: pruning_orchestrator_pb2.GetAuditRequest, context: grpc.ServicerContext
    ) -> pruning_orchestrator_pb2.Audit:
        return audit_to_proto(self.orchestrator.get(request.audit_id, current_identity()))

    def WatchAudit(
        self, request: pruning_orchestrator_pb2.GetAuditRequest, context: grpc.ServicerContext
    ) -> Iterator[pruning_orchestrator_pb2.Audit]:
        caller = current_identity()
        for record in self.orchestrator.watch(request.audit_id, context.is_active, caller):
            yield audit_to_proto(record)

    def ListAudits(
        self, request: pruning_orchestrator_pb2.ListAuditsRequest, context: grpc.ServicerContext
    ) -> pruning_orchestrator_pb2.ListAuditsResponse:
        records = self.orchestrator.list(request.limit, current_identity())
        return pruning_orchestrator_pb2.ListAuditsResponse(
            audits=[audit_to_proto(r) for r in records]
        )

    def DownloadArtifact(
        self, request: common_pb2.ArtifactRef, context: grpc.ServicerContext
    ) -> Iterator[pruning_orchestrator_pb2.UploadChunk]:
        data = self.orchestrator.download(ref_from_proto(request), current_identity())
        for start in range(0, max(len(data), 1), DOWNLOAD_CHUNK):
            yield pruning_orchestrator_pb2.UploadChunk(
                data=data[start : start + DOWNLOAD_CHUNK], media_type=request.media_type
            )

    def GetPublicKey(
        self, request: pruning_orchestrator_pb2.GetPublicKeyRequest, context: grpc.ServicerContext
    ) -> pruning_orchestrator_pb2.PublicKey:
        key = self.orchestrator.public_key()
        return pruning_orchestrator_pb2.PublicKey(
            algorithm=key.algorithm,
            key_id=key.key_id,
            public_key_pem=key.pem,
            development_key=key.development,
        )

    def GetStatus(
        self, request: common_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> common_pb2.ServiceStatus:
        return service_status(self.orchestrator.metrics)
