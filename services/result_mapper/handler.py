"""Kafka handler of result-mapper: hot-load mappers on carrier-ready, revoke on revoked."""

from __future__ import annotations

from services.result_mapper.service import ResultMapperService
from shared.bus.base import Message


class CarrierEventsHandler:
    def __init__(self, service: ResultMapperService) -> None:
        self.service = service

    def __call__(self, message: Message) -> None:
        self.service.on_event(message.topic, message.value)
