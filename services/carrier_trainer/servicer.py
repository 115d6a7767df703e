"""Thin gRPC servicer of carrier-trainer."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from modelguard.auth import current_identity
from modelguard.carrier.records import FAILED, QUEUED, READY, REVOKED, TRAINING, CarrierRecord
from modelguard.convert import ref_to_proto
from modelguard.proto.modelguard.v1 import carrier_trainer_pb2, carrier_trainer_pb2_grpc, common_pb2
from modelguard.services.carrier_trainer.service import CarrierService, ref_from_dict
from modelguard.status import service_status

CHUNK = 1 << 20
STATES = {
    QUEUED: common_pb2.JOB_STATE_QUEUED,
    TRAINING: common_pb2.JOB_STATE_RUNNING,
    READY: common_pb2.JOB_STATE_SUCCEEDED,
    FAILED: common_pb2.JOB_STATE_FAILED,
    REVOKED: common_pb2.JOB_STATE_FAILED,
}


class CarrierTrainerServicer(carrier_trainer_pb2_grpc.CarrierTrainerServicer):
    def __init__(self, service: CarrierService) -> None:
        self.service = service

    def RequestCarrier(
        self, request: carrier_trainer_pb2.RequestCarrierRequest, context: grpc.ServicerContext
    ) -> carrier_trainer_pb2.RequestCarrierResponse:
        generation, credential = self.service.request(
            request.user_id, request.options, request.credential, current_identity()
        )
        return carrier_trainer_pb2.RequestCarrierResponse(
            user_id=request.user_id, generation=generation, credential=credential
        )

    def GetCarrier(
        self, request: carrier_trainer_pb2.GetCarrierRequest, context: grpc.ServicerContext
    ) -> carrier_trainer_pb2.CarrierInfo:
        record = self.service.authorised(request.user_id, request.credential, current_identity())
        return carrier_info(record)

    def RevokeCarrier(
        self, request: carrier_trainer_pb2.RevokeCarrierRequest, context: grpc.ServicerContext
    ) -> carrier_trainer_pb2.CarrierInfo:
        record = self.service.revoke(
            request.user_id, request.credential, request.reason, current_identity()
        )
        return carrier_info(record)

    def DownloadCarrier(
        self, request: carrier_trainer_pb2.DownloadCarrierRequest, context: grpc.ServicerContext
    ) -> Iterator[carrier_trainer_pb2.CarrierChunk]:
        data, media_type = self.service.download(
            request.user_id, request.credential, request.artifact
        )
        for start in range(0, max(len(data), 1), CHUNK):
            yield carrier_trainer_pb2.CarrierChunk(
                data=data[start : start + CHUNK], media_type=media_type
            )

    def UploadTaskData(
        self,
        request_iterator: Iterator[carrier_trainer_pb2.CarrierChunk],
        context: grpc.ServicerContext,
    ) -> common_pb2.ArtifactRef:
        ref = self.service.upload_task_data(
            ((c.data, c.media_type) for c in request_iterator), current_identity()
        )
        return ref_to_proto(ref)

    def GetStatus(
        self, request: common_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> common_pb2.ServiceStatus:
        return service_status(self.service.metrics)


def carrier_info(record: CarrierRecord) -> carrier_trainer_pb2.CarrierInfo:
    info = carrier_trainer_pb2.CarrierInfo(
        user_id=record.user_id, generation=record.generation, state=STATES[record.state]
    )
    for name in ("carrier", "carrier_png", "manifest"):
        if name in record.artifacts:
            ref = ref_to_proto(ref_from_dict(record.artifacts[name]))
            getattr(info, name).CopyFrom(ref)
            if record.signatures.get(name):
                info.signatures[ref.sha256] = record.signatures[name]
    if record.error or record.state == REVOKED:
        info.error.CopyFrom(
            common_pb2.ErrorDetail(
                code="FAILED_PRECONDITION",
                message=record.error or f"revoked: {record.revoked_reason}",
            )
        )
    return info
