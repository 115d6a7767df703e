"""The device side of carrier serving (adversarial reprogramming): fetch the carrier and the public
model, embed the input in the carrier, run the public model locally, send the pseudo-output
to the result-mapper and get the label back.

Transport is injected: ``fetch_carrier(user_id) -> (carrier artifact bytes, credential)``
(the lead plugs in CarrierTrainer.GetCarrier plus the artifact store) and
``map_fn(user_id, credential, pseudo_output_bytes, rows) -> MapReply`` (the ResultMapper
stub). Nothing here imports gRPC, so the same code runs in tests against the in-process
registry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from modelguard.carrier.carrier import Carrier, carrier_from_safetensors
from modelguard.carrier.public_models import PublicModel, load_public_model
from modelguard.errors import InvalidInput, NotFound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MapReply:
    labels: np.ndarray  # (rows,) int
    probabilities: np.ndarray  # (rows, classes) float32
    generation: int


#: ``(user_id, credential, little-endian float32 bytes, rows) -> MapReply``.
MapFn = Callable[[str, str, bytes, int], MapReply]
#: ``user_id -> (carrier safetensors bytes, credential)``.
FetchCarrier = Callable[[str], tuple[bytes, str]]


def decode_map_reply(
    labels: list[int], probabilities: bytes, classes: int, generation: int
) -> MapReply:
    """Build a `MapReply` from MapResponse fields (for the lead's gRPC ``map_fn``)."""
    probs = np.frombuffer(probabilities, dtype="<f4")
    if classes < 1 or probs.size != len(labels) * classes:
        raise InvalidInput(
            f"MapResponse holds {probs.size} probabilities for {len(labels)} rows × "
            f"{classes} classes"
        )
    return MapReply(
        np.asarray(labels, dtype=np.int64), probs.reshape(len(labels), classes), generation
    )


class DeviceClient:
    """A device: its carrier, the public model and a credential."""

    def __init__(
        self,
        user_id: str,
        credential: str,
        carrier: Carrier,
        public_model: PublicModel,
        map_fn: MapFn,
        generation: int = 0,
    ) -> None:
        if tuple(carrier.image.shape) != public_model.input_shape:
            raise InvalidInput(
                f"carrier {tuple(carrier.image.shape)} does not fit public model "
                f"{public_model.name!r} {public_model.input_shape}"
            )
        key = carrier.output_key
        if key is not None and key.shape[-1] != public_model.output_dim:
            raise InvalidInput(
                f"the carrier's output key is {tuple(key.shape)}; public model "
                f"{public_model.name!r} gives {public_model.output_dim} scores"
            )
        self.user_id = user_id
        self.credential = credential
        self.carrier = carrier
        self.public_model = public_model
        self.map_fn = map_fn
        self.generation = generation

    @torch.no_grad()
    def pseudo_output(self, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """``f(g(x, c)) Q + o`` for inputs ``(N, C, h, w)`` in [0, 1] → float32 ``(N, K)``."""
        if x.ndim == 3:
            x = x.unsqueeze(0)
        return self.carrier.outputs(self.public_model, x, batch_size).to(torch.float32).numpy()

    def classify(self, x: torch.Tensor, rows_per_call: int = 1024) -> MapReply:
        """Labels for ``x`` ``(N, C, h, w)``: Map calls of up to ``rows_per_call`` packed rows
        (the server refuses more than its ``max_rows``)."""
        pseudo = np.ascontiguousarray(self.pseudo_output(x), dtype="<f4")
        replies = [
            self.map_fn(
                self.user_id,
                self.credential,
                pseudo[i : i + rows_per_call].tobytes(),
                len(pseudo[i : i + rows_per_call]),
            )
            for i in range(0, len(pseudo), rows_per_call)
        ]
        if len(replies) == 1:
            return replies[0]
        return MapReply(
            np.concatenate([r.labels for r in replies]),
            np.concatenate([r.probabilities for r in replies]),
            replies[-1].generation,
        )


def connect(
    user_id: str,
    fetch_carrier: FetchCarrier,
    map_fn: MapFn,
    public_models: Callable[[str], PublicModel] = load_public_model,
) -> DeviceClient:
    """Fetch the user's carrier and credential, load the public model it was trained for
    (checking its weights digest), and return a ready `DeviceClient`."""
    data, credential = fetch_carrier(user_id)
    package = carrier_from_safetensors(data)
    public = public_models(package.public_model)
    if public.weights_sha256 != package.public_model_sha256:
        raise NotFound(
            f"this device's public model {public.name!r} (sha256 {public.weights_sha256[:12]}…) "
            f"is not the one the carrier was trained for ({package.public_model_sha256[:12]}…): "
            "update the public model"
        )
    return DeviceClient(user_id, credential, package.carrier, public, map_fn, package.generation)
