"""The query profile as result-mapper scores it: one request at a time."""

from __future__ import annotations

import numpy as np

from services.carrier_trainer.core.extraction import QueryProfile


class ServingProfile(QueryProfile):
    """`QueryProfile` whose `scores` of a single row (the usual Map call) runs the same
    formula in fewer numpy calls: 1-D ``np.dot`` products instead of broadcasting,
    squaring and ``sum(axis=1)`` over ``(1, K)`` arrays (about half the per-call cost,
    which is numpy's call overhead, not arithmetic). Batches use the parent's code."""

    def scores(self, z: np.ndarray) -> np.ndarray:
        if z.ndim != 2 or z.shape[0] != 1:
            return super().scores(z)
        centred = np.asarray(z[0], dtype=np.float32) - self.mean
        projected = np.dot(centred, self.components)  # (r,)
        scaled = projected * self.scales
        score = float(np.dot(scaled, scaled))
        if self.residual_scale:
            residual = centred - np.dot(self.components, projected)
            score += float(np.dot(residual, residual)) * self.residual_scale
        return np.array([score], dtype=np.float32)
