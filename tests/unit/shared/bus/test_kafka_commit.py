"""The Kafka subscription's commit after a handled record: when the commit fails, the
record is rewound so it is delivered again, never left behind the fetch position
uncommitted. No broker: the consumer is a stand-in that records seeks."""

from __future__ import annotations

from typing import Any

import pytest
from kafka import TopicPartition
from kafka.errors import CommitFailedError, KafkaError, RequestTimedOutError

from modelguard.bus.base import Message, RetryPolicy
from modelguard.bus.kafka import KafkaBus, KafkaSubscription, _InFlight

PARTITION = TopicPartition("mg.test.jobs", 1)
OFFSET = 7


class _Consumer:
    """Kept its partition across a rebalance: the position is already past the record."""

    def __init__(self, failures: list[KafkaError]) -> None:
        self.failures = failures
        self.commits = 0
        self.seeks: list[tuple[TopicPartition, int]] = []

    def commit(self, offsets: dict[TopicPartition, Any], **_: Any) -> None:
        self.commits += 1
        if self.failures:
            raise self.failures.pop(0)

    def assignment(self) -> set[TopicPartition]:
        return {PARTITION}

    def position(self, tp: TopicPartition, **_: Any) -> int:
        return OFFSET + 1

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))


def _commit(failures: list[KafkaError]) -> _Consumer:
    retry = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.001)
    subscription = KafkaSubscription(
        KafkaBus("127.0.0.1:1"), [PARTITION.topic], "commit-group", lambda m: None, retry, None
    )
    message = Message(topic=PARTITION.topic, value=b"job", partition=1, offset=OFFSET)
    consumer = _Consumer(failures)
    subscription._commit(consumer, _InFlight(record=None, message=message, partition=PARTITION))
    return consumer


def test_a_committed_record_is_not_rewound() -> None:
    consumer = _commit([])
    assert consumer.commits == 1
    assert consumer.seeks == []


def test_a_retriable_failure_is_retried_then_committed() -> None:
    consumer = _commit([RequestTimedOutError()])
    assert consumer.commits == 2
    assert consumer.seeks == []


@pytest.mark.parametrize(
    "failures",
    [[CommitFailedError()], [RequestTimedOutError()] * 5],
    ids=["rejected by a rebalance", "retries exhausted"],
)
def test_a_failed_commit_rewinds_the_record_for_redelivery(failures: list[KafkaError]) -> None:
    consumer = _commit(list(failures))
    assert consumer.seeks == [(PARTITION, OFFSET)]
