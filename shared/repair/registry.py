"""Backdoor repair by pruning: the registry of repair modes and the one entry point.

`REPAIR_MODES` maps a mode's name to the class implementing it
(`modelguard.repair.base.RepairMode`), as ``"module:Class"`` strings imported on first use, so
this module imports neither torch nor a mode (CLI choices, request validation):

* ``"rollback"``: pruning with rollback and fine-tuning, `modelguard.repair.rollback`;
* ``"shapley"``: Shapley pruning (ShapPruning), `modelguard.repair.shapley_prune`;
* ``"fine-pruning"``: the Fine-Pruning baseline (Liu et al. 2018), `modelguard.repair.fine_pruning`.

Adding a mode = one module with its class + one line here.

`repair` copies the model (the caller's model is never modified), repairs the copy with the
named mode and returns a `RepairResult` whose ``model`` is the repaired copy in the
submitted format (an eager module stays eager, a TorchScript module stays TorchScript with
the same input/output contract). Every decision uses the *reversed* trigger; the real one
is never needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from modelguard.errors import InvalidInput
from modelguard.progress import Progress

if TYPE_CHECKING:
    from torch import nn

    from modelguard.datasets import Dataset
    from modelguard.repair.base import RepairMode
    from modelguard.repair.result import RepairResult
    from modelguard.repair.scoring import NeuronRanking
    from modelguard.spec import InputSpec

__all__ = [
    "DEFAULT_REPAIR_MODE",
    "NO_REPAIR",
    "REPAIR_CHOICES",
    "REPAIR_MODES",
    "get_repair_mode",
    "repair",
]

REPAIR_MODES: dict[str, str] = {
    "rollback": "modelguard.repair.rollback:Rollback",
    "shapley": "modelguard.repair.shapley_prune:ShapleyPruning",
    "fine-pruning": "modelguard.repair.fine_pruning:FinePruning",
}
#: What an empty mode (an audit's default) means.
DEFAULT_REPAIR_MODE = "rollback"
#: Not a mode: an audit that skips the repair stage.
NO_REPAIR = "none"
#: What an audit or the CLI's ``--repair-mode`` accepts.
REPAIR_CHOICES: tuple[str, ...] = (*REPAIR_MODES, NO_REPAIR)


def get_repair_mode(name: str) -> RepairMode:
    """The registered mode ``name`` (its module is imported now); ``InvalidInput`` listing
    the registered names otherwise."""
    target = REPAIR_MODES.get(name)
    if target is None:
        raise InvalidInput(
            f"unknown repair mode {name!r}; choose one of: {', '.join(REPAIR_MODES)}"
        )
    module, _, attribute = target.partition(":")
    mode: RepairMode = getattr(importlib.import_module(module), attribute)()
    return mode


def repair(
    model: nn.Module,
    data: Dataset,
    spec: InputSpec,
    triggers: Any,
    mode: str = DEFAULT_REPAIR_MODE,
    layer: str | None = None,
    config: object | None = None,
    progress: Progress | None = None,
    *,
    ranking: NeuronRanking | None = None,
) -> RepairResult:
    """Repair a copy of ``model`` against ``triggers`` and return it in the result.

    ``model``: the raw model (eager or TorchScript) as loaded, taking inputs normalised as
    ``spec`` declares. ``data``: the defender's clean samples ``(N, C, H, W)`` in
    ``spec.value_range`` with labels ``(N,)``; part is held out for validation.
    ``triggers``: reversed triggers — `modelguard.detection.triggers.ReversedTrigger` objects,
    ``(label, mask (H, W), pattern (C, H, W))`` tuples, or a trigger-reversal result.
    ``layer``: a Linear or Conv2d layer by name (default: the first hidden
    fully-connected layer). ``config``: the mode's ``config_type`` (default: its
    defaults). ``ranking``: the neuron-scoring stage's ranking of the site, used by the
    modes whose ``uses_ranking`` is set (the others score for themselves).
    ``progress(fraction, text)`` is called along the way.
    """
    method = get_repair_mode(mode)
    if config is not None and not isinstance(config, method.config_type):
        raise InvalidInput(
            f"mode {mode!r} takes a {method.config_type.__name__}, not {type(config).__name__}"
        )
    if len(data) == 0:
        raise InvalidInput("the clean dataset is empty")
    if tuple(data.x.shape[1:]) != tuple(spec.shape):
        raise InvalidInput(
            f"clean data has shape {list(data.x.shape[1:])}; the model takes {list(spec.shape)}"
        )
    from modelguard.repair.context import copy_model
    from modelguard.repair.scoring import as_reversed_triggers

    items = as_reversed_triggers(triggers, spec)
    working = copy_model(model)
    working.eval()
    # the repair fine-tunes its own copy: weights a file arrives with frozen (a traced
    # export, a published model) must still learn
    for parameter in working.parameters():
        parameter.requires_grad_(True)
    return method.repair(
        working,
        data,
        spec,
        items,
        layer=layer,
        config=config,
        ranking=ranking if method.uses_ranking else None,
        progress=progress,
    )
