"""The query profile as result-mapper scores it: one request at a time."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelguard.carrier.kernels import profile_score
from modelguard.carrier.query_profile import QueryProfile
from modelguard.errors import InvalidInput


@dataclass(frozen=True)  # again, so that __init__ calls __post_init__
class ServingProfile(QueryProfile):
    """`QueryProfile` whose `score_one` (the detector's single-row Map call) is one
    compiled kernel (`kernels.profile_score`: one pass over the components, the GIL kept).
    Batches use the parent's numpy code."""

    def __post_init__(self) -> None:
        # the kernel reads raw memory: contiguous float32 arrays of consistent shapes
        for name in ("mean", "components", "scales"):
            object.__setattr__(
                self, name, np.ascontiguousarray(getattr(self, name), dtype=np.float32)
            )
        k, r = self.components.shape if self.components.ndim == 2 else (-1, -1)
        if self.mean.shape != (k,) or self.scales.shape != (r,):
            raise InvalidInput(
                f"query profile shapes disagree: mean {self.mean.shape}, components "
                f"{self.components.shape}, scales {self.scales.shape}"
            )

    def score_one(self, z: np.ndarray) -> float:
        if z.dtype != np.float32:  # the registry decodes float32; anything else is cast
            z = z.astype(np.float32)
        return profile_score(z, self.mean, self.components, self.scales, self.residual_scale)

    def scores(self, z: np.ndarray) -> np.ndarray:
        if z.ndim != 2 or z.shape[0] != 1:
            return super().scores(z)
        return np.array([self.score_one(np.asarray(z[0], dtype=np.float32))], dtype=np.float32)
