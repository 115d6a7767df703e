"""What legitimate pseudo-outputs of one carrier look like: the profile the extraction
detector (`modelguard.carrier.extraction`) scores queries against. carrier-trainer fits and
signs it with each carrier; result-mapper loads it beside the carrier's mapper."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from modelguard.errors import InvalidInput


@dataclass(frozen=True)
class QueryProfile:
    """What legitimate pseudo-outputs of one carrier look like.

    ``score(z) = ‖Λ^{-1/2} Vᵀ (z − μ)‖² + ‖(I − V Vᵀ)(z − μ)‖² / λ_res`` with ``V`` the top
    ``rank`` principal directions (eigenvalues ``Λ``) of held-out legitimate pseudo-outputs
    and ``λ_res`` the mean of the remaining eigenvalues. ``threshold`` is the
    ``quantile`` of the calibration samples' own scores times ``margin`` (per-query
    outliers); ``mean_score`` their average (a stream of queries whose average score is
    several times that comes from elsewhere, even when few single queries are outliers).
    """

    mean: np.ndarray  # (K,)
    components: np.ndarray  # (K, r)
    scales: np.ndarray  # (r,) 1 / sqrt(eigenvalue)
    residual_scale: float  # 1 / mean residual eigenvalue (0 when r == K)
    threshold: float
    #: Mean score of the calibration samples: legitimate traffic averages about this.
    mean_score: float = 1.0

    @classmethod
    def fit(
        cls, samples: np.ndarray, *, rank: int = 32, quantile: float = 0.995, margin: float = 1.5
    ) -> QueryProfile:
        """``samples`` ``(N, K)``: legitimate pseudo-outputs (N > K is best)."""
        x = np.asarray(samples, dtype=np.float64)
        if x.ndim != 2 or len(x) < 10:
            raise InvalidInput(f"a query profile needs (N >= 10, K) samples; got {x.shape}")
        mean = x.mean(axis=0)
        centred = x - mean
        cov = centred.T @ centred / (len(x) - 1)
        eigenvalues, eigenvectors = np.linalg.eigh(cov)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
        floor = max(float(eigenvalues[0]) * 1e-6, 1e-9)
        r = min(rank, x.shape[1], len(x) - 1)
        top = np.maximum(eigenvalues[:r], floor)
        rest = eigenvalues[r:]
        residual_scale = 1.0 / max(float(rest.mean()), floor) if len(rest) else 0.0
        profile = cls(
            mean.astype(np.float32),
            eigenvectors[:, :r].astype(np.float32),
            (1.0 / np.sqrt(top)).astype(np.float32),
            residual_scale,
            math.inf,
        )
        scores = profile.scores(x.astype(np.float32))
        threshold = float(np.quantile(scores, quantile)) * margin
        return cls(
            profile.mean,
            profile.components,
            profile.scales,
            residual_scale,
            threshold,
            max(float(scores.mean()), 1e-9),
        )

    def scores(self, z: np.ndarray) -> np.ndarray:
        """``(N, K)`` → ``(N,)`` outlyingness (larger: further from legitimate traffic)."""
        centred = np.asarray(z, dtype=np.float32) - self.mean
        projected = centred @ self.components
        score = ((projected * self.scales) ** 2).sum(axis=1)
        if self.residual_scale:
            residual = centred - projected @ self.components.T
            score += (residual**2).sum(axis=1) * self.residual_scale
        return score  # type: ignore[no-any-return]

    def score_one(self, z: np.ndarray) -> float:
        """The score of one row ``(K,)``, as `scores` gives it for ``z[None]``."""
        return float(self.scores(z[None])[0])

    def outliers(self, z: np.ndarray) -> np.ndarray:
        flags: np.ndarray = self.scores(z) > self.threshold
        return flags

    def to_dict(self) -> dict[str, object]:
        return {
            "mean": self.mean.tolist(),
            "components": self.components.tolist(),
            "scales": self.scales.tolist(),
            "residual_scale": self.residual_scale,
            "threshold": self.threshold,
            "mean_score": self.mean_score,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> QueryProfile:
        return cls(
            np.asarray(data["mean"], dtype=np.float32),
            np.asarray(data["components"], dtype=np.float32),
            np.asarray(data["scales"], dtype=np.float32),
            float(data["residual_scale"]),  # type: ignore[arg-type]
            float(data["threshold"]),  # type: ignore[arg-type]
            float(data.get("mean_score", 1.0)),  # type: ignore[arg-type]
        )


# -------------------------------------------------------------------------------- detector
