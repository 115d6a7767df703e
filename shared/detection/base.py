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
    ReversalResult` is one): the verdict (``"infected"`` or ``"clean"``), the flagged
    labels, per-label evidence, the reversed triggers of every label — ``masks``
    ``(K, H, W)`` in [0, 1], ``patterns`` ``(K, C, H, W)`` in ``value_range`` — and a
    JSON-ready summary without the tensors."""

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
