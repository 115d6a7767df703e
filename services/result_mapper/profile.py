"""The query profile as result-mapper scores it: one request at a time."""

from __future__ import annotations

import numpy as np

from services.carrier_trainer.core.extraction import QueryProfile


class ServingProfile(QueryProfile):
    """`QueryProfile` whose `score_one` (the detector's single-row Map call) runs the same
    formula in fewer numpy calls: 1-D ``np.dot`` products instead of broadcasting,
    squaring and ``sum(axis=1)`` over ``(1, K)`` arrays, and the score comes back as a
    float (the per-call cost is numpy's call overhead, not arithmetic). Batches use the
    parent's code."""

    def score_one(self, z: np.ndarray) -> float:
        centred = z - self.mean  # z: float32 (K,), as the registry decodes it
        if centred.dtype != np.float32:
            centred = centred.astype(np.float32)
        projected = np.dot(centred, self.components)  # (r,)
        scaled = projected * self.scales
        score = float(np.dot(scaled, scaled))
        if self.residual_scale:
            residual = centred - np.dot(self.components, projected)
            score += float(np.dot(residual, residual)) * self.residual_scale
        return score

    def scores(self, z: np.ndarray) -> np.ndarray:
        if z.ndim != 2 or z.shape[0] != 1:
            return super().scores(z)
        return np.array([self.score_one(np.asarray(z[0], dtype=np.float32))], dtype=np.float32)
