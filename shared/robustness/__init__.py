"""Robustness to evasion attacks: FGSM and PGD (L∞, L2; untargeted, targeted) in the
input's own value range, robust accuracy against ε and a gradient-masking sanity check."""

from modelguard.robustness.attacks import NORMS, Norm, PgdConfig, fgsm, pgd, project
from modelguard.robustness.evaluate import (
    FRAGILE,
    MASKED_GRADIENTS,
    ROBUST,
    ROBUST_ACCURACY_FLOOR,
    AttackAccuracy,
    MaskingCheck,
    RobustnessConfig,
    RobustnessResult,
    RobustPoint,
    evaluate_robustness,
    robustness_verdict,
)

__all__ = [
    "FRAGILE",
    "MASKED_GRADIENTS",
    "NORMS",
    "ROBUST",
    "ROBUST_ACCURACY_FLOOR",
    "AttackAccuracy",
    "MaskingCheck",
    "Norm",
    "PgdConfig",
    "RobustPoint",
    "RobustnessConfig",
    "RobustnessResult",
    "evaluate_robustness",
    "fgsm",
    "pgd",
    "project",
    "robustness_verdict",
]
