"""The audit job's owner, transport-neutral: the gRPC servicer and the Kafka handlers
both call into this class (as MLServer's servicers call one DataPlane). Its use cases:
submission, stage events (audit state, the signed report), queries, and the repair stage
(`Orchestrator.repair`: a `RepairRequest` in, a `RepairOutcome` out)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from google.protobuf import json_format

from modelguard.auth import Identity
from modelguard.config import PlatformSettings, PruningOrchestratorSettings
from modelguard.convert import ref_from_proto
from modelguard.detection.registry import DEFAULT_DETECTOR, get_detector
from modelguard.detection.triggers import ReversedTrigger
from modelguard.errors import InvalidInput, NotFound, Unavailable
from modelguard.jobdata import ModelAndData, load_inputs, load_reference_model
from modelguard.metrics import ServiceMetrics
from modelguard.nn.probe import resolve_layer
from modelguard.progress import Progress
from modelguard.proto.modelguard.v1 import common_pb2, jobs_pb2
from modelguard.repair.registry import DEFAULT_REPAIR_MODE, NO_REPAIR, REPAIR_CHOICES
from modelguard.runtime import Runtime
from modelguard.services.pruning_orchestrator.report import build_report, curve_png
from modelguard.services.pruning_orchestrator.state import (
    DONE,
    FAILED,
    NOT_RUN,
    PENDING,
    QUEUED,
    RUNNING,
    SKIPPED,
    STAGE_FAILED,
    STAGE_RUNNING,
    SUCCEEDED,
    ArtifactOwners,
    ArtifactRecord,
    AuditRecord,
    AuditRepository,
    artifact_digests,
)
from modelguard.signing import PublishedKey
from modelguard.stage import publish_proto
from modelguard.store.base import ArtifactRef, join_upload
from modelguard.topics import (
    AUDIT_REQUESTED,
    JOB_AUDIT,
    STAGE_NEURON_SCORING,
    STAGE_REPAIR,
    STAGE_ROBUSTNESS,
)
from modelguard.tracing import set_attributes, span

if TYPE_CHECKING:
    from modelguard.repair.result import RepairResult
    from modelguard.repair.scoring import NeuronRanking

log = logging.getLogger(__name__)

#: A repair whose reversed ASR ends below this is reported "repaired", else "partially
#: repaired".
REPAIRED_ASR = 0.1

STAGE_STATE_NAMES = {
    common_pb2.STAGE_STATE_NOT_RUN: NOT_RUN,
    common_pb2.STAGE_STATE_PENDING: PENDING,
    common_pb2.STAGE_STATE_RUNNING: STAGE_RUNNING,
    common_pb2.STAGE_STATE_DONE: DONE,
    common_pb2.STAGE_STATE_FAILED: STAGE_FAILED,
    common_pb2.STAGE_STATE_SKIPPED: SKIPPED,
}


def record_of(ref: ArtifactRef, signature: str = "") -> ArtifactRecord:
    return ArtifactRecord(ref.sha256, ref.key, ref.size, ref.media_type, signature)


def ref_of(record: ArtifactRecord) -> ArtifactRef:
    return ArtifactRef(record.sha256, record.key, record.size, record.media_type)


@dataclass(frozen=True)
class RepairRequest:
    """The repair stage's input. ``inputs``: the audit's model, clean data and spec;
    ``triggers``: the flagged labels' reversed triggers; ``mode``: a
    `modelguard.repair.registry.REPAIR_MODES` name (empty: rollback); ``layer``: the pruning
    site (empty: the default); ``ranking``: the neuron-scoring stage's ranking (None: the
    repair scores for itself); ``media_type``: the submitted model's, given to the
    repaired one."""

    inputs: ModelAndData
    triggers: list[ReversedTrigger]
    mode: str = ""
    layer: str = ""
    ranking: NeuronRanking | None = None
    media_type: str = ""


@dataclass(frozen=True)
class RepairOutcome:
    """The repair stage's output: the repair's result, the stored repaired model (same
    format as the submitted one), the stored JSON summary and the summary itself."""

    result: RepairResult
    mode: str
    model: ArtifactRef
    summary_ref: ArtifactRef
    summary: dict[str, Any]


class Orchestrator:
    def __init__(
        self,
        runtime: Runtime,
        settings: PruningOrchestratorSettings,
        metrics: ServiceMetrics,
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.metrics = metrics
        self.repository = AuditRepository(runtime.store)
        self.owners = ArtifactOwners(runtime.store)
        self.audits_by_state = metrics.gauge(
            "audits", "Audits known to this replica by state (refreshed on list).", ("state",)
        )
        self.audit_seconds = metrics.histogram(
            "audit_seconds",
            "Submission to final state of an audit.",
            (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
        )
        self.stage_events = metrics.counter(
            "stage_events_total", "Stage events applied, by stage and state.", ("stage", "state")
        )

    @property
    def platform(self) -> PlatformSettings:
        return self.runtime.platform

    # --- tenants -----------------------------------------------------------------------
    # ``caller`` is the authenticated identity; None means authentication is off and
    # everything is visible (embedded mode). Another tenant's audit or artifact answers
    # NOT_FOUND, exactly like a missing one, so that ids do not leak.
    @staticmethod
    def _restricted(caller: Identity | None) -> bool:
        return caller is not None and not caller.admin

    def _check_owned(self, sha256: str, caller: Identity | None, what: str) -> None:
        if self._restricted(caller) and caller and not self.owners.owns(sha256, caller.tenant):
            raise NotFound(
                f"{what} {sha256[:16]}… not found: upload it first (UploadArtifact), or use "
                "an artifact of one of your own audits"
            )

    def _grant(self, record: AuditRecord, value: Any) -> None:
        """The audit's tenant may download what its audit produced."""
        if record.tenant:
            for sha256 in artifact_digests(value):
                self.owners.grant(sha256, record.tenant)

    # --- artifacts -------------------------------------------------------------------
    def upload(
        self, chunks: Iterable[tuple[bytes, str]], caller: Identity | None = None
    ) -> ArtifactRef:
        data, media_type = join_upload(chunks, self.settings.max_upload_bytes)
        ref = self.runtime.store.put_blob(data, media_type)
        if caller is not None:
            # the same bytes uploaded by two tenants belong to both: each had them anyway
            self.owners.grant(ref.sha256, caller.tenant)
        return ref

    def download(self, ref: ArtifactRef, caller: Identity | None = None) -> bytes:
        """Read back an artifact; a signed one (report, repaired model) is verified first."""
        self._check_owned(ref.sha256, caller, "artifact")
        data = self.runtime.store.get_blob(ref)
        signature = self._signature_of(ref.sha256)
        if signature is not None:
            self.runtime.signer.verify(ref.sha256, signature)
        return data

    def _signature_of(self, sha256: str) -> str | None:
        try:
            return self.runtime.store.get_doc(f"signatures/{sha256}").decode()
        except NotFound:
            return None

    def _sign(self, ref: ArtifactRef, kind: str) -> ArtifactRecord:
        """Sign an artifact users download (``kind``: report, repaired-model); the
        signature document is kept beside it and in the audit record."""
        signature = self.runtime.signer.sign(ref.sha256, kind)
        self.runtime.store.put_doc(f"signatures/{ref.sha256}", signature.encode())
        return record_of(ref, signature)

    def public_key(self) -> PublishedKey:
        """The public key that verifies what this deployment signs."""
        return self.runtime.signer.published()

    # --- submission ------------------------------------------------------------------
    def submit(
        self,
        model: common_pb2.ModelSpec,
        data: common_pb2.ArtifactRef,
        options: jobs_pb2.AuditOptions,
        *,
        idempotency_key: str = "",
        caller: Identity | None = None,
    ) -> AuditRecord:
        """Record a new audit and publish its request (whose records carry this span's
        trace, so the whole audit is one trace)."""
        with span("audit submit") as current:
            record = self._submit(
                model, data, options, idempotency_key=idempotency_key, caller=caller
            )
            set_attributes(current, audit_id=record.audit_id, tenant=record.tenant)
            return record

    def _submit(
        self,
        model: common_pb2.ModelSpec,
        data: common_pb2.ArtifactRef,
        options: jobs_pb2.AuditOptions,
        *,
        idempotency_key: str,
        caller: Identity | None,
    ) -> AuditRecord:
        tenant = caller.tenant if caller is not None else ""
        # before the idempotency look-up: a key must not reveal another tenant's inputs
        self._check_owned(model.artifact.sha256, caller, "model artifact")
        self._check_owned(data.sha256, caller, "dataset artifact")
        if options.reference_model.sha256:
            self._check_owned(options.reference_model.sha256, caller, "reference model artifact")
        key_hash = ""
        if idempotency_key:
            key_hash = hashlib.sha256(f"{tenant}\0{idempotency_key}".encode()).hexdigest()
            existing = self.repository.find_idempotent(key_hash)
            if existing:
                record = self.repository.get(existing)
                if record.state == QUEUED and not any(s.updated_at for s in record.stages.values()):
                    # The first try may have stored the record and then failed to publish
                    # (broker down): the client's retry must not leave it queued forever.
                    # A second request is harmless: each stage's first outcome counts.
                    self._publish_request(record)
                return record
        if options.repair_mode not in ("", *REPAIR_CHOICES):
            raise InvalidInput(
                f"repair mode {options.repair_mode!r} unknown; use " + ", ".join(REPAIR_CHOICES)
            )
        detector = get_detector(options.detector or DEFAULT_DETECTOR)
        if options.detection_rule not in ("", *detector.rules):
            raise InvalidInput(
                f"detection rule {options.detection_rule!r} unknown for {detector.name}; use "
                + " or ".join(detector.rules)
            )
        # Validate now, so a bad submission fails at once with a reason the user can act
        # on, instead of in a worker minutes later.
        inputs = load_inputs(self.runtime.store, model, data, self.platform)
        if inputs.data is None:
            raise InvalidInput("a clean dataset (.npz with x and y) is required for an audit")
        if not model.input.num_classes:
            model.input.num_classes = inputs.model.num_classes
        # the reference too: another task or an unloadable file is refused here
        load_reference_model(
            self.runtime.store,
            options.reference_model,
            model,
            self.platform,
            num_classes=inputs.model.num_classes,
        )
        if options.layer:
            # the repair stage would refuse it only after detection flags the model; on a
            # model called clean the typo would never be reported at all
            resolve_layer(inputs.model.module, options.layer, inputs.spec)
        if options.robustness_eps:
            check_robustness_options(options, inputs.spec.value_range)
        audit_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]
        record = AuditRecord.new(
            audit_id,
            model=json_format.MessageToDict(model),
            data=json_format.MessageToDict(data),
            options=json_format.MessageToDict(options),
            tenant=tenant,
        )
        if options.skip_repair or options.repair_mode == NO_REPAIR:
            record.stages[STAGE_REPAIR].state = SKIPPED
            record.stages[STAGE_REPAIR].message = "repair not requested"
        if not options.robustness_eps:
            # not requested: final at once (skipped, as an unrequested repair is), so the audit
            # finishes without it as it always did
            record.stages[STAGE_ROBUSTNESS].state = SKIPPED
            record.stages[STAGE_ROBUSTNESS].message = "robustness not requested (no ε given)"
        with self.repository.lock(audit_id):
            self.repository.put(record)
            if key_hash:
                self.repository.remember_idempotent(key_hash, audit_id)
            self._publish_request(record)
        self.metrics.jobs.labels("submitted").inc()
        log.info("audit %s submitted", audit_id)
        return record

    def request_message(self, record: AuditRecord) -> jobs_pb2.AuditRequested:
        message = jobs_pb2.AuditRequested(audit_id=record.audit_id, tenant=record.tenant)
        json_format.ParseDict(record.model, message.model)
        json_format.ParseDict(record.data, message.data)
        json_format.ParseDict(record.options, message.options)
        return message

    def _publish_request(self, record: AuditRecord) -> None:
        publish_proto(
            self.runtime.bus,
            AUDIT_REQUESTED,
            self.request_message(record),
            key=record.audit_id,
            job_type=JOB_AUDIT,
        )

    def resume_unfinished(self) -> int:
        """Embedded mode only: the in-memory bus forgets records when the process exits,
        so audits left unfinished are requested again (stages are idempotent)."""
        count = 0
        for record in self.repository.list(limit=10_000):
            if not record.final:
                self._publish_request(record)
                count += 1
        return count

    # --- events ----------------------------------------------------------------------
    def apply_event(self, event: jobs_pb2.AuditEvent, at: float | None = None) -> None:
        """Record a stage event; ``at`` is when it was published (default: now).

        The record is written last: a crash (or a store outage) before that leaves the
        event uncommitted and it is applied again. Everything this writes before the
        record — the signed report, the repaired model's signature — depends only on the
        record and ``at``, so the second application writes the same bytes (content
        addressed: the same objects) instead of a second report."""
        now = time.time() if at is None else at
        status = event.stage
        state = STAGE_STATE_NAMES.get(status.state)
        if state is None:
            raise InvalidInput(f"stage event with unknown state {status.state}")
        with self.repository.lock(event.audit_id):
            try:
                record = self.repository.get(event.audit_id)
            except NotFound:
                # an event for an audit this deployment never accepted: bad input
                raise InvalidInput(f"event for unknown audit {event.audit_id!r}") from None
            stage = record.stages.get(status.stage)
            if stage is None:
                raise InvalidInput(f"event for unknown stage {status.stage!r}")
            if record.final or stage.final:
                # at-least-once delivery: a redelivered job reports again; the first
                # final outcome is the one recorded
                self.metrics.jobs.labels("duplicate").inc()
                return
            self.stage_events.labels(status.stage, state).inc()
            stage.state = state
            stage.progress = status.progress
            stage.message = status.message
            stage.updated_at = now
            if status.summary_json:
                stage.summary = json.loads(status.summary_json)
            if status.result.sha256:
                stage.result = record_of(ref_from_proto(status.result))
            if status.HasField("error"):
                stage.error_code = status.error.code
                stage.error = status.error.message
            if state == STAGE_RUNNING and record.state == QUEUED:
                record.state = RUNNING
            repaired = stage.summary.get("repaired_model") if status.stage == STAGE_REPAIR else None
            if state == DONE and isinstance(repaired, dict):
                record.repaired_model = self._sign(ArtifactRef(**repaired), "repaired-model")
            if stage.final:
                self._grant(record, {"result": asdict_or_none(stage.result), **stage.summary})
            self._cascade(record, status.stage, state)
            if all(s.final for s in record.stages.values()):
                self._finish(record, now)
            self.repository.put(record)

    def _cascade(self, record: AuditRecord, stage: str, state: str) -> None:
        """A failed or skipped stage leaves the stages after it with nothing to do."""
        if state not in (STAGE_FAILED, SKIPPED):
            return
        chain = {
            "trigger-reversal": (STAGE_NEURON_SCORING, STAGE_REPAIR),
            STAGE_NEURON_SCORING: (STAGE_REPAIR,),
        }
        for later in chain.get(stage, ()):
            follower = record.stages[later]
            if not follower.final:
                follower.state = SKIPPED
                follower.message = f"{stage} {'failed' if state == STAGE_FAILED else 'skipped'}"

    def _finish(self, record: AuditRecord, finished_at: float) -> None:
        with span("audit report", audit_id=record.audit_id, tenant=record.tenant):
            self._finish_report(record, finished_at)

    def _finish_report(self, record: AuditRecord, finished_at: float) -> None:
        report_json, report_html = build_report(record, self.runtime.store, finished_at)
        record.report_json = self._sign(
            self.runtime.store.put_blob(report_json, "application/json"), "report"
        )
        record.report_html = self._sign(
            self.runtime.store.put_blob(report_html, "text/html"), "report"
        )
        self._grant(
            record,
            [
                asdict_or_none(a)
                for a in (record.report_json, record.report_html, record.repaired_model)
            ],
        )
        failed = [s for s in record.stages.values() if s.state == STAGE_FAILED]
        record.state = FAILED if failed else SUCCEEDED
        record.error = "; ".join(f"{s.name}: {s.error or s.message}" for s in failed)
        self.audit_seconds.observe(finished_at - record.created_at)
        self.metrics.jobs.labels(record.state).inc()
        log.info("audit %s %s", record.audit_id, record.state)

    # --- queries ---------------------------------------------------------------------
    def get(self, audit_id: str, caller: Identity | None = None) -> AuditRecord:
        record = self.repository.get(audit_id)
        if caller is not None and not caller.sees(record.tenant):
            raise NotFound(f"no audit {audit_id!r}")  # same answer as a missing audit
        return record

    def list(self, limit: int = 50, caller: Identity | None = None) -> list[AuditRecord]:
        records = [
            r for r in self.repository.list(10_000) if caller is None or caller.sees(r.tenant)
        ]
        counts: dict[str, int] = {}
        for record in records:
            counts[record.state] = counts.get(record.state, 0) + 1
        for state in (QUEUED, RUNNING, SUCCEEDED, FAILED):
            self.audits_by_state.labels(state).set(counts.get(state, 0))
        return records[: limit or 50]

    def watch(
        self, audit_id: str, is_active: Callable[[], bool], caller: Identity | None = None
    ) -> Iterator[AuditRecord]:
        """Yield the record at once and on every change until it is final. While the
        store is unreachable the stream stays open and waits (a watcher cannot tell an
        outage of the store from one of the orchestrator, so it would only reconnect)."""
        version = -1
        updated = -1.0
        while is_active():
            try:
                record = self.get(audit_id, caller)
            except Unavailable:
                if version < 0:
                    raise  # nothing shown yet: let the client know at once
                log.warning("watch of %s waits for the store", audit_id)
                self.repository.wait_for_change(self.settings.watch_poll_seconds)
                continue
            if (record.version, record.updated_at) != (version, updated):
                version, updated = record.version, record.updated_at
                yield record
            if record.final:
                return
            self.repository.wait_for_change(self.settings.watch_poll_seconds)

    def summary(self, record: AuditRecord) -> dict[str, Any]:
        return {name: stage.state for name, stage in record.stages.items()}

    # --- the repair stage ------------------------------------------------------------
    def repair(self, request: RepairRequest, progress: Progress | None = None) -> RepairOutcome:
        """Repair a copy of the model against the reversed triggers (the defender never
        sees the real one), store it in the submitted format and summarise the repair
        (curve plot included)."""
        from modelguard.formats.loader import LoadedModel, save_model
        from modelguard.repair.registry import repair

        inputs = request.inputs
        if inputs.data is None:
            raise InvalidInput("the repair needs the clean dataset")
        mode = request.mode or DEFAULT_REPAIR_MODE
        result = repair(
            inputs.model.module,
            inputs.data,
            inputs.spec,
            request.triggers,
            mode=mode,
            layer=request.layer or None,
            progress=progress,
            ranking=request.ranking,
        )
        if result.model is None:
            raise RuntimeError("repair returned no model")
        store = self.runtime.store
        repaired = LoadedModel(
            module=result.model,
            format=inputs.model.format,
            arch=inputs.model.arch,
            num_classes=inputs.model.num_classes,
        )
        model_ref = store.put_blob(
            save_model(repaired), request.media_type or "application/octet-stream"
        )
        summary = repair_summary(result, mode)
        summary["repaired_model"] = _ref_dict(model_ref)
        curve = summary.get("curve") or []
        if curve:
            plot = curve_png(curve, title=f"{mode} pruning")
            summary["images"] = {"curve": _ref_dict(store.put_blob(plot, "image/png"))}
        summary_ref = store.put_blob(
            json.dumps(summary, default=_json_default).encode(), "application/json"
        )
        return RepairOutcome(result, mode, model_ref, summary_ref, summary)


def check_robustness_options(
    options: jobs_pb2.AuditOptions, value_range: tuple[float, float]
) -> None:
    """Refuse robustness options the stage would refuse (``InvalidInput``), at submission
    rather than in the worker minutes later: the norm, the steps, ε (positive; under L∞
    within the data's value range)."""
    from modelguard.robustness import RobustnessConfig

    config = RobustnessConfig.of_request(
        options.robustness_eps, options.robustness_norm, options.robustness_steps
    )
    low, high = value_range
    if config.norm == "linf" and config.eps[-1] > high - low:
        raise InvalidInput(
            f"an L∞ ε of {config.eps[-1]:g} exceeds the value range {low:g}..{high:g}: ε is "
            "measured in the data's own units"
        )


def asdict_or_none(record: ArtifactRecord | None) -> dict[str, Any] | None:
    return dataclasses.asdict(record) if record is not None else None


def repair_summary(result: RepairResult, mode: str) -> dict[str, Any]:
    """The repair stage's summary without the store references `Orchestrator.repair` adds
    (``repaired_model``, ``images``): the result, its mode and the verdict."""
    summary: dict[str, Any] = result.to_dict()
    summary["mode"] = mode
    summary["verdict"] = (
        "repaired" if result.after.reversed_asr < REPAIRED_ASR else "partially repaired"
    )
    return summary


def _ref_dict(ref: ArtifactRef) -> dict[str, Any]:
    return {"sha256": ref.sha256, "key": ref.key, "size": ref.size, "media_type": ref.media_type}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, io.BytesIO):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
