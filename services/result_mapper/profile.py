"""The query profile as result-mapper scores it: one request at a time."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from services.carrier_trainer.core.extraction import QueryProfile


@dataclass(frozen=True)
class ServingProfile(QueryProfile):
    """`QueryProfile` whose `score_one` (the detector's single-row Map call) runs the same
    formula in fewer numpy calls: one product with ``[V · diag(scales) | V]`` (built once)
    gives both the scaled and the plain projection, 1-D ``np.dot`` products replace
    broadcasting, squaring and ``sum(axis=1)``, and the score comes back as a float. The
    per-call cost is numpy's call overhead, not arithmetic. Batches use the parent's code.
    """

    #: ``(K, 2r)`` ``[components * scales | components]``, C-contiguous.
    joint: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        components = np.asarray(self.components, dtype=np.float32)
        scales = np.asarray(self.scales, dtype=np.float32)
        joint = np.ascontiguousarray(np.concatenate([components * scales, components], axis=1))
        object.__setattr__(self, "joint", joint)

    def score_one(self, z: np.ndarray) -> float:
        centred = z - self.mean  # z: float32 (K,), as the registry decodes it
        if centred.dtype != np.float32:
            centred = centred.astype(np.float32)
        both = np.dot(centred, self.joint)  # (2r,): scaled projection, then plain
        rank = len(self.scales)
        scaled = both[:rank]
        score = float(np.dot(scaled, scaled))
        if self.residual_scale:
            residual = centred - np.dot(self.components, both[rank:])
            score += float(np.dot(residual, residual)) * self.residual_scale
        return score

    def scores(self, z: np.ndarray) -> np.ndarray:
        if z.ndim != 2 or z.shape[0] != 1:
            return super().scores(z)
        return np.array([self.score_one(np.asarray(z[0], dtype=np.float32))], dtype=np.float32)
