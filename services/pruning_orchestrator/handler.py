"""Kafka handlers of the pruning-orchestrator: stage events (audit state) and the repair
stage (neurons scored -> pruned, fine-tuned, signed model)."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import numpy as np

from services.pruning_orchestrator.service import Orchestrator
from shared.bus.base import Message
from shared.convert import parse_message, ref_from_proto
from shared.detection.triggers import load_triggers
from shared.formats.loader import LoadedModel, save_model
from shared.jobdata import load_inputs
from shared.plots import line_plot_png
from shared.proto.modelguard.v1 import jobs_pb2
from shared.stage import Progress, StageOutcome, StageReporter

log = logging.getLogger(__name__)


class EventsHandler:
    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator

    def __call__(self, message: Message) -> None:
        # the record's publish time, not the clock: a redelivered event then rebuilds the
        # very same record and report (see Orchestrator.apply_event)
        self.orchestrator.apply_event(
            parse_message(message.value, jobs_pb2.AuditEvent), at=message.timestamp or None
        )


class RepairHandler:
    """Runs the repair on the reversed trigger (the defender never sees the real one)."""

    def __init__(self, orchestrator: Orchestrator, reporter: StageReporter) -> None:
        self.orchestrator = orchestrator
        self.reporter = reporter

    def __call__(self, message: Message) -> None:
        scored = parse_message(message.value, jobs_pb2.NeuronsScored)
        request = scored.triggers.request
        if not request.audit_id:
            from shared.errors import InvalidInput

            raise InvalidInput("NeuronsScored message without an audit id")
        self.reporter.run(
            request.audit_id, lambda progress: self.repair(scored, progress), message.attempt
        )

    def repair(self, scored: jobs_pb2.NeuronsScored, progress: Progress) -> StageOutcome:
        from shared.repair.registry import repair

        request = scored.triggers.request
        runtime = self.orchestrator.runtime
        inputs = load_inputs(runtime.store, request.model, request.data, runtime.platform)
        assert inputs.data is not None
        triggers = load_triggers(
            runtime.store.get_blob(ref_from_proto(scored.triggers.reversal)),
            list(scored.triggers.flagged_labels),
        )
        mode = request.options.repair_mode or "rollback"
        result = repair(
            inputs.model.module,
            inputs.data,
            inputs.spec,
            triggers,
            mode=mode,
            layer=request.options.layer or None,
            progress=progress,
        )
        if result.model is None:
            raise RuntimeError("repair returned no model")
        repaired = LoadedModel(
            module=result.model,
            format=inputs.model.format,
            arch=inputs.model.arch,
            num_classes=inputs.model.num_classes,
        )
        model_ref = runtime.store.put_blob(
            save_model(repaired), request.model.artifact.media_type or "application/octet-stream"
        )
        summary: dict[str, Any] = result.to_dict()
        summary["mode"] = mode
        summary["verdict"] = (
            "repaired" if summary["after"]["reversed_asr"] < 0.1 else "partially repaired"
        )
        summary["repaired_model"] = {
            "sha256": model_ref.sha256,
            "key": model_ref.key,
            "size": model_ref.size,
            "media_type": model_ref.media_type,
        }
        curve = summary.get("curve") or []
        if curve:
            steps = [float(p["step"]) for p in curve]
            plot = line_plot_png(
                steps,
                {
                    "reversed-trigger ASR": [float(p["asr"]) for p in curve],
                    "agreement with original": [float(p["agreement"]) for p in curve],
                },
                title=f"{mode} pruning",
                xlabel="step",
            )
            summary["images"] = {"curve": _ref_dict(runtime.store.put_blob(plot, "image/png"))}
        result_ref = runtime.store.put_blob(
            json.dumps(summary, default=_json_default).encode(), "application/json"
        )
        return StageOutcome(
            result=result_ref,
            summary=summary,
            message=f"{len(summary.get('pruned', []))} neurons pruned",
        )


def _ref_dict(ref: Any) -> dict[str, Any]:
    return {"sha256": ref.sha256, "key": ref.key, "size": ref.size, "media_type": ref.media_type}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, io.BytesIO):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
