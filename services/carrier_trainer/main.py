"""Wiring of carrier-trainer: gRPC API and the carrier worker."""

from __future__ import annotations

from modelguard.config import CarrierTrainerSettings
from modelguard.metrics import ServiceMetrics
from modelguard.proto.modelguard.v1 import carrier_trainer_pb2_grpc
from modelguard.runtime import Runtime, ServiceApp
from modelguard.services.carrier_trainer.handler import CarrierHandler
from modelguard.services.carrier_trainer.service import CarrierService
from modelguard.services.carrier_trainer.servicer import CarrierTrainerServicer
from modelguard.topics import CARRIER_REQUESTED, CARRIER_REVOKED

NAME = "carrier-trainer"


def build(
    settings: CarrierTrainerSettings, runtime: Runtime, metrics: ServiceMetrics
) -> ServiceApp:
    service = CarrierService(runtime, settings, metrics)
    app = ServiceApp(NAME, settings, runtime, metrics)
    app.components["service"] = service
    app.add_servicer(
        carrier_trainer_pb2_grpc.add_CarrierTrainerServicer_to_server,
        CarrierTrainerServicer(service),
        "modelguard.v1.CarrierTrainer",
    )
    app.add_worker([CARRIER_REQUESTED, CARRIER_REVOKED], CarrierHandler(service))
    return app


def main() -> None:
    from modelguard.services.launcher import run_service

    run_service(NAME)


if __name__ == "__main__":
    main()
