"""Wiring of carrier-trainer: gRPC API and the carrier worker."""

from __future__ import annotations

from services.carrier_trainer.handler import CarrierHandler
from services.carrier_trainer.service import CarrierService
from services.carrier_trainer.servicer import CarrierTrainerServicer
from shared.config import CarrierTrainerSettings
from shared.metrics import ServiceMetrics
from shared.proto.modelguard.v1 import carrier_trainer_pb2_grpc
from shared.runtime import Runtime, ServiceApp
from shared.topics import CARRIER_REQUESTED, CARRIER_REVOKED

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
    from services.launcher import run_service

    run_service(NAME)


if __name__ == "__main__":
    main()
