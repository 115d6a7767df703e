"""Fine-Pruning baseline (Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against
Backdooring Attacks on Deep Neural Networks", RAID 2018), for comparison.

It needs no trigger: neurons of the layer are pruned in increasing order of their mean
activation on clean data (backdoor neurons tend to be dormant on clean inputs) for as
long as clean validation accuracy stays within ``max_accuracy_drop`` of the original's
(the paper uses 4%), then the model is fine-tuned on clean data only. The reversed
trigger's ASR is measured along the way for the report but never used for a decision.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from modelguard.datasets import Dataset
from modelguard.detection.triggers import ReversedTrigger
from modelguard.nn.probe import spatial_mean
from modelguard.progress import Progress
from modelguard.repair.context import FineTuneConfig, RepairContext
from modelguard.repair.result import CurveStep, RepairResult
from modelguard.repair.scoring import NeuronRanking, weight_magnitude
from modelguard.spec import InputSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinePruningConfig:
    """``max_accuracy_drop``: largest tolerated fall of clean validation accuracy while
    pruning. ``max_pruned_fraction``: cap on the pruned share of the layer. ``batch``:
    prefixes scored per batched pass. ``finetune`` defaults to the paper's fine-tune:
    cross-entropy on the clean labels, no trigger unlearning (the baseline knows no
    trigger)."""

    max_accuracy_drop: float = 0.04
    max_pruned_fraction: float = 0.9
    batch: int = 16
    activation_samples: int = 1000
    validation_fraction: float = 0.3
    attack_samples: int = 500
    val_samples: int = 1000
    finetune: FineTuneConfig = field(
        default_factory=lambda: FineTuneConfig(unlearn_fraction=0.0, final_objective="labels")
    )
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_accuracy_drop < 1.0:
            raise ValueError("max_accuracy_drop must be in [0, 1)")
        if not 0.0 < self.max_pruned_fraction <= 1.0:
            raise ValueError("max_pruned_fraction must be in (0, 1]")
        if self.batch < 1 or self.activation_samples < 1:
            raise ValueError("batch and activation_samples must be >= 1")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError("validation_fraction must be in (0, 1)")


def dormancy_order(context: RepairContext, samples: int, seed: int) -> torch.Tensor:
    """Neuron indices by increasing mean (ReLU) activation on clean fine-tuning samples;
    by increasing weight norm when activations are not observable."""
    probe = context.probe
    if probe.can_capture:
        clean = context.tune.subset(min(samples, len(context.tune)), seed=seed)
        _, activation = probe.capture(clean.x, lambda z: spatial_mean(z.clamp_min(0)))
        key = activation.mean(0)
    else:
        context.notes.append("activations unobservable: dormancy approximated by weight norm")
        key = weight_magnitude(context.pruner.module, side=context.probe.info.side)
    return torch.sort(key, stable=True).indices


def fine_pruning(
    model: nn.Module,
    data: Dataset,
    spec: InputSpec,
    triggers: Any,
    config: FinePruningConfig = FinePruningConfig(),
    *,
    layer: str | None = None,
    progress: Progress | None = None,
) -> RepairResult:
    """Repair ``model`` **in place** with Fine-Pruning (see the module docstring).
    ``triggers`` only serve to report the reversed ASR."""
    started = time.perf_counter()
    context = RepairContext.build(
        model,
        data,
        spec,
        triggers,
        layer=layer,
        validation_fraction=config.validation_fraction,
        attack_samples=config.attack_samples,
        val_samples=config.val_samples,
        finetune=replace(config.finetune, local_unlearn=False),
        seed=config.seed,
        progress=progress,
    )
    context.triggers = []  # the baseline fine-tunes on clean data only
    name, neurons = context.probe.info.name, context.probe.neurons
    before = context.measure()
    order = dormancy_order(context, config.activation_samples, config.seed)
    limit = max(1, int(config.max_pruned_fraction * neurons))
    floor = before.accuracy - config.max_accuracy_drop
    curve: list[CurveStep] = []
    keep_count = 0
    stopped = False
    for start in range(0, limit, config.batch):
        lengths = list(range(start + 1, min(start + config.batch, limit) + 1))
        keep = torch.ones(len(lengths), neurons)
        for row, length in enumerate(lengths):
            keep[row, order[:length]] = 0
        scored = context.candidates(keep)
        for row, length in enumerate(lengths):
            ok = float(scored.accuracy[row]) >= floor
            curve.append(
                CurveStep(
                    length,
                    name,
                    int(order[length - 1]),
                    float(scored.asr[row]),
                    float(scored.agreement[row]),
                    "kept" if ok else "rolled_back",
                    "" if ok else "accuracy_drop",
                )
            )
            if not ok:
                stopped = True
                break
            keep_count = length
        context.report(0.8 * min(1.0, keep_count / limit), f"{keep_count} dormant neurons pruned")
        if stopped:
            break
    for index in order[:keep_count].tolist():
        context.pruner.prune(int(index))
    context.report(0.85, "fine-tuning on clean data")
    after = context.final_fine_tune(revival=None)
    return RepairResult(
        mode=FinePruning.name,
        layer=name,
        target_labels=list(context.attack.labels),
        pruned=[(name, i) for i in context.pruner.pruned],
        before=before,
        after=after,
        curve=curve,
        evaluations=context.evaluations,
        seconds=time.perf_counter() - started,
        neurons=neurons,
        model=model,
        finetune_steps=context.finetune_steps,
        probe_mode=context.probe.mode,
        notes=list(context.notes),
        edit=context.edit,
    )


class FinePruning:
    """The `modelguard.repair.base.RepairMode` of the Fine-Pruning baseline (`fine_pruning`):
    it orders by clean dormancy, not by a ranking."""

    name: ClassVar[str] = "fine-pruning"
    config_type: ClassVar[type[Any]] = FinePruningConfig
    uses_ranking: ClassVar[bool] = False

    def repair(
        self,
        model: nn.Module,
        data: Dataset,
        spec: InputSpec,
        triggers: Sequence[ReversedTrigger],
        *,
        layer: str | None = None,
        config: FinePruningConfig | None = None,
        ranking: NeuronRanking | None = None,
        progress: Progress | None = None,
    ) -> RepairResult:
        return fine_pruning(
            model,
            data,
            spec,
            triggers,
            config or FinePruningConfig(),
            layer=layer,
            progress=progress,
        )
