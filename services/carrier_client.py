"""Client of carrier-trainer and result-mapper for the CLI, the demo and tests: enrol,
wait for the carrier, build a device (`modelguard.services.client.DeviceClient`) that maps through
the result-mapper over gRPC."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from modelguard.channels import ClientTls, open_channel
from modelguard.errors import ModelGuardError, NotFound, Unavailable
from modelguard.proto.modelguard.v1 import (
    carrier_trainer_pb2,
    carrier_trainer_pb2_grpc,
    common_pb2,
    jobs_pb2,
    result_mapper_pb2,
    result_mapper_pb2_grpc,
)
from modelguard.services.audit_client import error_from_rpc, upload_chunks
from modelguard.services.client import DeviceClient, MapReply, connect, decode_map_reply

FINAL = (common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED)


class CarrierClient:
    """``token``: the bearer token sent with every call (an admin's to enrol users);
    ``tls``: TLS/mTLS towards both servers (None: plaintext)."""

    def __init__(
        self,
        trainer: str,
        mapper: str,
        timeout: float = 60.0,
        *,
        token: str = "",
        tls: ClientTls | None = None,
    ) -> None:
        self.trainer_channel = open_channel(trainer, token=token, tls=tls)
        self.mapper_channel = open_channel(mapper, token=token, tls=tls)
        self.trainer = carrier_trainer_pb2_grpc.CarrierTrainerStub(self.trainer_channel)
        self.mapper = result_mapper_pb2_grpc.ResultMapperStub(self.mapper_channel)
        self.timeout = timeout

    def close(self) -> None:
        self.trainer_channel.close()
        self.mapper_channel.close()

    def __enter__(self) -> CarrierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, user_id: str, credential: str = "", options: jobs_pb2.CarrierOptions | None = None
    ) -> tuple[int, str]:
        """Enrol (no credential) or rotate (current credential); returns the generation and
        the new credential."""
        try:
            reply = self.trainer.RequestCarrier(
                carrier_trainer_pb2.RequestCarrierRequest(
                    user_id=user_id, credential=credential, options=options
                ),
                timeout=self.timeout,
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        return reply.generation, reply.credential

    def upload_task_data(self, data: bytes) -> common_pb2.ArtifactRef:
        """Send a team's labelled task dataset (.npz bytes); the reference goes in
        ``CarrierOptions.task_data``."""
        chunks = upload_chunks(data, "application/x-npz", carrier_trainer_pb2.CarrierChunk)
        try:
            return self.trainer.UploadTaskData(chunks, timeout=self.timeout)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    def revoke(
        self, user_id: str, credential: str = "", reason: str = ""
    ) -> carrier_trainer_pb2.CarrierInfo:
        """Revoke the user's carrier now (its credential, or an admin token without it)."""
        try:
            return self.trainer.RevokeCarrier(
                carrier_trainer_pb2.RevokeCarrierRequest(
                    user_id=user_id, credential=credential, reason=reason
                ),
                timeout=self.timeout,
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    def info(self, user_id: str, credential: str) -> carrier_trainer_pb2.CarrierInfo:
        try:
            return self.trainer.GetCarrier(
                carrier_trainer_pb2.GetCarrierRequest(user_id=user_id, credential=credential),
                timeout=self.timeout,
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    def wait_ready(
        self,
        user_id: str,
        credential: str,
        timeout: float = 1800.0,
        on_wait: Callable[[carrier_trainer_pb2.CarrierInfo], None] | None = None,
    ) -> carrier_trainer_pb2.CarrierInfo:
        """Poll GetCarrier until the carrier is trained (training takes minutes)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.info(user_id, credential)
            if info.state in FINAL:
                if info.state == common_pb2.JOB_STATE_FAILED:
                    raise ModelGuardError(f"carrier of {user_id!r} failed: {info.error.message}")
                return info
            if time.monotonic() > deadline:
                raise Unavailable(f"carrier of {user_id!r} not ready after {timeout:.0f} s")
            if on_wait is not None:
                on_wait(info)
            time.sleep(1.0)

    def download(self, user_id: str, credential: str, artifact: str) -> bytes:
        try:
            return b"".join(
                chunk.data
                for chunk in self.trainer.DownloadCarrier(
                    carrier_trainer_pb2.DownloadCarrierRequest(
                        user_id=user_id, credential=credential, artifact=artifact
                    ),
                    timeout=self.timeout,
                )
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    def map(self, user_id: str, credential: str, pseudo: bytes, rows: int) -> MapReply:
        try:
            reply = self.mapper.Map(
                result_mapper_pb2.MapRequest(
                    user_id=user_id, credential=credential, pseudo_output=pseudo, rows=rows
                ),
                timeout=self.timeout,
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        return decode_map_reply(
            list(reply.labels), reply.probabilities, reply.classes, reply.generation
        )

    def device(self, user_id: str, credential: str) -> DeviceClient:
        """A device for ``user_id``: downloads the carrier, loads the public model it was
        trained for, and maps through this result-mapper."""
        return connect(
            user_id,
            lambda user: (self.download(user, credential, "carrier"), credential),
            self.map,
        )

    def classify_when_loaded(
        self, device: DeviceClient, x: object, timeout: float = 30.0
    ) -> MapReply:
        """The first Map after a carrier becomes ready may race the mapper's hot-load."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return device.classify(x)  # type: ignore[arg-type]
            except NotFound:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
