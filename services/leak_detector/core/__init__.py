"""leak-detector algorithms: parameter-distribution forensics (data-sandbox theft) and the pruning
defence against data-processing-stage theft. Tensors in, dataclasses out; the only I/O is
reading the shipped calibration constant."""

from services.leak_detector.core.calibration import Calibration, fit_calibration, load_calibration
from services.leak_detector.core.detector import (
    BENIGN,
    LEAK,
    DetectorConfig,
    Evidence,
    LeakVerdict,
    detect_leak,
    module_from_state_dict,
    score_layers,
)
from services.leak_detector.core.features import (
    FeatureConfig,
    LayerStats,
    layer_statistics,
    tensor_statistics,
)
from services.leak_detector.core.pruning_defence import (
    PrunedLayer,
    PruningDefenceConfig,
    PruningResult,
    mean_activations,
    prune_dormant_neurons,
)

__all__ = [
    "BENIGN",
    "LEAK",
    "Calibration",
    "DetectorConfig",
    "Evidence",
    "FeatureConfig",
    "LayerStats",
    "LeakVerdict",
    "PrunedLayer",
    "PruningDefenceConfig",
    "PruningResult",
    "detect_leak",
    "fit_calibration",
    "layer_statistics",
    "load_calibration",
    "mean_activations",
    "module_from_state_dict",
    "prune_dormant_neurons",
    "score_layers",
    "tensor_statistics",
]
