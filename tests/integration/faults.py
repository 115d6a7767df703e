"""Helpers of the fault-injection tests: the audit services as processes that can be
killed and restarted, a poller of the audit records in the store, the batch submitter,
and the exactly-once checks (store, event log, dead-letter topics, consumer offsets)."""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from modelguard.bus.base import dead_letter_topic
from modelguard.errors import InvalidInput, NotFound, Unavailable
from modelguard.localstack import wait_until
from modelguard.proto.modelguard.v1 import jobs_pb2
from modelguard.services.audit_client import AuditClient
from modelguard.services.launcher import EXIT_STUCK_CONSUMER
from modelguard.services.pruning_orchestrator.service import STAGE_STATE_NAMES
from modelguard.services.pruning_orchestrator.state import AUDIT_PREFIX, AuditRecord
from modelguard.services.stack import ServiceProcess
from modelguard.spec import InputSpec
from modelguard.store.base import BLOB_PREFIX
from modelguard.store.s3 import S3Store
from modelguard.topics import AUDIT_EVENTS, AUDIT_REQUESTED, NEURONS_SCORED, TRIGGERS_REVERSED

log = logging.getLogger(__name__)

AUDIT_SERVICES = ("pruning-orchestrator", "leak-detector", "trigger-reversal", "neuron-scoring")
JOB_TOPICS = (AUDIT_REQUESTED, TRIGGERS_REVERSED, NEURONS_SCORED, AUDIT_EVENTS)
#: The audit services' consumer groups and what they consume.
GROUP_TOPICS = {
    "pruning-orchestrator-events": (AUDIT_EVENTS,),
    "pruning-orchestrator-repair": (NEURONS_SCORED,),
    "leak-detector": (AUDIT_REQUESTED,),
    "trigger-reversal": (AUDIT_REQUESTED,),
    "neuron-scoring": (TRIGGERS_REVERSED,),
}
FINAL_STAGE_STATES = ("not_run", "done", "failed", "skipped")
#: After the last audit is final, a redelivered job may still be on its way through the
#: stages (a re-run reversal, then its scoring); each commits when it is through.
COMMIT_WAIT_S = 120.0
AUDIT_ID = re.compile(rb"\d{8}-\d{6}-[0-9a-f]{8}")


# --------------------------------------------------------------------------------------
# the services
# --------------------------------------------------------------------------------------


class AuditStack:
    """The four audit services, each its own process; a service can be SIGKILLed and
    restarted on the same ports (readiness: gRPC health SERVING). Like Kubernetes, a
    supervisor restarts a service that exited on its own because a Kafka consumer got
    stuck (`EXIT_STUCK_CONSUMER`); the restarts are recorded in ``respawns``."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs = {name: ServiceProcess(name, env, log_dir) for name in AUDIT_SERVICES}
        self.respawns: list[str] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True)

    def start(self) -> None:
        # in parallel: each start is mostly importing torch
        with ThreadPoolExecutor(len(self.procs)) as pool:
            list(pool.map(lambda p: p.start(timeout=180), self.procs.values()))
        self._supervisor.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            for proc in self.procs.values():
                proc.stop(timeout=10)

    def ensure_running(self, name: str) -> None:
        """Start ``name`` unless it is running (one start at a time per stack)."""
        with self._lock:
            proc = self.procs[name]
            if proc.process is None or proc.process.poll() is not None:
                proc.start(timeout=180)

    def _supervise(self) -> None:
        while not self._stopping.wait(1.0):
            for name, proc in self.procs.items():
                if proc.process is not None and proc.process.poll() == EXIT_STUCK_CONSUMER:
                    log.warning("supervisor: %s exited (stuck consumer); restarting", name)
                    self.respawns.append(name)
                    try:
                        self.ensure_running(name)
                    except Exception:
                        log.exception("supervisor: %s did not come back", name)

    @property
    def orchestrator(self) -> ServiceProcess:
        return self.procs["pruning-orchestrator"]

    def kill_and_restart(self, name: str) -> None:
        self.procs[name].kill()
        self.ensure_running(name)

    def metric(self, name: str, metric: str) -> float:
        """Sum of a metric's samples on one service's /metrics endpoint."""
        url = f"http://127.0.0.1:{self.procs[name].metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(metric + "{") or line.startswith(metric + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total


# --------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    """One audit to submit; ``fails_in`` names the stage a bad input must fail in, with
    ``reason`` a part of the error it must give."""

    name: str
    model: Path
    data: Path
    options: jobs_pb2.AuditOptions
    fails_in: str = ""
    reason: str = ""


@dataclass
class Batch:
    jobs: dict[str, JobSpec] = field(default_factory=dict)  # audit id -> spec
    refused: dict[str, str] = field(default_factory=dict)  # job name -> refusal text

    @property
    def ids(self) -> list[str]:
        return list(self.jobs)


def submit_with_retry(
    client: AuditClient, spec: JobSpec, input_spec: InputSpec, deadline_s: float = 120.0
) -> str:
    """Submit like a careful client: the same idempotency key on every retry, retrying
    while the orchestrator (or what it depends on) is away."""
    key = uuid.uuid4().hex
    deadline = time.monotonic() + deadline_s
    delay = 0.2
    while True:
        try:
            audit = client.submit(
                spec.model,
                spec.data,
                input_spec,
                arch="lenet5",
                options=spec.options,
                idempotency_key=key,
            )
            return str(audit.audit_id)
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)  # backoff between retries of a refused call, not a sync point
            delay = min(delay * 2, 2.0)


def submit_batch(
    client: AuditClient, specs: Iterable[JobSpec], input_spec: InputSpec, batch: Batch
) -> None:
    for spec in specs:
        try:
            batch.jobs[submit_with_retry(client, spec, input_spec)] = spec
        except InvalidInput as err:
            batch.refused[spec.name] = str(err)


# --------------------------------------------------------------------------------------
# watching the store
# --------------------------------------------------------------------------------------


class RecordPoller:
    """Reads the audit records straight from the store (not through the orchestrator,
    which the tests kill) into a snapshot, every ``interval`` seconds."""

    def __init__(self, store: S3Store, interval: float = 0.5) -> None:
        self.store = store
        self.interval = interval
        self.snapshot: dict[str, AuditRecord] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="record-poller", daemon=True)

    def __enter__(self) -> RecordPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.snapshot = read_records(self.store)
            except Unavailable:
                continue  # the store is down on purpose

    def running(self, stage: str, ids: Iterable[str]) -> bool:
        records = self.snapshot
        return any(
            r.stages[stage].state == "running" for i in ids if (r := records.get(i)) is not None
        )

    def final(self, ids: Iterable[str]) -> bool:
        records = self.snapshot
        return all((r := records.get(i)) is not None and r.final for i in ids)


def read_records(store: S3Store) -> dict[str, AuditRecord]:
    records = {}
    for key in store.list_docs(AUDIT_PREFIX):
        try:
            record = AuditRecord.from_json(store.get_doc(key))
        except NotFound:
            continue
        records[record.audit_id] = record
    return records


# --------------------------------------------------------------------------------------
# chaos
# --------------------------------------------------------------------------------------


#: How long a kill waits for its service to hold a job before it kills it idle.
IN_FLIGHT_WAIT_S = 60.0


@dataclass
class KillLog:
    #: (service, held a job): whether its jobs_in_flight gauge read >= 1 just before the kill
    entries: list[tuple[str, bool]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def services(self) -> Counter[str]:
        return Counter(name for name, _ in self.entries)

    def killed_in_flight(self) -> set[str]:
        """The services killed at least once while they held a job."""
        return {name for name, held in self.entries if held}


def in_flight_metric(service: str) -> str:
    return f"modelguard_{service.replace('-', '_')}_jobs_in_flight"


def jobs_in_flight(stack: AuditStack, name: str) -> float:
    """The service's ``jobs_in_flight`` gauge, read from its /metrics endpoint: the
    service's StageReporter holds it at 1 from the start of a stage job to its outcome (the
    bus commits the record only after that, so a job killed in flight is redelivered).
    0 when the service does not answer (it is down)."""
    try:
        return stack.metric(name, in_flight_metric(name))
    except OSError:
        return 0.0


def chaos(
    stack: AuditStack,
    plan: list[list[str]],
    rng: random.Random,
    kills: KillLog,
    stop: threading.Event,
) -> None:
    """SIGKILL every service of each round of ``plan`` once, one kill at a time, each at a
    random point inside a job it holds: after a random pause, the services of the round
    not killed yet are watched through their jobs_in_flight gauges and the first one seen
    holding a job (the round's random order breaks ties) is killed right after that
    reading, the proof it was killed in flight. A job that lasts a tenth of a second (the
    leak detector's) is caught as surely as a long one. When none of them takes a job
    within `IN_FLIGHT_WAIT_S`, the first is killed idle, recorded as such. A killed service
    restarts in the background, so the next kill may come while it is still down (two
    services down at once); a service is killed again only once it is back."""
    restarts: dict[str, threading.Thread] = {}

    def restarting(name: str) -> bool:
        return (thread := restarts.get(name)) is not None and thread.is_alive()

    for round_ in plan:
        remaining = list(round_)
        while remaining:
            if stop.wait(rng.uniform(0.0, 1.0)):  # a random point inside the jobs
                break
            name: str | None = None
            held = False
            deadline = time.monotonic() + IN_FLIGHT_WAIT_S
            while name is None and not stop.is_set() and time.monotonic() < deadline:
                name = next(
                    (n for n in remaining if not restarting(n) and jobs_in_flight(stack, n) >= 1),
                    None,
                )
                held = name is not None
                if name is None:
                    stop.wait(0.05)
            if stop.is_set():
                break
            if name is None:  # nobody took a job: kill the first idle, once it is back
                name = remaining[0]
                if (previous := restarts.get(name)) is not None:
                    previous.join(300)
            stack.procs[name].kill()
            kills.entries.append((name, held))
            log.warning("chaos: SIGKILLed %s (job in flight: %s)", name, held)
            remaining.remove(name)
            restarts[name] = threading.Thread(
                target=_restart, args=(stack, name, kills), daemon=True
            )
            restarts[name].start()
        if stop.is_set():
            break
    for thread in restarts.values():
        thread.join(300)


def _restart(stack: AuditStack, name: str, kills: KillLog) -> None:
    try:
        stack.ensure_running(name)
    except Exception as err:  # reported by the test
        kills.errors.append(f"{name} did not come back: {err}")


def kill_plan(rng: random.Random, rounds: int) -> list[list[str]]:
    """Rounds of every service once, each in a random order: any first round's worth of
    kills covers every stage."""
    return [rng.sample(AUDIT_SERVICES, len(AUDIT_SERVICES)) for _ in range(rounds)]


# --------------------------------------------------------------------------------------
# exactly-once checks
# --------------------------------------------------------------------------------------


def wait_final(poller_store: S3Store, ids: list[str], timeout: float, what: str) -> None:
    def done() -> bool:
        records = read_records(poller_store)
        return all((r := records.get(i)) is not None and r.final for i in ids)

    wait_until(done, timeout, what)


@dataclass
class EventLog:
    """Every AuditEvent on the events topic in log order (per partition; an audit's
    events share its key, hence a partition)."""

    events: dict[str, list[jobs_pb2.AuditEvent]]

    def first_finals(self, audit_id: str) -> tuple[dict[str, Any], int]:
        """Per stage, the first final outcome in the log; and how many later final
        outcomes (redeliveries, re-run stages) the orchestrator had to ignore."""
        first: dict[str, Any] = {}
        duplicates = 0
        for event in self.events.get(audit_id, []):
            state = STAGE_STATE_NAMES.get(event.stage.state, "?")
            if state not in FINAL_STAGE_STATES:
                continue
            if event.stage.stage in first:
                duplicates += 1
                continue
            first[event.stage.stage] = event.stage
        return first, duplicates


def read_topic(
    bootstrap: str, topic: str, quiet_s: float = 2.0, timeout: float = 60.0
) -> tuple[list[Any], dict[TopicPartition, int]]:
    """Every record of ``topic`` (no consumer group), and each partition's next offset.
    Read until the topic stays quiet for ``quiet_s``: Tansu answers ListOffsets(latest)
    with a constant, so end offsets cannot tell where a partition ends."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, client_id="fault-test-reader"
    )
    try:
        parts = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        ends = {tp: 0 for tp in parts}
        records: list[Any] = []
        if not parts:
            return records, ends
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        deadline = time.monotonic() + timeout
        quiet_until = time.monotonic() + quiet_s
        while time.monotonic() < quiet_until:
            assert time.monotonic() < deadline, f"{topic} never went quiet"
            batches = consumer.poll(timeout_ms=250)
            if batches:
                quiet_until = time.monotonic() + quiet_s
            for tp, batch in batches.items():
                records.extend(batch)
                ends[tp] = batch[-1].offset + 1
        return records, ends
    finally:
        consumer.close()


def read_events(bootstrap: str) -> EventLog:
    events: dict[str, list[jobs_pb2.AuditEvent]] = {}
    records, _ = read_topic(bootstrap, AUDIT_EVENTS)
    # per partition in offset order: an audit's events share its key, hence a partition
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        event = jobs_pb2.AuditEvent.FromString(record.value)
        events.setdefault(event.audit_id, []).append(event)
    return EventLog(events)


def dead_letters(bootstrap: str) -> dict[str, int]:
    """Records in each job topic's dead-letter topic."""
    return {
        dead_letter_topic(t): len(read_topic(bootstrap, dead_letter_topic(t), quiet_s=0.5)[0])
        for t in JOB_TOPICS
    }


def consumer_lag(admin: KafkaAdminClient, ends: dict[TopicPartition, int]) -> dict[str, int]:
    """Records not yet committed, per consumer group, over the topics it consumes."""
    lag = {}
    for group, topics in GROUP_TOPICS.items():
        tps = [tp for tp in ends if tp.topic in topics]
        committed = admin.list_group_offsets({group: tps}).get(group, {})
        # a partition the group never committed on answers -1: nothing committed, so 0 (as
        # -1 it counted one phantom record on every empty partition)
        lag[group] = sum(
            max(0, ends[tp] - max(0, committed[tp].offset if tp in committed else 0)) for tp in tps
        )
    return lag


def reports_in_store(store: S3Store) -> tuple[Counter[str], Counter[str]]:
    """How many JSON and HTML reports the bucket holds per audit id (reports are
    content-addressed blobs, so a report written twice with different bytes shows)."""
    json_reports: Counter[str] = Counter()
    html_reports: Counter[str] = Counter()
    for obj in store.client.list_objects(store.bucket, prefix=BLOB_PREFIX, recursive=True):
        if obj.size is None or obj.size > 4 << 20 or obj.object_name is None:
            continue
        response = store.client.get_object(store.bucket, obj.object_name)
        try:
            data = bytes(response.read())
        finally:
            response.close()
            response.release_conn()
        head = data[:64].lstrip().lower()
        if head.startswith(b"{"):
            try:
                doc = json.loads(data)
            except ValueError:
                continue
            if isinstance(doc, dict) and {"audit_id", "finished_at", "stages"} <= set(doc):
                json_reports[str(doc["audit_id"])] += 1
        elif head.startswith(b"<!doctype html") or head.startswith(b"<html"):
            found = AUDIT_ID.search(data)
            if found:
                html_reports[found.group().decode()] += 1
    return json_reports, html_reports


def check_exactly_once(
    store: S3Store, bootstrap: str, batch: Batch, log_dir: Path | None = None
) -> dict[str, int]:
    """Assert the batch's outcomes and that each was produced and recorded once; return
    figures for the log (duplicate outcomes ignored, dead letters). With the services'
    ``log_dir``, a failure quotes what each lagging service logged last."""
    records = read_records(store)
    for audit_id, spec in batch.jobs.items():
        record = records[audit_id]
        assert record.final, f"{spec.name} ({audit_id}) is stuck in {record.state}"
        if spec.fails_in:
            assert record.state == "failed", f"{spec.name}: {record.state}, expected failed"
            stage = record.stages[spec.fails_in]
            assert stage.state == "failed", f"{spec.name}: {spec.fails_in} is {stage.state}"
            assert spec.reason in stage.error and spec.reason in record.error, (
                f"{spec.name}: reason {spec.reason!r} not in {record.error!r}"
            )
        else:
            assert record.state == "succeeded", (
                f"{spec.name} ({audit_id}) {record.state}: {record.error}"
            )
            assert {s.state for s in record.stages.values()} <= {"done", "skipped"}
        assert record.report_json is not None and record.report_html is not None

    # the store: one report (JSON and HTML) per finished audit, and a signature for
    # exactly the artifacts the records name (a second finish would leave more)
    json_reports, html_reports = reports_in_store(store)
    finished = [r for r in records.values() if r.final]
    for record in finished:
        assert json_reports[record.audit_id] == 1, (
            f"{record.audit_id}: {json_reports[record.audit_id]} JSON reports in the store"
        )
        assert html_reports[record.audit_id] == 1, (
            f"{record.audit_id}: {html_reports[record.audit_id]} HTML reports in the store"
        )
    signed = {
        ref.sha256
        for r in finished
        for ref in (r.report_json, r.report_html, r.repaired_model)
        if ref is not None
    }
    signatures = {key.split("/", 1)[1] for key in store.list_docs("signatures/")}
    assert signatures == signed, f"orphan signatures: {sorted(signatures - signed)[:5]}"

    # the event log: every stage's recorded outcome is the first final one published;
    # later (redelivered or re-run) outcomes changed nothing
    events = read_events(bootstrap)
    duplicates = 0
    for audit_id in batch.ids:
        first, extra = events.first_finals(audit_id)
        duplicates += extra
        for name, stage in records[audit_id].stages.items():
            event = first.get(name)
            if event is None:  # skipped by the orchestrator's cascade, not by an event
                assert stage.state == "skipped", f"{audit_id} {name}: {stage.state}, no event"
                continue
            recorded = (
                stage.state,
                stage.message,
                stage.result.sha256 if stage.result else "",
                stage.error,
            )
            published = (
                STAGE_STATE_NAMES[event.state],
                event.message,
                event.result.sha256,
                event.error.message,
            )
            assert recorded == published, f"{audit_id} {name}: not the first final outcome"

    # nothing lost, nothing left behind
    letters = dead_letters(bootstrap)
    assert sum(letters.values()) == 0, f"dead-lettered records: {letters}"
    ends: dict[TopicPartition, int] = {}
    for topic in JOB_TOPICS:
        ends.update(read_topic(bootstrap, topic, quiet_s=0.5)[1])
    lag: dict[str, int] = {}
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="fault-test-admin")

    def all_committed() -> bool:
        lag.update(consumer_lag(admin, ends))
        return not any(lag.values())

    try:
        wait_until(all_committed, COMMIT_WAIT_S, "every job record committed by its consumer group")
    except TimeoutError as err:
        lagging = [group for group, count in lag.items() if count]
        raise AssertionError(
            f"records left uncommitted: {lag}{service_log_tails(log_dir, lagging)}"
        ) from err
    finally:
        admin.close()
    return {"duplicate_outcomes_ignored": duplicates, "reports": len(json_reports)}


def service_log_tails(log_dir: Path | None, groups: Iterable[str], lines: int = 12) -> str:
    """The last ``lines`` lines our code logged (the Kafka client's chatter left out) in
    the services that own ``groups``."""
    if log_dir is None:
        return ""
    services = sorted({s for group in groups for s in AUDIT_SERVICES if group.startswith(s)})
    parts = []
    for service in services:
        path = log_dir / f"{service}.log"
        if path.is_file():
            ours = [
                line
                for line in path.read_text(errors="replace").splitlines()
                if " modelguard." in line
            ]
            parts.append(f"\n--- {service} (last {lines} lines) ---\n" + "\n".join(ours[-lines:]))
    return "".join(parts)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    return fn(), time.monotonic() - started
