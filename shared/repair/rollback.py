"""Pruning with rollback (Neural Cleanse-guided).

Neurons are taken alternately from the activation ranking and the weight ranking of
`modelguard.repair.scoring.score_neurons` (high to low), computed on the fine-tuning split:
the neuron-scoring stage's `NeuronRanking` when one is given (it scores on the same split,
`rank_on_tune_split`), else here. Each is pruned on its own;
then ``q_i`` (agreement with the original model on the clean validation split) and
``s_i`` (attack success rate of the *reversed* trigger on the stamped validation split)
are measured and

* the prune is **rolled back** when ``s_i`` did not drop meaningfully from ``s_{i-1}``
  (by at least ``min_drop`` in ASR, or ``min_soft_drop`` in the mean target-class
  probability: a single neuron of a redundant backdoor often weakens the attack without
  flipping a prediction yet, and the reference method asks whether the attack got weaker) or when
  ``q_i < q0`` (default 97% of the baseline agreement, which is 1);
* otherwise it is **kept** and the model is fine-tuned locally (``local_steps`` Adam
  steps on the clean fine-tuning split, pruned neurons held at zero).

The search stops once ``s_n < asr_stop`` (10%) with ``q_n ≥ q0``, then a final fine-tune
from the pruned weights restores clean accuracy. A second pass over the rankings
(``passes``) retries neurons rolled back in the first: pruning others can make them
matter.

Each candidate is evaluated by masking the layer's output, which gives exactly the
outputs of the zeroed weights; candidates after the current one are scored in the same
batched forward pass (speculatively: a rollback leaves the model unchanged, so their
figures stay valid; after a kept prune they are re-scored).
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
from modelguard.errors import InvalidInput
from modelguard.nn.probe import LayerProbe
from modelguard.progress import Progress
from modelguard.repair.context import (
    PROBE_MAX_ROWS,
    FineTuneConfig,
    RepairContext,
    can_split,
    split_clean,
    split_label,
)
from modelguard.repair.result import Action, CurveStep, Measure, RepairResult
from modelguard.repair.scoring import (
    NeuronRanking,
    NeuronScores,
    ScoringConfig,
    interleave,
    score_neurons,
)
from modelguard.spec import InputSpec

__all__ = [
    "Figures",
    "Rollback",
    "RollbackConfig",
    "decide",
    "interleave",
    "rank_on_tune_split",
    "rollback_prune",
    "should_stop",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RollbackConfig:
    """Thresholds of the rollback pruning; defaults are the rollback method's values.

    ``q0``: minimum agreement as a fraction of the baseline (1.0). ``asr_stop``: stop once
    the reversed ASR (max over triggers) is below it. ``min_drop``/``min_soft_drop``: what
    counts as a meaningful drop (``None`` disables the soft criterion). ``passes``: sweeps
    over the alternated rankings. ``max_pruned_fraction``: at most this share of the layer
    is pruned. ``speculate``: candidates scored per batched forward pass.
    ``max_candidates``: most candidates one sweep examines. A larger site (a real model's
    classifier input has a thousand or more features) is swept in groups of consecutive
    ranked neurons, each group one candidate: a backdoor spread over many features weakens
    no attack when one feature goes, and a sweep over every feature alone would take hours.
    ``validation_fraction``: share of the clean data held out for ``q_i`` and ``s_i``.
    ``attack_samples``/``val_samples``: caps on the stamped and validation sets.
    """

    q0: float = 0.97
    asr_stop: float = 0.10
    min_drop: float = 0.01
    min_soft_drop: float | None = 0.01
    passes: int = 2
    max_pruned_fraction: float = 0.5
    speculate: int = 8
    max_candidates: int = 256
    validation_fraction: float = 0.3
    attack_samples: int = 500
    val_samples: int = 1000
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    finetune: FineTuneConfig = field(default_factory=FineTuneConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.q0 <= 1.0:
            raise ValueError("q0 must be in (0, 1]")
        if not 0.0 < self.asr_stop <= 1.0:
            raise ValueError("asr_stop must be in (0, 1]")
        if self.min_drop < 0 or (self.min_soft_drop is not None and self.min_soft_drop < 0):
            raise ValueError("min_drop and min_soft_drop must be >= 0")
        if self.passes < 1 or self.speculate < 1 or self.max_candidates < 1:
            raise ValueError("passes, speculate and max_candidates must be >= 1")
        if not 0.0 < self.max_pruned_fraction <= 1.0:
            raise ValueError("max_pruned_fraction must be in (0, 1]")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError("validation_fraction must be in (0, 1)")
        if self.attack_samples < 1 or self.val_samples < 1:
            raise ValueError("attack_samples and val_samples must be >= 1")


@dataclass(frozen=True)
class Figures:
    """What a decision looks at: mean reversed ASR and soft ASR over the triggers, and the
    agreement with the original model."""

    asr: float
    soft: float
    agreement: float


def decide(previous: Figures, current: Figures, config: RollbackConfig) -> tuple[Action, str]:
    """The rollback method's rule for one prune: ``("rolled_back", reasons)`` when the attack did
    not get meaningfully weaker or the agreement fell below ``q0``; else ``("kept", "")``."""
    reasons = []
    dropped = previous.asr - current.asr >= config.min_drop or (
        config.min_soft_drop is not None and previous.soft - current.soft >= config.min_soft_drop
    )
    if not dropped:
        reasons.append("asr_not_dropped")
    if current.agreement < config.q0:
        reasons.append("agreement_below_q0")
    return ("rolled_back", ",".join(reasons)) if reasons else ("kept", "")


def should_stop(measure: Measure, config: RollbackConfig) -> bool:
    """The rollback method's stopping rule: ``s_n < asr_stop`` and ``q_n ≥ q0``."""
    return measure.reversed_asr < config.asr_stop and measure.agreement >= config.q0


def _score(
    model: nn.Module,
    tune: Dataset,
    triggers: Any,
    spec: InputSpec,
    config: RollbackConfig,
    probe: LayerProbe,
) -> NeuronScores:
    """The scoring the rollback's order comes from (one code path for the repair and the
    neuron-scoring stage, so both give the same ranking)."""
    return score_neurons(
        model, tune, triggers, spec, replace(config.scoring, layer=probe.info.name), probe=probe
    )


def rank_on_tune_split(
    model: nn.Module,
    data: Dataset,
    spec: InputSpec,
    triggers: Any,
    config: RollbackConfig = RollbackConfig(),
    *,
    layer: str | None = None,
) -> tuple[NeuronScores, Dataset, str]:
    """Score ``model``'s neurons as `rollback_prune` does when it is given no ranking: on
    the fine-tuning part of ``split_clean(data, config.validation_fraction, config.seed)``
    with a probe of the repair's size. Returns the scores, the data scored on and its
    ``data_split`` label. With too few samples to split (the repair would refuse them)
    the whole of ``data`` is scored, labelled ``"all"``. The model is not modified."""
    if can_split(len(data), config.validation_fraction):
        tune, _ = split_clean(data, config.validation_fraction, config.seed)
        label = split_label(config.validation_fraction, config.seed)
    else:
        tune, label = data, "all"
    probe = LayerProbe(model, layer or config.scoring.layer, spec, max_rows=PROBE_MAX_ROWS)
    return _score(model, tune, triggers, spec, config, probe), tune, label


def _check_ranking(
    ranking: NeuronRanking, context: RepairContext, config: RollbackConfig
) -> list[int]:
    """The order of a carried ranking, after checking that it ranks this repair's site
    for these triggers."""
    name, neurons = context.probe.info.name, context.probe.neurons
    if ranking.layer != name or ranking.neurons != neurons:
        raise InvalidInput(
            f"the neuron ranking is of {ranking.layer} ({ranking.neurons} neurons); the "
            f"repair prunes {name} ({neurons} neurons)"
        )
    labels = tuple(context.attack.labels)
    if ranking.target_labels and sorted(ranking.target_labels) != sorted(labels):
        raise InvalidInput(
            f"the neuron ranking was computed for target labels {list(ranking.target_labels)}; "
            f"the repair's triggers are for {list(labels)}"
        )
    expected = split_label(config.validation_fraction, config.seed)
    if ranking.data_split != expected:
        context.notes.append(
            f"neuron ranking computed on {ranking.data_split or 'unstated data'}, not on the "
            f"repair's fine-tuning split ({expected})"
        )
    return ranking.interleaved()


def rollback_prune(
    model: nn.Module,
    data: Dataset,
    spec: InputSpec,
    triggers: Any,
    config: RollbackConfig = RollbackConfig(),
    *,
    layer: str | None = None,
    ranking: NeuronRanking | None = None,
    progress: Progress | None = None,
) -> RepairResult:
    """Repair ``model`` **in place** (use `repair` for a copy). ``data``: the defender's
    clean samples ``(N, C, H, W)`` in ``spec.value_range`` with labels; ``triggers``:
    reversed triggers (see `as_reversed_triggers`). ``ranking``: the neuron-scoring
    stage's ranking of the site (checked against it: ``InvalidInput`` when it ranks
    another layer, width or trigger set); without it the neurons are scored here."""
    started = time.perf_counter()
    context = RepairContext.build(
        model,
        data,
        spec,
        triggers,
        layer=layer or config.scoring.layer,
        validation_fraction=config.validation_fraction,
        attack_samples=config.attack_samples,
        val_samples=config.val_samples,
        finetune=config.finetune,
        seed=config.seed,
        progress=progress,
    )
    name = context.probe.info.name
    neurons = context.probe.neurons
    before = context.measure()
    context.report(0.02, f"baseline reversed ASR {before.reversed_asr:.3f}")
    curve: list[CurveStep] = []
    if should_stop(before, config):
        context.notes.append(
            f"the reversed trigger's ASR is already {before.reversed_asr:.3f} < "
            f"{config.asr_stop}: nothing to prune"
        )
        return _result(context, before, before, curve, started)
    if context.skip_pruning():
        context.report(0.9, "final fine-tune")
        after = context.final_fine_tune(revival=max(config.asr_stop, 0.10))
        return _result(context, before, after, [], started)
    # checked only when used: a repair that skips the pruning never reads it
    carried = _check_ranking(ranking, context, config) if ranking is not None else None
    if carried is not None:
        order = carried
    else:
        scores = _score(model, context.tune, triggers, spec, config, context.probe)
        order = interleave(scores.activation_ranking, scores.weight_ranking)
    budget = max(1, int(config.max_pruned_fraction * neurons))
    pruner = context.pruner
    current = before
    reference = Figures(
        sum(before.per_trigger_asr) / len(before.per_trigger_asr), before.soft_asr, before.agreement
    )
    step = 0
    group = -(-len(order) // config.max_candidates)
    if group > 1:
        context.notes.append(
            f"{name} has {neurons} neurons: pruned in groups of {group} consecutive ranked "
            f"neurons (at most {config.max_candidates} candidates a sweep)"
        )
    total_steps = config.passes * -(-len(order) // group)
    done = False
    for sweep in range(config.passes):
        remaining = [i for i in order if i not in pruner.pruned]
        queue = [remaining[i : i + group] for i in range(0, len(remaining), group)]
        kept_in_sweep = 0
        position = 0
        while position < len(queue) and not done and len(pruner.pruned) < budget:
            batch = queue[position : position + config.speculate]
            keep = pruner.keep_mask().repeat(len(batch), 1)
            for row, members in enumerate(batch):
                keep[row, members] = 0
            scored = context.candidates(keep)
            for row, members in enumerate(batch):
                position += 1
                step += 1
                figures = Figures(
                    float(scored.mean_asr[row]),
                    float(scored.soft[row]),
                    float(scored.agreement[row]),
                )
                action, reason = decide(reference, figures, config)
                curve.append(
                    CurveStep(
                        step,
                        name,
                        members[0],
                        float(scored.asr[row]),
                        figures.agreement,
                        action,
                        reason,
                        neurons=tuple(members),
                    )
                )
                if action == "rolled_back":
                    continue
                for index in members:
                    pruner.prune(index)
                kept_in_sweep += 1
                context.local_fine_tune()
                current = context.measure()
                reference = Figures(
                    sum(current.per_trigger_asr) / len(current.per_trigger_asr),
                    current.soft_asr,
                    current.agreement,
                )
                done = should_stop(current, config)
                break  # the rest of the batch was scored on the old model
            context.report(
                0.05 + 0.8 * min(1.0, step / max(1, total_steps)),
                f"sweep {sweep + 1}: {len(pruner.pruned)} pruned, reversed ASR "
                f"{current.reversed_asr:.3f}",
            )
        if done or kept_in_sweep == 0:
            break
    if not done:
        if len(pruner.pruned) >= budget:
            context.notes.append(f"pruning budget reached ({budget} of {neurons} neurons)")
        context.notes.append(
            f"stopping rule not met: reversed ASR {current.reversed_asr:.3f} (target < "
            f"{config.asr_stop}), agreement {current.agreement:.3f} (q0 {config.q0})"
        )
    context.report(0.9, "final fine-tune")
    after = context.final_fine_tune(revival=max(config.asr_stop, 0.10))
    return _result(context, before, after, curve, started)


def _result(
    context: RepairContext, before: Measure, after: Measure, curve: list[CurveStep], started: float
) -> RepairResult:
    return RepairResult(
        mode=Rollback.name,
        layer=context.probe.info.name,
        target_labels=list(context.attack.labels),
        pruned=[(context.probe.info.name, i) for i in context.pruner.pruned],
        before=before,
        after=after,
        curve=curve,
        evaluations=context.evaluations,
        seconds=time.perf_counter() - started,
        neurons=context.probe.neurons,
        model=context.model,
        finetune_steps=context.finetune_steps,
        probe_mode=context.probe.mode,
        notes=list(context.notes),
        edit=context.edit,
    )


class Rollback:
    """The `modelguard.repair.base.RepairMode` of pruning with rollback (`rollback_prune`)."""

    name: ClassVar[str] = "rollback"
    config_type: ClassVar[type[Any]] = RollbackConfig
    uses_ranking: ClassVar[bool] = True

    def repair(
        self,
        model: nn.Module,
        data: Dataset,
        spec: InputSpec,
        triggers: Sequence[ReversedTrigger],
        *,
        layer: str | None = None,
        config: RollbackConfig | None = None,
        ranking: NeuronRanking | None = None,
        progress: Progress | None = None,
    ) -> RepairResult:
        return rollback_prune(
            model,
            data,
            spec,
            triggers,
            config or RollbackConfig(),
            layer=layer,
            ranking=ranking,
            progress=progress,
        )
