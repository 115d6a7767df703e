"""What a backdoor detector is: the protocol every entry of
`modelguard.detection.registry.DETECTORS` satisfies, and the result every detector returns.
Adding a detector = one module with a class like this + one registry line."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from modelguard.progress import Progress

if TYPE_CHECKING:
    import torch
    from torch import nn

    from modelguard.datasets import Dataset
    from modelguard.spec import InputSpec


class LabelEvidence(Protocol):
    """One label's figures (`modelguard.detection.neural_cleanse.LabelResult` is one)."""

    @property
    def label(self) -> int: ...

    @property
    def l1_norm(self) -> float: ...

    @property
    def anomaly_index(self) -> float: ...

    @property
    def attack_success(self) -> float: ...

    @property
    def reached_threshold(self) -> bool: ...


class DetectionResult(Protocol):
    """What `BackdoorDetector.detect` returns (`modelguard.detection.neural_cleanse.
    ReversalResult` is one): the verdict, the flagged
    labels, per-label evidence, the reversed triggers of the labels it optimised —
    ``masks`` ``(L, H, W)`` in [0, 1], ``patterns`` ``(L, C, H, W)`` in ``value_range``,
    row ``i`` for ``labels_with_triggers[i]`` (every label unless a triage left some out)
    — and a JSON-ready summary without the tensors. ``verdict`` is ``"infected"``,
    ``"clean"`` or ``"inconclusive"`` (the evidence was not clear within the budget)."""

    @property
    def verdict(self) -> str: ...

    @property
    def flagged(self) -> tuple[int, ...]: ...

    @property
    def labels(self) -> Sequence[LabelEvidence]: ...

    @property
    def masks(self) -> torch.Tensor: ...

    @property
    def patterns(self) -> torch.Tensor: ...

    @property
    def value_range(self) -> tuple[float, float]: ...

    @property
    def labels_with_triggers(self) -> tuple[int, ...]:
        """The labels whose triggers ``masks`` and ``patterns`` hold, row by row."""
        ...

    def trigger(self, label: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One label's mask ``(H, W)`` and pattern ``(C, H, W)``."""
        ...

    @property
    def seconds(self) -> float: ...

    def to_dict(self) -> dict[str, Any]: ...


@runtime_checkable
class BackdoorDetector(Protocol):
    """Decides whether a model is backdoored and reverses the trigger of each label.

    ``name``: the registry key (``"neural-cleanse"``). ``rules``: the named decision rules
    it offers; the first is the default. `configure` builds its config for ``rule`` (empty:
    the default) with ``overrides`` (seed, steps, …) applied, refusing an unknown rule or
    an override that contradicts the rule with ``InvalidInput``. `detect` runs it; the
    model is not modified.
    """

    name: ClassVar[str]
    rules: ClassVar[tuple[str, ...]]

    def configure(self, rule: str = "", **overrides: Any) -> Any: ...

    def detect(
        self,
        model: nn.Module,
        data: Dataset,
        spec: InputSpec,
        config: Any = None,
        progress: Progress | None = None,
    ) -> DetectionResult: ...
