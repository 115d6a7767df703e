"""Kafka handlers of carrier-trainer: train requested carriers; record revocations."""

from __future__ import annotations

from modelguard.bus.base import Message
from modelguard.convert import parse_message
from modelguard.errors import InvalidInput
from modelguard.logs import job_context
from modelguard.proto.modelguard.v1 import jobs_pb2
from modelguard.services.carrier_trainer.service import CarrierService
from modelguard.store.encryption import writing_for
from modelguard.topics import CARRIER_REVOKED


class CarrierHandler:
    def __init__(self, service: CarrierService) -> None:
        self.service = service

    def __call__(self, message: Message) -> None:
        if message.topic == CARRIER_REVOKED:
            self.service.on_revoked(parse_message(message.value, jobs_pb2.CarrierRevoked))
            return
        job = parse_message(message.value, jobs_pb2.CarrierRequested)
        if not job.user_id or job.generation < 1:
            raise InvalidInput("CarrierRequested needs a user id and a generation >= 1")
        # its carrier and mapper are encrypted with its key; its logs carry the tenant
        with (
            writing_for(job.tenant),
            job_context(stage="carrier-trainer", tenant=job.tenant, attempt=message.attempt),
        ):
            self.service.train(job)
