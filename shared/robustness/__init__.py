"""Robustness to evasion attacks: FGSM and PGD (L∞, L2; untargeted, targeted) in the
input's own value range."""

from modelguard.robustness.attacks import NORMS, Norm, PgdConfig, fgsm, pgd, project

__all__ = ["NORMS", "Norm", "PgdConfig", "fgsm", "pgd", "project"]
