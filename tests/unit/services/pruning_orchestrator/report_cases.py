"""Audit records of the report kinds (infected and repaired, clean, leak, a failed stage,
a fragile model, masked gradients), their summaries made by the stages' own summary
builders from real result objects, with pictures in a local store: what the orchestrator
turns into a report."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from modelguard.datasets import Dataset
from modelguard.detection.neural_cleanse import (
    CLEAN,
    INFECTED,
    LabelResult,
    ReversalConfig,
    ReversalResult,
    screening_run,
)
from modelguard.detection.render import trigger_pngs
from modelguard.leak.detector import BENIGN, LEAK, Evidence, LeakVerdict
from modelguard.leak.features import layer_statistics
from modelguard.nn.architectures import build
from modelguard.repair.result import CurveStep, Measure, RepairResult
from modelguard.robustness import (
    AttackAccuracy,
    RobustnessConfig,
    RobustnessResult,
    RobustPoint,
    robustness_verdict,
)
from modelguard.robustness.evaluate import masking_check
from modelguard.services.pruning_orchestrator.report import curve_png
from modelguard.services.pruning_orchestrator.service import repair_summary
from modelguard.services.pruning_orchestrator.state import AuditRecord, StageRecord
from modelguard.services.trigger_reversal.service import reversal_summary, robustness_summary
from modelguard.store.base import ArtifactRef, ArtifactStore

MODEL = {
    "arch": "lenet5",
    "format": "MODEL_FORMAT_SAFETENSORS",
    "input": {"shape": [1, 28, 28]},
}
CREATED_AT = 1_780_000_000.0


def _ref(ref: ArtifactRef) -> dict[str, object]:
    return {"sha256": ref.sha256, "key": ref.key, "size": ref.size, "media_type": ref.media_type}


def reversal(
    store: ArtifactStore, *, classes: int, optimised: int, flagged: tuple[int, ...]
) -> dict[str, object]:
    """A Neural Cleanse summary over ``classes`` labels of which the first ``optimised``
    have triggers (the rest triaged out), ``flagged`` ones far smaller; with pictures."""
    generator = torch.Generator().manual_seed(0)
    norms: list[float | None] = [
        (4.0 if k in flagged else 40.0 + 5 * float(torch.rand(1, generator=generator)))
        if k < optimised
        else None
        for k in range(classes)
    ]
    config = ReversalConfig()
    run = screening_run(norms, config, seed=0, steps=300)
    labels = tuple(
        LabelResult(
            label=k,
            l1_norm=norm if norm is not None else math.nan,
            anomaly_index=(run.anomaly_index[k] or 0.0) if norm is not None else math.nan,
            attack_success=0.99 if k in flagged else 0.4,
            reached_threshold=norm is not None,
            refined=k in flagged,
            optimised=k < optimised,
        )
        for k, norm in enumerate(norms)
    )
    masks = torch.zeros(optimised, 28, 28)
    masks[:, 22:26, 22:26] = 1.0
    patterns = torch.rand(optimised, 1, 28, 28, generator=generator)
    result = ReversalResult(
        labels=labels,
        flagged=flagged,
        verdict=INFECTED if flagged else CLEAN,
        masks=masks,
        patterns=patterns,
        restarts=(run,),
        steps=3000,
        evaluations=120_000,
        seconds=42.0,
        evidence={
            "summary": f"labels {list(flagged)} are outliers" if flagged else "no outlier",
            "median_norm": run.median,
            "threshold": config.anomaly_threshold,
            "labels_optimised": optimised,
        },
        config=config,
        trigger_labels=tuple(range(optimised)),
    )
    summary = reversal_summary(result, "neural-cleanse")
    clean = Dataset(torch.rand(8, 1, 28, 28, generator=generator), torch.arange(8))
    summary["images"] = {
        name: _ref(store.put_blob(png, "image/png"))
        for name, png in trigger_pngs(result, flagged, clean=clean).items()
    }
    return summary


def repair(store: ArtifactStore, target: int, steps: int = 240) -> dict[str, object]:
    """A repair summary with a long pruning curve (every fifth step rolled back)."""
    curve = [
        CurveStep(
            step=k,
            layer="fc1",
            index=k,
            asr=max(0.01, 0.99 - k / steps),
            agreement=1.0 - 0.04 * k / steps,
            action="rolled_back" if k % 5 == 4 else "kept",
            reason="asr_not_dropped" if k % 5 == 4 else "",
        )
        for k in range(steps)
    ]
    kept = [(s.layer, s.index) for s in curve if s.action == "kept"]
    result = RepairResult(
        mode="activation",
        layer="fc1",
        target_labels=[target],
        pruned=kept,
        before=Measure(agreement=1.0, reversed_asr=0.99, accuracy=0.985),
        after=Measure(agreement=0.96, reversed_asr=0.02, accuracy=0.972),
        curve=curve,
        evaluations=900,
        seconds=61.0,
        neurons=500,
    )
    summary = repair_summary(result, "activation")
    summary["repaired_model"] = _ref(store.put_blob(b"repaired weights"))
    summary["images"] = {"curve": _ref(store.put_blob(curve_png(summary["curve"]), "image/png"))}
    return summary


def leak(*, leaking: bool) -> dict[str, object]:
    """A leak detector summary with LeNet-5's real per-layer statistics."""
    layers = layer_statistics(build("lenet5"))
    evidence = (
        [
            Evidence("fc1", "sign_imbalance", 0.31, 0.2, 0.05, 4.0, "dense"),
            Evidence("fc1", "quantile_skewness", 0.4, 0.1, 0.05, 2.0, "dense"),
            Evidence("conv2", "negative_cokurtosis", -0.8, 0.09, 0.06, 1.5, "conv"),
        ]
        if leaking
        else [Evidence("fc2", "sign_imbalance", 0.02, 0.01, 0.05, 0.2, "dense")]
    )
    score = max(e.score for e in evidence)
    verdict = LeakVerdict(LEAK if leaking else BENIGN, score, evidence, layers, 0.4, 1.0)
    return verdict.to_dict()


def robustness(*, masked: bool) -> dict[str, object]:
    """A robustness summary at ε 0.05, 0.1, 0.2, 0.3 (L∞) on 200 images: a standard
    model's steep fall; ``masked``: PGD does worse than one FGSM step and an unbounded
    attack leaves images correct, which the gradient-masking check flags."""
    config = RobustnessConfig(eps=(0.05, 0.1, 0.2, 0.3), steps=40)
    fgsm = (0.71, 0.42, 0.12, 0.03)
    pgd = (0.83, 0.74, 0.69, 0.66) if masked else (0.55, 0.18, 0.02, 0.0)
    strong = (0.83, 0.74, 0.69, 0.66) if masked else (0.54, 0.17, 0.01, 0.0)
    points = tuple(
        RobustPoint(
            eps=eps,
            robust_accuracy=min(fgsm[i], pgd[i], strong[i]),
            attacks=(
                AttackAccuracy("fgsm", fgsm[i], 0.99 - fgsm[i]),
                AttackAccuracy("pgd", pgd[i], 0.99 - pgd[i]),
                AttackAccuracy("pgd-strong", strong[i], 0.99 - strong[i]),
            ),
        )
        for i, eps in enumerate(config.eps)
    )
    masking = masking_check(
        points,
        config,
        images=200,
        zero_gradient_fraction=0.0,
        unbounded_accuracy=0.6 if masked else 0.0,
    )
    result = RobustnessResult(
        config=config,
        images=200,
        clean_accuracy=0.99,
        points=points,
        masking=masking,
        seconds=95.0,
        batch_size=200,
        notes=("a seeded subset of 200 images was attacked",),
    )
    return robustness_summary(result, robustness_verdict(result))


def _record(audit_id: str, stages: dict[str, StageRecord]) -> AuditRecord:
    record = AuditRecord.new(audit_id, MODEL, {}, {"repair": True})
    record.created_at = CREATED_AT
    # not requested unless the case says otherwise, as the orchestrator records it
    record.stages["robustness"] = StageRecord(name="robustness", state="skipped")
    record.stages.update(stages)
    return record


def _done(name: str, summary: dict[str, object]) -> StageRecord:
    return StageRecord(name=name, state="done", summary=summary)


def _not_run(name: str) -> StageRecord:
    return StageRecord(name=name, state="not_run")


def infected_and_repaired(store: ArtifactStore) -> AuditRecord:
    return _record(
        "infected-repaired",
        {
            "leak-detector": _done("leak-detector", leak(leaking=False)),
            "trigger-reversal": _done(
                "trigger-reversal", reversal(store, classes=10, optimised=10, flagged=(3,))
            ),
            "neuron-scoring": _done(
                "neuron-scoring",
                {
                    "layer": "fc1",
                    "neuron_count": 500,
                    "top_by_activation": list(range(10)),
                    "top_by_weight": list(range(10, 20)),
                    "model_evaluations": 0,
                    "data_split": "validation",
                    "neurons": [{"index": k, "activation": 1.0 / (k + 1)} for k in range(10)],
                },
            ),
            "repair": _done("repair", repair(store, 3)),
        },
    )


def clean(store: ArtifactStore) -> AuditRecord:
    return _record(
        "clean",
        {
            "leak-detector": _done("leak-detector", leak(leaking=False)),
            # a 1000-class model: the triage optimised 24 labels, the others have no norm
            "trigger-reversal": _done(
                "trigger-reversal", reversal(store, classes=1000, optimised=24, flagged=())
            ),
            "neuron-scoring": StageRecord(name="neuron-scoring", state="skipped"),
            "repair": StageRecord(name="repair", state="skipped"),
        },
    )


def leaking(store: ArtifactStore) -> AuditRecord:
    return _record(
        "leak",
        {
            "leak-detector": _done("leak-detector", leak(leaking=True)),
            "trigger-reversal": _done(
                "trigger-reversal", reversal(store, classes=10, optimised=10, flagged=())
            ),
            "neuron-scoring": StageRecord(name="neuron-scoring", state="skipped"),
            "repair": StageRecord(name="repair", state="skipped"),
        },
    )


def failed_stage(store: ArtifactStore) -> AuditRecord:
    return _record(
        "failed-stage",
        {
            "leak-detector": _done("leak-detector", leak(leaking=False)),
            "trigger-reversal": StageRecord(
                name="trigger-reversal",
                state="failed",
                error_code="DEADLINE_EXCEEDED",
                error="the reversal ran out of its 480 s budget",
            ),
            "neuron-scoring": _not_run("neuron-scoring"),
            "repair": _not_run("repair"),
        },
    )


def fragile(store: ArtifactStore) -> AuditRecord:
    return _record(
        "fragile",
        {
            "leak-detector": _done("leak-detector", leak(leaking=False)),
            "trigger-reversal": _done(
                "trigger-reversal", reversal(store, classes=10, optimised=10, flagged=())
            ),
            "robustness": _done("robustness", robustness(masked=False)),
            "neuron-scoring": StageRecord(name="neuron-scoring", state="skipped"),
            "repair": StageRecord(name="repair", state="skipped"),
        },
    )


def masked_gradients(store: ArtifactStore) -> AuditRecord:
    return _record(
        "masked-gradients",
        {
            "leak-detector": _done("leak-detector", leak(leaking=False)),
            "trigger-reversal": _done(
                "trigger-reversal", reversal(store, classes=10, optimised=10, flagged=())
            ),
            "robustness": _done("robustness", robustness(masked=True)),
            "neuron-scoring": StageRecord(name="neuron-scoring", state="skipped"),
            "repair": StageRecord(name="repair", state="skipped"),
        },
    )


#: The report kinds by name.
CASES: dict[str, Callable[[ArtifactStore], AuditRecord]] = {
    "infected-repaired": infected_and_repaired,
    "clean": clean,
    "leak": leaking,
    "failed-stage": failed_stage,
    "fragile": fragile,
    "masked-gradients": masked_gradients,
}
