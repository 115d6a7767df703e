"""What a repair mode is: the protocol every entry of `modelguard.repair.registry.REPAIR_MODES`
satisfies. Adding a mode = one module with a class like this + one registry line."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from modelguard.progress import Progress

if TYPE_CHECKING:
    from torch import nn

    from modelguard.datasets import Dataset
    from modelguard.detection.triggers import ReversedTrigger
    from modelguard.repair.result import RepairResult
    from modelguard.repair.scoring import NeuronRanking
    from modelguard.spec import InputSpec


@runtime_checkable
class RepairMode(Protocol):
    """A way to repair a backdoored model against its reversed triggers.

    ``name``: the registry key (``"rollback"``). ``config_type``: the frozen dataclass its
    ``config`` must be (``None`` means its defaults). ``uses_ranking``: whether it consumes
    the neuron-scoring stage's `NeuronRanking` (a mode that does not ignores it).

    `repair` works **in place** on the model it is given (the registry's `repair` entry
    hands it a copy) and returns the `RepairResult` whose ``model`` is that copy.
    ``triggers`` are already normalised (`modelguard.repair.scoring.as_reversed_triggers`).
    """

    name: ClassVar[str]
    config_type: ClassVar[type[Any]]
    uses_ranking: ClassVar[bool]

    def repair(
        self,
        model: nn.Module,
        data: Dataset,
        spec: InputSpec,
        triggers: Sequence[ReversedTrigger],
        *,
        layer: str | None = None,
        config: Any = None,
        ranking: NeuronRanking | None = None,
        progress: Progress | None = None,
    ) -> RepairResult: ...
