"""The registry of backdoor detectors (`modelguard.detection.base.BackdoorDetector`).

`DETECTORS` maps a detector's name to its class as ``"module:Class"`` strings imported on
first use, so this module imports neither torch nor a detector (CLI choices, request
validation):

* ``"neural-cleanse"`` (the default): Neural Cleanse with all labels batched,
  `modelguard.detection.neural_cleanse`;
* ``"neural-cleanse-sequential"``: the original procedure, one label after another (the
  baseline the batched one is benchmarked against),
  `modelguard.detection.neural_cleanse_sequential`.

Adding a detector = one module with its class + one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from modelguard.errors import InvalidInput

if TYPE_CHECKING:
    from modelguard.detection.base import BackdoorDetector

__all__ = ["DEFAULT_DETECTOR", "DETECTORS", "get_detector"]

DETECTORS: dict[str, str] = {
    "neural-cleanse": "modelguard.detection.neural_cleanse:NeuralCleanse",
    "neural-cleanse-sequential": (
        "modelguard.detection.neural_cleanse_sequential:SequentialNeuralCleanse"
    ),
}
#: What an empty detector name (an audit's default) means.
DEFAULT_DETECTOR = "neural-cleanse"


def get_detector(name: str = DEFAULT_DETECTOR) -> BackdoorDetector:
    """The registered detector ``name`` (its module is imported now); ``InvalidInput``
    listing the registered names otherwise."""
    target = DETECTORS.get(name)
    if target is None:
        raise InvalidInput(f"unknown detector {name!r}; choose one of: {', '.join(DETECTORS)}")
    module, _, attribute = target.partition(":")
    detector: BackdoorDetector = getattr(importlib.import_module(module), attribute)()
    return detector
