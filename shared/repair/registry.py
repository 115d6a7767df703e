"""Backdoor repair by pruning: the algorithm core of the pruning-orchestrator.

`repair` is the one entry point: it copies the model (the caller's model is never
modified), repairs the copy with one of

* ``"rollback"``: pruning with rollback and fine-tuning (pruning with rollback), `rollback_prune`;
* ``"shapley"``: Shapley pruning (ShapPruning), `shapley_prune`;
* ``"fine-pruning"``: the Fine-Pruning baseline (Liu et al. 2018), `fine_pruning`;

and returns a `RepairResult` whose ``model`` is the repaired copy in the submitted format
(an eager module stays eager, a TorchScript module stays TorchScript with the same
input/output contract). Every decision uses the *reversed* trigger; the real one is never
needed.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from shared.datasets import Dataset
from shared.errors import InvalidInput
from shared.repair.context import FineTuneConfig, ProgressFn, Pruner, copy_model, fine_tune
from shared.repair.fine_pruning import FinePruningConfig, fine_pruning
from shared.repair.result import CurveStep, Measure, RepairResult
from shared.repair.rollback import RollbackConfig, decide, rollback_prune, should_stop
from shared.repair.shapley_prune import ShapleyPruneConfig, shapley_prune
from shared.spec import InputSpec

__all__ = [
    "MODES",
    "CurveStep",
    "FinePruningConfig",
    "FineTuneConfig",
    "Measure",
    "Pruner",
    "RepairResult",
    "RollbackConfig",
    "ShapleyPruneConfig",
    "copy_model",
    "decide",
    "fine_pruning",
    "fine_tune",
    "repair",
    "rollback_prune",
    "shapley_prune",
    "should_stop",
]

MODES = ("rollback", "shapley", "fine-pruning")

RepairConfig = RollbackConfig | ShapleyPruneConfig | FinePruningConfig


def repair(
    model: nn.Module,
    data: Dataset,
    spec: InputSpec,
    triggers: Any,
    mode: str = "rollback",
    layer: str | None = None,
    config: RepairConfig | None = None,
    progress: ProgressFn | None = None,
) -> RepairResult:
    """Repair a copy of ``model`` against ``triggers`` and return it in the result.

    ``model``: the raw model (eager or TorchScript) as loaded, taking inputs normalised as
    ``spec`` declares. ``data``: the defender's clean samples ``(N, C, H, W)`` in
    ``spec.value_range`` with labels ``(N,)``; part is held out for validation.
    ``triggers``: reversed triggers — `shared.detection.triggers.ReversedTrigger` objects,
    ``(label, mask (H, W), pattern (C, H, W))`` tuples, or a trigger-reversal result.
    ``layer``: a Linear or Conv2d layer by name (default: the first hidden
    fully-connected layer). ``config``: the mode's config (defaults: the seeds' values).
    ``progress(fraction, text)`` is called along the way.
    """
    if mode not in MODES:
        raise InvalidInput(f"unknown repair mode {mode!r}; choose one of: {', '.join(MODES)}")
    expected = {
        "rollback": RollbackConfig,
        "shapley": ShapleyPruneConfig,
        "fine-pruning": FinePruningConfig,
    }[mode]
    if config is not None and not isinstance(config, expected):
        raise InvalidInput(
            f"mode {mode!r} takes a {expected.__name__}, not {type(config).__name__}"
        )
    if len(data) == 0:
        raise InvalidInput("the clean dataset is empty")
    if tuple(data.x.shape[1:]) != tuple(spec.shape):
        raise InvalidInput(
            f"clean data has shape {list(data.x.shape[1:])}; the model takes {list(spec.shape)}"
        )
    working = copy_model(model)
    working.eval()
    if mode == "rollback":
        assert config is None or isinstance(config, RollbackConfig)
        return rollback_prune(
            working,
            data,
            spec,
            triggers,
            config or RollbackConfig(),
            layer=layer,
            progress=progress,
        )
    if mode == "shapley":
        assert config is None or isinstance(config, ShapleyPruneConfig)
        return shapley_prune(
            working,
            data,
            spec,
            triggers,
            config or ShapleyPruneConfig(),
            layer=layer,
            progress=progress,
        )
    assert config is None or isinstance(config, FinePruningConfig)
    return fine_pruning(
        working,
        data,
        spec,
        triggers,
        config or FinePruningConfig(),
        layer=layer,
        progress=progress,
    )
