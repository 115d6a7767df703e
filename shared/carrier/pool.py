"""A pool of pre-trained carriers ("the server pre-trains a series of carrier
images and result-mapping modules"), so a new user or a rotation is served at once.

Each pooled carrier starts from a distinct natural image (indices ``first_index ..``; see
`natural_images`). Mappers are either **per-user** (each carrier trained jointly with its
own mapper: a thief's substitute fits one user only) or **shared** (the reference method's
low-memory option: the first carrier is trained jointly, every other one learns only ``p`` for that
same frozen mapper, so the server stores one mapper for the whole pool).

A pooled carrier is handed to at most one user, ever: a rotated-out carrier may be in an
attacker's hands, so it is retired, not recycled. No I/O here: the service persists the
pool's artifacts.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from modelguard.datasets import Dataset
from modelguard.errors import InvalidInput, ResourceExhausted

from .carrier import (
    CarrierConfig,
    CarrierResult,
    MappingNetwork,
    mapper_to_safetensors,
    train_carrier,
)
from .natural_images import natural_image
from .public_models import PublicModel

log = logging.getLogger(__name__)

MapperSharing = Literal["per-user", "shared"]


@dataclass(frozen=True)
class PoolConfig:
    size: int = 4
    mapper_sharing: MapperSharing = "per-user"
    carrier: CarrierConfig = field(default_factory=CarrierConfig)
    #: Natural-image index of the first pooled carrier (pools built later continue
    #: from where earlier ones stopped, keeping every image distinct).
    first_index: int = 0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise InvalidInput(f"pool size must be >= 1; got {self.size}")
        if self.mapper_sharing not in ("per-user", "shared"):
            raise InvalidInput("mapper_sharing must be 'per-user' or 'shared'")
        if self.first_index < 0:
            raise InvalidInput("first_index must be >= 0")
        if self.mapper_sharing == "shared" and self.carrier.output_key:
            # a per-carrier output key gives every user a different served mapper
            raise InvalidInput("a shared mapper needs carrier output_key=False")


@dataclass(frozen=True)
class PooledCarrier:
    pool_index: int
    image_index: int
    result: CarrierResult
    mapper_bytes: bytes  # safetensors, the result-mapper's format

    @property
    def mapper_digest(self) -> str:
        return hashlib.sha256(self.mapper_bytes).hexdigest()


@dataclass(frozen=True)
class Assignment:
    user_id: str
    generation: int
    carrier: PooledCarrier


class CarrierPool:
    """Thread-safe assignment of pooled carriers to users, with rotation."""

    def __init__(self, carriers: list[PooledCarrier]) -> None:
        self._free = list(carriers)
        self._assigned: dict[str, Assignment] = {}
        self._retired: list[Assignment] = []
        self._lock = threading.Lock()

    @classmethod
    def build(
        cls,
        config: PoolConfig,
        public_model: PublicModel,
        task_data: Dataset,
        *,
        test_data: Dataset | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> CarrierPool:
        """Train ``config.size`` carriers (seeds ``carrier.seed + i``)."""
        carriers: list[PooledCarrier] = []
        shared: MappingNetwork | None = None
        for i in range(config.size):
            index = config.first_index + i
            carrier_cfg = _with_seed(config.carrier, config.carrier.seed + i)
            train_shared = config.mapper_sharing == "shared" and shared is not None
            result = train_carrier(
                carrier_cfg,
                public_model,
                task_data,
                natural_image(index, public_model.input_shape),
                None if progress is None else _scaled(progress, i, config.size),
                test_data=test_data,
                mapper=shared if train_shared else None,
                train_mapper=not train_shared,
            )
            if config.mapper_sharing == "shared" and shared is None:
                shared = result.mapper
            carriers.append(
                PooledCarrier(
                    i, index, result, mapper_to_safetensors(result.mapper, {"pool_index": str(i)})
                )
            )
            log.info(
                "pooled carrier %d (image %d): validation %.4f, test %s",
                i,
                index,
                result.validation_accuracy,
                result.test_accuracy,
            )
        if config.mapper_sharing == "shared":
            # Every entry must carry byte-identical mapper weights so the registry loads one.
            first = carriers[0].mapper_bytes
            carriers = [
                PooledCarrier(c.pool_index, c.image_index, c.result, first) for c in carriers
            ]
        return cls(carriers)

    def assign(self, user_id: str) -> Assignment:
        """The user's carrier: the current one, or a fresh one (generation 0)."""
        with self._lock:
            current = self._assigned.get(user_id)
            if current is not None:
                return current
            return self._take(user_id, 0)

    def rotate(self, user_id: str) -> tuple[Assignment, Assignment | None]:
        """Give ``user_id`` a fresh carrier (next generation); the old one is retired.
        Returns ``(new, old)``."""
        with self._lock:
            old = self._assigned.get(user_id)
            generation = 0 if old is None else old.generation + 1
            new = self._take(user_id, generation)
            if old is not None:
                self._retired.append(old)
            return new, old

    def _take(self, user_id: str, generation: int) -> Assignment:
        if not self._free:
            raise ResourceExhausted(
                "the carrier pool is empty: train more carriers (CarrierPool.build with "
                "first_index after the last pooled image) before assigning"
            )
        assignment = Assignment(user_id, generation, self._free.pop(0))
        self._assigned[user_id] = assignment
        return assignment

    @property
    def available(self) -> int:
        with self._lock:
            return len(self._free)

    def current(self, user_id: str) -> Assignment | None:
        with self._lock:
            return self._assigned.get(user_id)


def _with_seed(config: CarrierConfig, seed: int) -> CarrierConfig:
    return replace(config, seed=seed)


def _scaled(progress: Callable[[float], None], i: int, n: int) -> Callable[[float], None]:
    return lambda fraction: progress((i + fraction) / n)
