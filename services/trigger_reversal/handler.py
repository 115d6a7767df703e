"""Kafka handlers: audit requested -> triggers reversed (or the rest skipped when clean);
audit requested -> the robustness stage, when the audit asks for it."""

from __future__ import annotations

from modelguard.bus.base import Message
from modelguard.convert import parse_message, ref_to_proto
from modelguard.errors import InvalidInput
from modelguard.jobdata import load_inputs, load_reference_model
from modelguard.progress import Progress
from modelguard.proto.modelguard.v1 import common_pb2, jobs_pb2
from modelguard.services.trigger_reversal.service import RobustnessStage, TriggerReversalService
from modelguard.stage import StageOutcome, StageReporter, publish_proto, run_audit_stage
from modelguard.topics import JOB_AUDIT, STAGE_NEURON_SCORING, TRIGGERS_REVERSED


class AuditHandler:
    def __init__(self, service: TriggerReversalService, reporter: StageReporter) -> None:
        self.service = service
        self.reporter = reporter

    def __call__(self, message: Message) -> None:
        run_audit_stage(
            self.reporter,
            message,
            jobs_pb2.AuditRequested,
            lambda m: m.audit_id,
            self.handle,
            tenant=lambda m: m.tenant,
        )

    def handle(self, request: jobs_pb2.AuditRequested, progress: Progress) -> StageOutcome:
        runtime = self.service.runtime
        inputs = load_inputs(runtime.store, request.model, request.data, runtime.platform)
        if inputs.data is None:
            raise InvalidInput("trigger reversal needs the clean dataset")
        reference = load_reference_model(
            runtime.store,
            request.options.reference_model,
            request.model,
            runtime.platform,
            num_classes=inputs.model.num_classes,
        )
        stored = self.service.reverse(
            inputs,
            steps=request.options.reversal_steps,
            seed=request.options.seed,
            rule=request.options.detection_rule,
            detector=request.options.detector,
            progress=progress,
            reference=reference,
            reference_name=f"sha256:{request.options.reference_model.sha256[:12]}",
        )
        result = stored.result
        if result.verdict == "infected":
            publish_proto(
                runtime.bus,
                TRIGGERS_REVERSED,
                jobs_pb2.TriggersReversed(
                    request=request,
                    reversal=ref_to_proto(stored.triggers),
                    summary=ref_to_proto(stored.summary_ref),
                    flagged_labels=list(result.flagged),
                    infected=True,
                ),
                key=request.audit_id,
                job_type=JOB_AUDIT,
            )
        else:
            self.reporter.event(
                request.audit_id,
                common_pb2.STAGE_STATE_SKIPPED,
                stage=STAGE_NEURON_SCORING,
                message="no backdoor found: nothing to score",
            )
        flagged = ", ".join(map(str, result.flagged)) or "none"
        return StageOutcome(
            result=stored.summary_ref,
            summary=stored.summary,
            message=f"verdict {result.verdict}; flagged labels: {flagged}",
        )


class RobustnessHandler:
    """The robustness stage (see `modelguard.services.trigger_reversal.service`). An
    audit without ε was recorded as not run when it was submitted: its request is
    acknowledged here without a word (no event: the stage is already final)."""

    def __init__(self, stage: RobustnessStage, reporter: StageReporter) -> None:
        self.stage = stage
        self.reporter = reporter

    def __call__(self, message: Message) -> None:
        if not parse_message(message.value, jobs_pb2.AuditRequested).options.robustness_eps:
            return
        run_audit_stage(
            self.reporter,
            message,
            jobs_pb2.AuditRequested,
            lambda m: m.audit_id,
            self.handle,
            tenant=lambda m: m.tenant,
        )

    def handle(self, request: jobs_pb2.AuditRequested, progress: Progress) -> StageOutcome:
        options = request.options
        # the options first: bad ones fail the stage before any artifact is read
        config = self.stage.config(
            options.robustness_eps,
            norm=options.robustness_norm,
            steps=options.robustness_steps,
            seed=options.seed,
        )
        runtime = self.stage.runtime
        inputs = load_inputs(runtime.store, request.model, request.data, runtime.platform)
        if inputs.data is None:
            raise InvalidInput("the robustness stage needs the clean dataset")
        stored = self.stage.evaluate(inputs, config, progress)
        largest = stored.result.points[-1]
        return StageOutcome(
            result=stored.summary_ref,
            summary=stored.summary,
            message=(
                f"verdict {stored.verdict}; robust accuracy {largest.robust_accuracy:.1%} "
                f"at ε = {largest.eps:g} ({config.norm})"
            ),
        )
