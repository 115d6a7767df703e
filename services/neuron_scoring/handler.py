"""Kafka handler: triggers reversed -> neurons scored."""

from __future__ import annotations

from modelguard.bus.base import Message
from modelguard.convert import ref_from_proto, ref_to_proto
from modelguard.convert_ranking import ranking_to_proto
from modelguard.detection.triggers import load_triggers
from modelguard.jobdata import load_inputs
from modelguard.progress import Progress
from modelguard.proto.modelguard.v1 import jobs_pb2
from modelguard.services.neuron_scoring.service import NeuronScoringService
from modelguard.stage import StageOutcome, StageReporter, publish_proto, run_audit_stage
from modelguard.topics import JOB_AUDIT, NEURONS_SCORED


class TriggersHandler:
    def __init__(self, service: NeuronScoringService, reporter: StageReporter) -> None:
        self.service = service
        self.reporter = reporter

    def __call__(self, message: Message) -> None:
        run_audit_stage(
            self.reporter,
            message,
            jobs_pb2.TriggersReversed,
            lambda m: m.request.audit_id,
            self.handle,
            tenant=lambda m: m.request.tenant,
        )

    def handle(self, reversed_: jobs_pb2.TriggersReversed, progress: Progress) -> StageOutcome:
        runtime = self.service.runtime
        request = reversed_.request
        inputs = load_inputs(runtime.store, request.model, request.data, runtime.platform)
        triggers = load_triggers(
            runtime.store.get_blob(ref_from_proto(reversed_.reversal)),
            list(reversed_.flagged_labels),
        )
        stored = self.service.score(
            inputs,
            triggers,
            layer=request.options.layer,
            seed=request.options.seed,
            progress=progress,
        )
        publish_proto(
            runtime.bus,
            NEURONS_SCORED,
            jobs_pb2.NeuronsScored(
                triggers=reversed_,
                scores=ref_to_proto(stored.ref),
                ranking=ranking_to_proto(stored.ranking),
            ),
            key=request.audit_id,
            job_type=JOB_AUDIT,
        )
        return StageOutcome(
            result=stored.ref,
            summary=stored.summary,
            message=f"ranked {stored.summary['neuron_count']} neurons of {stored.summary['layer']}",
        )
