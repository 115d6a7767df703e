"""`KafkaBus`: the job bus on a Kafka-API broker (Tansu in tests and demos) via kafka-python.

Publishing waits for the broker's acknowledgement (``acks="all"``) within a bounded time
and turns any failure into `Unavailable`. Each subscription owns one consumer thread; the
handler runs on a separate thread so that the consumer keeps polling (with its partitions
paused) while a long job runs: the member stays in the group, and `stop()` can leave the
group even when a handler hangs, which hands the uncommitted record to another member.
Offsets are committed one record at a time, after the handler returned or the record was
dead-lettered. Retries and dead-lettering follow `modelguard.bus.memory.deliver`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from modelguard.bus.base import Handler, Message, RetryPolicy, dead_letter_topic
from modelguard.bus.memory import (
    DEFAULT_STOP_GRACE_S,
    Delivery,
    Outcome,
    check_subscription,
    check_topic,
    dead_letter_headers,
    deliver,
)
from modelguard.bus.metrics import BusMetrics
from modelguard.bus.security import KafkaSecurity
from modelguard.errors import InvalidInput, Unavailable
from modelguard.tracing import inject_headers

log = logging.getLogger(__name__)

#: Kafka's error code for "topic already exists" in a CreateTopics response.
_TOPIC_ALREADY_EXISTS = 36
#: Consumer poll timeout: bounds how long `stop()` waits for an idle consumer to notice.
_POLL_MS = 200
#: Delay before a consumer that lost the broker tries to reconnect.
_RECONNECT_BACKOFF_S = 1.0
#: How often the watchdog looks at the consumer threads.
_WATCHDOG_INTERVAL_S = 2.0


class KafkaBus:
    """The JobBus on Kafka; see the module docstring.

    ``timeout_s`` bounds every blocking broker call made for a caller (connect, publish,
    topic creation): an unreachable broker gives `Unavailable` after about that long.
    ``partitions`` is used for topics the bus creates itself (on subscribe).
    ``max_poll_interval_ms`` is also the group's rebalance timeout; the consumer polls
    every 200 ms even while a handler runs, so handlers may take longer than it.
    New consumer groups read a topic from its beginning (``auto_offset_reset="earliest"``),
    as `MemoryBus` groups do: a job published before its worker first joined is not lost.

    ``stuck_poll_s``: a watchdog notices a consumer blocked inside one ``poll`` (bounded at
    200 ms by design) for longer than this. kafka-python 3.0 was seen, once in several
    broker-restart runs, to block there for ever after a broker outage (gdb: inside the
    fetcher), which silently stops a worker. The consumer cannot be interrupted from
    another thread, so the watchdog calls ``on_stuck(group)``: service processes exit
    (crash-only; Kubernetes restarts them and the record in hand is redelivered), and
    without a callback the subscription only reports itself not `healthy`.

    ``security``: TLS and SASL for every client the bus makes (default: plaintext).
    """

    def __init__(
        self,
        bootstrap_servers: str,
        client_id: str = "modelguard",
        metrics: BusMetrics | None = None,
        session_timeout_ms: int = 6000,
        *,
        timeout_s: float = 10.0,
        partitions: int = 1,
        max_poll_interval_ms: int = 300_000,
        stop_grace_s: float = DEFAULT_STOP_GRACE_S,
        stuck_poll_s: float = 60.0,
        on_stuck: Callable[[str], None] | None = None,
        security: KafkaSecurity | None = None,
    ) -> None:
        if not bootstrap_servers:
            raise InvalidInput("KafkaBus needs bootstrap servers (host:port[,host:port])")
        self.bootstrap_servers = bootstrap_servers
        self.client_id = client_id
        self.metrics = metrics
        self.session_timeout_ms = session_timeout_ms
        self.timeout_s = timeout_s
        self.partitions = partitions
        self.max_poll_interval_ms = max_poll_interval_ms
        self.stop_grace_s = stop_grace_s
        self.stuck_poll_s = stuck_poll_s
        self.on_stuck = on_stuck
        self.security = security or KafkaSecurity()
        self._lock = threading.Lock()
        self._producer: Any = None
        self._known_topics: set[str] = set()
        self._subscriptions: list[KafkaSubscription] = []
        self._closed = False

    # -- JobBus -------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        check_topic(topic)
        producer = self._get_producer()
        record_headers = [(k, v.encode()) for k, v in (inject_headers(headers) or {}).items()]
        try:
            future = producer.send(topic, value=value, key=key, headers=record_headers)
            future.get(timeout=self.timeout_s)
        except KafkaError as err:
            self._drop_producer(producer)
            raise Unavailable(
                f"Kafka at {self.bootstrap_servers} did not acknowledge a record on "
                f"{topic!r} within {self.timeout_s:.0f}s ({type(err).__name__}: {err}); "
                "check that the broker is running"
            ) from err
        if self.metrics is not None:
            self.metrics.published.labels(topic).inc()

    def subscribe(
        self,
        topics: list[str],
        group: str,
        handler: Handler,
        *,
        retry: RetryPolicy | None = None,
        stop_event: threading.Event | None = None,
    ) -> KafkaSubscription:
        check_subscription(topics, group)
        sub = KafkaSubscription(
            self, list(topics), group, handler, retry or RetryPolicy(), stop_event
        )
        with self._lock:
            if self._closed:
                raise Unavailable("the Kafka bus is closed")
            self._subscriptions.append(sub)
        sub.start()
        return sub

    def ensure_topics(self, topics: list[str], partitions: int = 1) -> None:
        """Create missing topics (replication factor 1); existing ones are left alone."""
        for topic in topics:
            check_topic(topic)
        missing = [t for t in dict.fromkeys(topics) if t not in self._known_topics]
        if not missing:
            return
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap_servers,
                client_id=f"{self.client_id}-admin",
                bootstrap_timeout_ms=int(self.timeout_s * 1000),
                request_timeout_ms=int(self.timeout_s * 1000),
                **self.security.client_options(),
            )
        except KafkaError as err:
            raise self._unavailable("create topics", err) from err
        try:
            response = admin.create_topics(
                {t: {"num_partitions": partitions, "replication_factor": 1} for t in missing},
                timeout_ms=int(self.timeout_s * 1000),
                raise_errors=False,
            )
        except KafkaError as err:
            raise self._unavailable("create topics", err) from err
        finally:
            admin.close()
        for result in _topic_results(response):
            code = int(result.get("error_code", 0))
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                raise Unavailable(
                    f"Kafka refused to create topic {result.get('name')!r}: error {code} "
                    f"{result.get('error_message') or ''}".strip()
                )
        with self._lock:
            self._known_topics.update(missing)
        log.info("topics ready: %s", ", ".join(missing))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            subs = list(self._subscriptions)
        for sub in subs:
            sub.stop(timeout=self.stop_grace_s)
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            producer.close(timeout=self.timeout_s)

    # -- internals ------------------------------------------------------------------------

    def _unavailable(self, what: str, err: Exception) -> Unavailable:
        return Unavailable(
            f"cannot {what}: Kafka at {self.bootstrap_servers} unreachable within "
            f"{self.timeout_s:.0f}s ({type(err).__name__}: {err})"
        )

    def _get_producer(self) -> Any:
        with self._lock:
            if self._closed:
                raise Unavailable("the Kafka bus is closed")
            if self._producer is None:
                timeout_ms = int(self.timeout_s * 1000)
                try:
                    self._producer = KafkaProducer(
                        bootstrap_servers=self.bootstrap_servers,
                        client_id=self.client_id,
                        acks="all",
                        linger_ms=0,
                        bootstrap_timeout_ms=timeout_ms,
                        max_block_ms=timeout_ms,
                        request_timeout_ms=min(timeout_ms, 5000),
                        delivery_timeout_ms=timeout_ms,
                        **self.security.client_options(),
                    )
                except KafkaError as err:
                    raise self._unavailable("publish", err) from err
            return self._producer

    def _drop_producer(self, producer: Any) -> None:
        """A producer that timed out may hold stale connections or idempotence state:
        start afresh on the next publish."""
        with self._lock:
            if self._producer is producer:
                self._producer = None
        try:
            producer.close(timeout=0)
        except Exception:  # closing a broken producer must not hide the original error
            log.debug("closing a failed producer", exc_info=True)

    def _new_consumer(self, sub: KafkaSubscription) -> Any:
        self.ensure_topics(sub.topics + [dead_letter_topic(t) for t in sub.topics], self.partitions)
        timeout_ms = int(self.timeout_s * 1000)
        try:
            consumer = KafkaConsumer(
                bootstrap_servers=self.bootstrap_servers,
                client_id=f"{self.client_id}-{sub.group}",
                group_id=sub.group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                session_timeout_ms=self.session_timeout_ms,
                heartbeat_interval_ms=max(self.session_timeout_ms // 3, 100),
                max_poll_interval_ms=self.max_poll_interval_ms,
                max_poll_records=1,
                bootstrap_timeout_ms=timeout_ms,
                request_timeout_ms=max(timeout_ms, self.session_timeout_ms + 1000),
                metadata_max_age_ms=30_000,
                **self.security.client_options(),
            )
        except KafkaError as err:
            raise self._unavailable(f"join group {sub.group!r}", err) from err
        consumer.subscribe(sub.topics, listener=_Listener(sub))
        return consumer

    def _forget(self, sub: KafkaSubscription) -> None:
        with self._lock:
            if sub in self._subscriptions:
                self._subscriptions.remove(sub)


def _topic_results(response: Any) -> list[dict[str, Any]]:
    """CreateTopics results as dicts, whatever shape this kafka-python version returns."""
    if isinstance(response, dict):
        topics = response.get("topics", [])
    else:
        topics = getattr(response, "topics", [])
    results: list[dict[str, Any]] = []
    for item in topics:
        if isinstance(item, dict):
            results.append(item)
        elif isinstance(item, tuple):
            results.append({"name": item[0], "error_code": item[1]})
    return results


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, sub: KafkaSubscription) -> None:
        self.sub = sub

    def on_partitions_revoked(self, revoked: Any) -> None:
        log.info("group %s: partitions revoked %s", self.sub.group, sorted(revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("group %s: partitions assigned %s", self.sub.group, sorted(assigned))
        self.sub._note_assignment()
        if self.sub.bus.metrics is not None:
            self.sub.bus.metrics.assignments.labels(self.sub.group).inc()


@dataclass
class _InFlight:
    """A record being handled on its own thread."""

    record: Any
    message: Message
    partition: TopicPartition
    done: threading.Event = field(default_factory=threading.Event)
    delivery: Delivery | None = None


class KafkaSubscription:
    """One consumer-group member: a consumer thread plus a thread per record in hand."""

    def __init__(
        self,
        bus: KafkaBus,
        topics: list[str],
        group: str,
        handler: Handler,
        retry: RetryPolicy,
        stop_event: threading.Event | None,
    ) -> None:
        self.bus = bus
        self.topics = topics
        self.group = group
        self.handler = handler
        self.retry = retry
        self._external_stop = stop_event
        self._stop = threading.Event()
        self._deadline: float | None = None
        self._stopped = False
        self._assignments = 0
        self._assigned = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"kafka-{group}", daemon=True)
        #: monotonic time the consumer thread entered ``poll`` (None: not inside one)
        self._poll_since: float | None = None
        self.stuck = False
        self._watchdog = threading.Thread(
            target=self._watch, name=f"kafka-{group}-watchdog", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        self._watchdog.start()

    @property
    def healthy(self) -> bool:
        """False once the consumer thread was found stuck inside ``poll``."""
        return not self.stuck

    def _watch(self) -> None:
        while not self._stop.wait(_WATCHDOG_INTERVAL_S):
            since = self._poll_since
            if since is None or time.monotonic() - since <= self.bus.stuck_poll_s:
                continue
            self.stuck = True
            log.critical(
                "consumer of group %s has been stuck inside poll() for %.0f s (limit %.0f s): "
                "this worker no longer consumes",
                self.group,
                time.monotonic() - since,
                self.bus.stuck_poll_s,
            )
            if self.bus.on_stuck is not None:
                self.bus.on_stuck(self.group)
            return

    def _poll(self, consumer: Any, timeout_ms: int, **options: Any) -> Any:
        self._poll_since = time.monotonic()
        try:
            return consumer.poll(timeout_ms=timeout_ms, **options)
        finally:
            self._poll_since = None

    @property
    def running(self) -> bool:
        return not self._stopped and self._thread.is_alive()

    @property
    def assignments(self) -> int:
        """How many group (re)joins this member completed: tests use it to wait until a
        group is stable before publishing."""
        with self._assigned:
            return self._assignments

    def wait_for_assignments(self, count: int, timeout: float) -> bool:
        with self._assigned:
            return self._assigned.wait_for(lambda: self._assignments >= count, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Let the record in hand finish and commit within ``timeout``; past that, leave
        the group without committing so another member gets the record."""
        if self._deadline is None:
            self._deadline = time.monotonic() + timeout
        self._stop.set()
        if threading.current_thread() is not self._thread:
            # closing the consumer (leave group) gets its own bounded budget
            self._thread.join(timeout + self.bus.timeout_s)
            if self._thread.is_alive():
                log.warning("consumer of group %s did not stop in time", self.group)
        self._stopped = True
        self.bus._forget(self)

    # -- consumer thread --------------------------------------------------------------------

    def _note_assignment(self) -> None:
        with self._assigned:
            self._assignments += 1
            self._assigned.notify_all()

    def _stopping(self) -> bool:
        if self._stop.is_set():
            return True
        if self._external_stop is not None and self._external_stop.is_set():
            if self._deadline is None:
                self._deadline = time.monotonic() + self.bus.stop_grace_s
            return True
        return False

    def _wait_for_stop(self, seconds: float) -> bool:
        """Sleep between attempts; True when stopping. The external event is checked at
        the poll interval since an Event cannot wake on another Event."""
        if self._external_stop is None:
            return self._stop.wait(seconds)
        deadline = time.monotonic() + seconds
        while not self._stopping():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._stop.wait(min(remaining, _POLL_MS / 1000))
        return True

    def _run(self) -> None:
        while not self._stopping():
            try:
                consumer = self.bus._new_consumer(self)
            except Unavailable as err:
                log.warning("group %s: %s; retrying", self.group, err)
                self._wait_for_stop(_RECONNECT_BACKOFF_S)
                continue
            except Exception:
                log.exception("group %s: cannot create a consumer; retrying", self.group)
                self._wait_for_stop(_RECONNECT_BACKOFF_S)
                continue
            try:
                self._consume(consumer)
            except Exception:
                # a record in hand stays uncommitted and comes back to the new consumer
                log.exception("group %s: consumer failed; reconnecting", self.group)
                self._wait_for_stop(_RECONNECT_BACKOFF_S)
            finally:
                try:
                    consumer.close(autocommit=False, timeout_ms=int(self.bus.timeout_s * 1000))
                except Exception:
                    log.warning("group %s: consumer close failed", self.group, exc_info=True)
        log.info("consumer of group %s on %s stopped", self.group, self.topics)

    def _consume(self, consumer: Any) -> None:
        in_flight: _InFlight | None = None
        while True:
            if in_flight is None:
                if self._stopping():
                    return
                records = self._poll(consumer, _POLL_MS, max_records=1)
                for tp, batch in records.items():
                    if not batch:
                        continue
                    if in_flight is None:
                        in_flight = self._start(consumer, tp, batch[0])
                        batch = batch[1:]
                    if batch:  # one record at a time: fetch the rest again later
                        consumer.seek(tp, batch[0].offset)
                continue
            if in_flight.done.wait(_POLL_MS / 1000):
                self._finish(consumer, in_flight)
                in_flight = None
                continue
            if self._stopping() and time.monotonic() >= (self._deadline or 0.0):
                log.warning(
                    "group %s: %s@%d still in hand at stop; leaving it uncommitted for redelivery",
                    self.group,
                    in_flight.message.topic,
                    in_flight.message.offset,
                )
                return
            # keep the membership alive; a rebalance may hand us paused partitions anew
            consumer.pause(*consumer.assignment())
            stray = self._poll(consumer, 0)
            for tp, batch in stray.items():
                if batch:
                    consumer.seek(tp, batch[0].offset)

    def _start(self, consumer: Any, tp: TopicPartition, record: Any) -> _InFlight:
        headers = {k: (v or b"").decode("utf-8", "replace") for k, v in (record.headers or [])}
        message = Message(
            topic=record.topic,
            value=record.value if record.value is not None else b"",
            key=record.key,
            headers=headers,
            partition=record.partition,
            offset=record.offset,
            timestamp=record.timestamp / 1000 if (record.timestamp or -1) > 0 else 0.0,
        )
        item = _InFlight(record=record, message=message, partition=tp)
        consumer.pause(*consumer.assignment())
        if self.bus.metrics is not None:
            self.bus.metrics.consumed.labels(message.topic).inc()

        def work() -> None:
            try:
                item.delivery = deliver(
                    message, self.handler, self.retry, self._wait_for_stop, self.bus.metrics
                )
            finally:
                item.done.set()

        threading.Thread(target=work, name=f"kafka-{self.group}-handler", daemon=True).start()
        return item

    def _finish(self, consumer: Any, item: _InFlight) -> None:
        delivery = item.delivery
        message = item.message
        if delivery is None:
            # the handler raised SystemExit or the like: leave the group, as MemoryBus's
            # thread would die, rather than redeliver to the same handler in a loop
            log.error(
                "group %s: handler aborted on %s@%d; stopping this subscription",
                self.group,
                message.topic,
                message.offset,
            )
            self._deadline = time.monotonic()
            self._stop.set()
            delivery = Delivery(Outcome.ABANDONED, 0)
        if delivery.outcome is Outcome.DEAD_LETTER and not self._dead_letter(message, delivery):
            delivery = Delivery(Outcome.ABANDONED, delivery.attempts)
        if delivery.outcome is Outcome.ABANDONED:
            # not committed: rewind so this member (or the next owner) sees it again
            if item.partition in consumer.assignment():
                consumer.seek(item.partition, message.offset)
        else:
            self._commit(consumer, item)
        consumer.resume(*consumer.paused())

    def _dead_letter(self, message: Message, delivery: Delivery) -> bool:
        """Publish to ``<topic>.dlq``, retrying while the broker is away; False if the
        subscription stopped first (the record stays uncommitted)."""
        backoff = self.retry.initial_backoff_s
        while True:
            try:
                self.bus.publish(
                    dead_letter_topic(message.topic),
                    message.value,
                    key=message.key,
                    headers=dead_letter_headers(message, delivery),
                )
            except Unavailable as err:
                log.warning(
                    "group %s: dead-lettering %s@%d failed: %s",
                    self.group,
                    message.topic,
                    message.offset,
                    err,
                )
                if self._wait_for_stop(backoff):
                    return False
                backoff = min(backoff * 2, self.retry.max_backoff_s)
                continue
            if self.bus.metrics is not None:
                self.bus.metrics.dead_lettered.labels(message.topic).inc()
            return True

    def _commit(self, consumer: Any, item: _InFlight) -> None:
        offset = item.message.offset + 1
        offsets = {item.partition: OffsetAndMetadata(offset, "", -1)}
        backoff = self.retry.initial_backoff_s
        committed = False
        for attempt in range(1, 6):
            try:
                consumer.commit(offsets, timeout_ms=int(self.bus.timeout_s * 1000))
                # one line per record: what a lost or missing commit is traced with
                log.info(
                    "group %s: committed %s[%d] up to %d",
                    self.group,
                    item.message.topic,
                    item.partition.partition,
                    offset,
                )
                committed = True
                break
            except KafkaError as err:
                log.warning(
                    "group %s: commit of %s@%d failed (attempt %d): %s",
                    self.group,
                    item.message.topic,
                    item.message.offset,
                    attempt,
                    err,
                )
                if not getattr(err, "retriable", False) or self._wait_for_stop(backoff):
                    break
                backoff = min(backoff * 2, self.retry.max_backoff_s)
        if not committed:
            # a partition kept across a rebalance keeps its fetch position, already past
            # this record: rewind, or the record would stay uncommitted and never come back
            # (handlers take a record twice: redelivery is the at-least-once contract)
            log.warning(
                "group %s: %s@%d left uncommitted; it will be delivered again",
                self.group,
                item.message.topic,
                item.message.offset,
            )
            if item.partition in consumer.assignment():
                consumer.seek(item.partition, item.message.offset)
            return
        # after a rebalance that gave the partition back to us, the fetch position was
        # reset to the old committed offset: skip the record we just finished
        if (
            item.partition in consumer.assignment()
            and consumer.position(item.partition, timeout_ms=int(self.bus.timeout_s * 1000))
            < offset
        ):
            consumer.seek(item.partition, offset)
