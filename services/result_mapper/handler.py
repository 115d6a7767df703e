"""Kafka handler of result-mapper: hot-load mappers on carrier-ready, revoke on revoked."""

from __future__ import annotations

from modelguard.bus.base import Message
from modelguard.services.result_mapper.service import ResultMapperService


class CarrierEventsHandler:
    def __init__(self, service: ResultMapperService) -> None:
        self.service = service

    def __call__(self, message: Message) -> None:
        self.service.on_event(message.topic, message.value)
