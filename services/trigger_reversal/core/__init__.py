"""trigger-reversal's algorithm: batched Neural Cleanse, the MAD decision and the
faithful per-label baseline. Tensors in, dataclasses out; no I/O."""

from services.trigger_reversal.core.mad import MadResult, mad_test
from services.trigger_reversal.core.optimizer import OptimizerSettings, TriggerOptimizer
from services.trigger_reversal.core.reversal import (
    CLEAN,
    INFECTED,
    MODELGUARD,
    PAPER,
    RULES,
    LabelResult,
    RestartInfo,
    ReversalConfig,
    ReversalResult,
    combine_restarts,
    reverse_triggers,
    trigger_images,
    validate_inputs,
)
from services.trigger_reversal.core.sequential import reverse_triggers_sequential

__all__ = [
    "CLEAN",
    "INFECTED",
    "MODELGUARD",
    "PAPER",
    "RULES",
    "LabelResult",
    "MadResult",
    "OptimizerSettings",
    "RestartInfo",
    "ReversalConfig",
    "ReversalResult",
    "TriggerOptimizer",
    "combine_restarts",
    "mad_test",
    "reverse_triggers",
    "reverse_triggers_sequential",
    "trigger_images",
    "validate_inputs",
]
