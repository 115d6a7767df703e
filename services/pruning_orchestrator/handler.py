"""Kafka handlers of the pruning-orchestrator: stage events (audit state) and the repair
stage (neurons scored -> pruned, fine-tuned, signed model). They only translate: parse the
message, resolve its references, call the `Orchestrator` use case, report the outcome."""

from __future__ import annotations

import logging

from modelguard.bus.base import Message
from modelguard.convert import parse_message, ref_from_proto
from modelguard.convert_ranking import carried_ranking
from modelguard.detection.triggers import load_triggers
from modelguard.errors import NotFound
from modelguard.jobdata import load_inputs
from modelguard.logs import job_context
from modelguard.progress import Progress
from modelguard.proto.modelguard.v1 import jobs_pb2
from modelguard.services.pruning_orchestrator.service import Orchestrator, RepairRequest
from modelguard.stage import StageOutcome, StageReporter, run_audit_stage
from modelguard.topics import STAGE_REPAIR

log = logging.getLogger(__name__)


class EventsHandler:
    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator

    def __call__(self, message: Message) -> None:
        event = parse_message(message.value, jobs_pb2.AuditEvent)
        # the record's publish time, not the clock: a redelivered event then rebuilds the
        # very same record and report (see Orchestrator.apply_event)
        with job_context(audit_id=event.audit_id, stage=event.stage.stage):
            self.orchestrator.apply_event(event, at=message.timestamp or None)


class RepairHandler:
    """Runs the repair on the reversed trigger (the defender never sees the real one)."""

    def __init__(self, orchestrator: Orchestrator, reporter: StageReporter) -> None:
        self.orchestrator = orchestrator
        self.reporter = reporter

    def __call__(self, message: Message) -> None:
        if self.already_recorded(parse_message(message.value, jobs_pb2.NeuronsScored)):
            return
        run_audit_stage(
            self.reporter,
            message,
            jobs_pb2.NeuronsScored,
            lambda m: m.triggers.request.audit_id,
            self.repair,
            tenant=lambda m: m.triggers.request.tenant,
        )

    def already_recorded(self, scored: jobs_pb2.NeuronsScored) -> bool:
        """True when the audit's repair outcome is already on its record: the message is a
        redelivery (the worker died between its outcome and its commit, or neuron-scoring
        ran twice) and a repair, minutes long on a real model, would change nothing."""
        audit_id = scored.triggers.request.audit_id
        if not audit_id:
            return False  # refused with its reason by the stage runner
        try:
            record = self.orchestrator.get(audit_id)
        except NotFound:
            return False  # no record to compare with: run, as before
        stage = record.stages.get(STAGE_REPAIR)
        if stage is None or not stage.final:
            return False
        log.info(
            "audit %s: repair already recorded (%s); redelivered job not run", audit_id, stage.state
        )
        return True

    def repair(self, scored: jobs_pb2.NeuronsScored, progress: Progress) -> StageOutcome:
        request = scored.triggers.request
        runtime = self.orchestrator.runtime
        outcome = self.orchestrator.repair(
            RepairRequest(
                inputs=load_inputs(runtime.store, request.model, request.data, runtime.platform),
                triggers=load_triggers(
                    runtime.store.get_blob(ref_from_proto(scored.triggers.reversal)),
                    list(scored.triggers.flagged_labels),
                ),
                mode=request.options.repair_mode,
                layer=request.options.layer,
                ranking=carried_ranking(scored),
                media_type=request.model.artifact.media_type,
            ),
            progress,
        )
        return StageOutcome(
            result=outcome.summary_ref,
            summary=outcome.summary,
            # a real-scale repair may edit the classifier without pruning: the ASR says more
            message=(
                f"{len(outcome.result.pruned)} neurons pruned, reversed ASR "
                f"{outcome.result.before.reversed_asr:.3f} → "
                f"{outcome.result.after.reversed_asr:.3f}"
            ),
        )
