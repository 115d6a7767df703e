"""Shapley pruning (ShapPruning: Guan et al., "Few-shot Backdoor Defense Using Shapley
Estimation", CVPR 2022).

Each round estimates the Shapley value of every still-unpruned neuron of the layer for the
reversed trigger's attack success rate, with the neurons pruned so far held pruned
(`modelguard.repair.shapley.estimate_shapley`: truncated Monte Carlo permutations,
ε-greedy refinement of the top candidates), then prunes the ``per_round`` neurons of
highest value. Rounds repeat until the reversed ASR converges: it is below ``asr_stop``
(default 0.5%: converged to about zero; the reference method gives no number; stopping at the
rollback mode's 10% left the real trigger of a 3×3-patch LeNet-5 at 14% instead of 9%, and at 2%
the zoo ResNet's at 10.9% instead of 9.5%), or a round
lowered it by less than ``converge_tol``, or no neuron has a positive value left. The model
is then retrained on the clean fine-tuning split.

The reference method checks no accuracy between rounds (the retraining restores it); ``q0`` (off by
default) adds the rollback mode's agreement floor: neurons of a round are rolled back,
lowest value first, until the agreement with the original model is at least ``q0``.
``max_pruned_fraction`` bounds the damage instead. (With ``q0=0.97`` on an infected
LeNet-5, rounds stop after one or two neurons, long before the reversed ASR converges;
the retraining still removes the backdoor then, but pruning has done little.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from torch import nn

from modelguard.datasets import Dataset
from modelguard.detection.triggers import ReversedTrigger
from modelguard.progress import Progress
from modelguard.repair.context import FineTuneConfig, RepairContext
from modelguard.repair.result import CurveStep, RepairResult
from modelguard.repair.scoring import NeuronRanking, build_attack_set
from modelguard.repair.shapley import ShapleyConfig, estimate_shapley
from modelguard.spec import InputSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShapleyPruneConfig:
    """``per_round``: neurons pruned per round (the reference method's 预定数目). ``max_rounds`` and
    ``max_pruned_fraction`` bound the work (32 rounds of 2 reach the default budget, half
    of a 128-neuron layer, as in rollback: a backdoor spread over many features, as in the
    zoo's ResNet, needs ~33 neurons pruned; 10 rounds left its reversed ASR at 39%).
    ``min_value``: a neuron is pruned only when its value exceeds this. Other fields as in
    `RollbackConfig`."""

    shapley: ShapleyConfig = field(default_factory=ShapleyConfig)
    per_round: int = 2
    max_rounds: int = 32
    asr_stop: float = 0.005
    converge_tol: float = 0.01
    min_value: float = 0.0
    q0: float | None = None
    max_pruned_fraction: float = 0.5
    validation_fraction: float = 0.3
    attack_samples: int = 500
    val_samples: int = 1000
    finetune: FineTuneConfig = field(default_factory=FineTuneConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.per_round < 1 or self.max_rounds < 1:
            raise ValueError("per_round and max_rounds must be >= 1")
        if not 0.0 < self.asr_stop <= 1.0 or self.converge_tol < 0:
            raise ValueError("asr_stop in (0, 1] and converge_tol >= 0 required")
        if self.q0 is not None and not 0.0 < self.q0 <= 1.0:
            raise ValueError("q0 must be in (0, 1] or None")
        if not 0.0 < self.max_pruned_fraction <= 1.0:
            raise ValueError("max_pruned_fraction must be in (0, 1]")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError("validation_fraction must be in (0, 1)")


def shapley_prune(
    model: nn.Module,
    data: Dataset,
    spec: InputSpec,
    triggers: Any,
    config: ShapleyPruneConfig = ShapleyPruneConfig(),
    *,
    layer: str | None = None,
    progress: Progress | None = None,
) -> RepairResult:
    """Repair ``model`` **in place** by Shapley pruning (see the module docstring)."""
    started = time.perf_counter()
    context = RepairContext.build(
        model,
        data,
        spec,
        triggers,
        layer=layer or config.shapley.layer,
        validation_fraction=config.validation_fraction,
        attack_samples=config.attack_samples,
        val_samples=config.val_samples,
        finetune=config.finetune,
        seed=config.seed,
        progress=progress,
    )
    name, neurons = context.probe.info.name, context.probe.neurons
    pruner = context.pruner
    before = current = context.measure()
    curve: list[CurveStep] = []
    skip = context.skip_pruning()
    # the values are estimated on the fine-tuning split; decisions are measured on the
    # validation split
    shapley_attack = build_attack_set(
        context.tune, context.triggers, spec, samples=config.shapley.samples, seed=config.seed
    )
    budget = max(1, int(config.max_pruned_fraction * neurons))
    evaluations = 0
    last_values: list[float] | None = None
    step = 0
    reason = ""
    for round_index in range(0 if skip else config.max_rounds):
        if current.reversed_asr < config.asr_stop:
            reason = "converged: reversed ASR below the stop threshold"
            break
        if len(pruner.pruned) >= budget:
            reason = f"pruning budget reached ({budget} of {neurons} neurons)"
            break
        share = 0.05 + 0.8 * round_index / config.max_rounds

        def report(fraction: float, text: str, at: float = share) -> None:
            context.report(at + 0.8 * fraction / config.max_rounds, text)

        result = estimate_shapley(
            model,
            context.tune,
            context.triggers,
            spec,
            replace(config.shapley, layer=name, seed=config.shapley.seed + round_index),
            fixed=list(pruner.pruned),
            probe=context.probe,
            attack=shapley_attack,
            progress=report,
        )
        evaluations += result.evaluations
        last_values = [float(v) for v in result.values]
        chosen = [
            int(i)
            for i in result.ranking[: config.per_round]
            if float(result.values[i]) > config.min_value and int(i) not in pruner.pruned
        ][: budget - len(pruner.pruned)]
        if not chosen:
            reason = "converged: no neuron with a positive Shapley value left"
            break
        for index in chosen:
            pruner.prune(index)
        figures = context.measure()
        rolled_back: list[int] = []
        while (
            config.q0 is not None
            and figures.agreement < config.q0
            and len(rolled_back) < len(chosen)
        ):
            index = chosen[len(chosen) - 1 - len(rolled_back)]
            pruner.unprune(index)
            rolled_back.append(index)
            figures = context.measure()
        for index in chosen:
            step += 1
            kept = index not in rolled_back
            curve.append(
                CurveStep(
                    step,
                    name,
                    index,
                    figures.reversed_asr,
                    figures.agreement,
                    "kept" if kept else "rolled_back",
                    "" if kept else "agreement_below_q0",
                )
            )
        context.report(
            share,
            f"round {round_index + 1}: {len(pruner.pruned)} pruned, reversed ASR "
            f"{figures.reversed_asr:.3f}",
        )
        previous, current = current, figures
        if len(rolled_back) == len(chosen):
            reason = "stopped: every candidate of the round breaks the agreement floor q0"
            break
        if previous.reversed_asr - current.reversed_asr < config.converge_tol:
            reason = "converged: the reversed ASR stopped falling"
            break
    else:
        reason = "" if skip else f"round limit reached ({config.max_rounds})"
    if reason:
        context.notes.append(reason)
    if current.reversed_asr >= config.asr_stop:
        context.notes.append(
            f"reversed ASR {current.reversed_asr:.3f} before retraining "
            f"(target < {config.asr_stop})"
        )
    context.report(0.9, "retraining on the clean data")
    after = context.final_fine_tune(revival=max(config.asr_stop, 0.10))
    context.evaluations += evaluations
    return RepairResult(
        mode=ShapleyPruning.name,
        layer=name,
        target_labels=list(context.attack.labels),
        pruned=[(name, i) for i in pruner.pruned],
        before=before,
        after=after,
        curve=curve,
        evaluations=context.evaluations,
        seconds=time.perf_counter() - started,
        neurons=neurons,
        model=model,
        finetune_steps=context.finetune_steps,
        probe_mode=context.probe.mode,
        shapley_values=last_values,
        notes=list(context.notes),
        edit=context.edit,
    )


class ShapleyPruning:
    """The `modelguard.repair.base.RepairMode` of Shapley pruning (`shapley_prune`): it
    estimates its own values every round, so it takes no ranking."""

    name: ClassVar[str] = "shapley"
    config_type: ClassVar[type[Any]] = ShapleyPruneConfig
    uses_ranking: ClassVar[bool] = False

    def repair(
        self,
        model: nn.Module,
        data: Dataset,
        spec: InputSpec,
        triggers: Sequence[ReversedTrigger],
        *,
        layer: str | None = None,
        config: ShapleyPruneConfig | None = None,
        ranking: NeuronRanking | None = None,
        progress: Progress | None = None,
    ) -> RepairResult:
        return shapley_prune(
            model,
            data,
            spec,
            triggers,
            config or ShapleyPruneConfig(),
            layer=layer,
            progress=progress,
        )
