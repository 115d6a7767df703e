"""Carrier training (adversarial reprogramming): a frozen public model repurposed through a
per-user carrier image and a small server-side result-mapping network.

The reference scheme (distributed deployment by adversarial reprogramming): the device holds a
public classifier ``f`` and a carrier ``c = a + tanh(p)`` (``a`` a natural image standing for the
user, ``p`` learned; clipped to the valid range). A task input ``x`` is resized and placed
at the centre of ``c`` (``g(x, c)``); the device sends ``f(g(x, c))`` — a pseudo-output
meaningless on its own — to the server, whose mapping network ``mf`` (weights ``w``)
returns the label. ``p`` and ``w`` are learned together on the task data, batches of 64,
minimising::

    L = CE(mf(f(g(x, c))), y) + γ (‖p‖ + ‖w‖)

(the reference method writes ``-log prob(y|x)``; its ‖·‖ are read here as Euclidean norms over all
of ``p`` and over all of ``w``). This is adversarial reprogramming (Elsayed, Goodfellow and
Sohl-Dickstein, ICLR 2019) with a learned output mapping instead of a fixed label map.

Departures, stated: (1) the reference method alternates a ``p`` step and a ``w`` step on the same
batch; one Adam step on both (separate learning rates) is the same first-order update and half the
forward passes. (2) An optional warm start fits ``w`` alone on pseudo-outputs of the
untrained carrier (``mapper_warmup_samples``): no backward pass through ``f``, so it costs a
fraction of a joint step, which matters for 224² public models on a CPU. (3) "Until
convergence" is made concrete: validation accuracy on a held-out split every
``eval_every`` steps; stop after ``patience`` evaluations without a ``min_delta``
improvement, at ``max_steps`` or at ``time_budget_s``; the best evaluated ``(p, w)`` is
kept. The early stop is an overridable hook (`CarrierTrainer.should_stop`). (4) The
mapper standardises its inputs with statistics fixed on the untrained carrier's
pseudo-outputs (`MappingNetwork.standardise`, folded into ``fc1`` on export): public
models' scores mix units of very different scales (ReLU features next to logits), and
measured on lenet5-fashion's 84+10 scores it lifts validation accuracy after 500 steps
from 0.85 to 0.90. (5) An optional cosine decay of both learning rates (``lr_schedule``).
(6) A per-carrier secret **output key** (``output_key``, beyond the reference method): a
random orthogonal matrix ``Q`` and a random offset ``o`` drawn from the operating system's
secure source for every carrier; the device sends ``f(g(x, c)) Q + o`` and the trained
mapper is re-expressed exactly for keyed inputs (`MappingNetwork.keyed`). Accuracy is
unchanged (the key is an invertible affine map folded into the first layer), but a rotation
now changes the coordinates the server reads as well as the carrier: a substitute mapper
fitted to one generation's queries sees the next generation's as an unknown rotation of its
input space, moved far from every input it was fitted on. The rotation alone leaves the
substitute at chance on average, but one draw can hand it a few classes' images where it
expects them; the offset (``output_offset`` times the spread of the scores) puts every
input deep in one region of the substitute, so it answers one class for all of them.
Without the key, the carrier alone must make the old mapper fail, and a public model whose
features see the task input through the carrier barely changes them.

Tensor conventions: images are ``(N, C, H, W)`` float32 in [0, 1] (the public model's
value range; see `public_models`), a carrier is ``(C, H, W)``.
"""

from __future__ import annotations

import copy
import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.numpy import save as safetensors_numpy_save
from torch import nn
from torch.nn import functional as F

from modelguard.datasets import Dataset
from modelguard.errors import InvalidInput

from .public_models import PublicModel
from .query_profile import QueryProfile

log = logging.getLogger(__name__)

#: Called with the fraction done (0..1).
Progress = Callable[[float], None]


# ----------------------------------------------------------------------------- embedding


@dataclass(frozen=True)
class Placement:
    """Where the resized task input goes in the carrier: rows ``top:top+height``, columns
    ``left:left+width``."""

    top: int
    left: int
    height: int
    width: int

    def to_dict(self) -> dict[str, int]:
        return {"top": self.top, "left": self.left, "height": self.height, "width": self.width}


def centre_placement(carrier_hw: tuple[int, int], input_hw: tuple[int, int]) -> Placement:
    """The centred box of size ``input_hw`` in a carrier of size ``carrier_hw``.

    When the margins are odd the extra pixel goes below/right (``top = (H - h) // 2``).
    """
    (height, width), (h, w) = carrier_hw, input_hw
    if not (0 < h <= height and 0 < w <= width):
        raise InvalidInput(
            f"the task input ({h}×{w}) must fit inside the carrier ({height}×{width}): "
            "lower input_fraction"
        )
    return Placement((height - h) // 2, (width - w) // 2, h, w)


def placement_for(
    carrier_shape: tuple[int, int, int], input_hw: tuple[int, int], input_fraction: float
) -> Placement:
    """Resize the task input, keeping its aspect, so that its longer side is
    ``input_fraction`` of the carrier's shorter side, and centre it."""
    _, height, width = carrier_shape
    side = max(1, round(min(height, width) * input_fraction))
    h_in, w_in = input_hw
    scale = side / max(h_in, w_in)
    return centre_placement(
        (height, width), (max(1, round(h_in * scale)), max(1, round(w_in * scale)))
    )


def embed(x: torch.Tensor, carrier: torch.Tensor, placement: Placement) -> torch.Tensor:
    """``g(x, c)``: put the task input ``x`` at ``placement`` inside the carrier.

    ``x`` is ``(N, Cx, h, w)`` in [0, 1]; it is resized (bilinear, antialiased) to the
    placement's size. ``carrier`` is ``(C, H, W)`` (or ``(N, C, H, W)``). A one-channel
    input in a three-channel carrier is replicated over the channels; a three-channel input
    in a one-channel carrier is converted to luminance. Returns ``(N, C, H, W)``;
    differentiable with respect to ``carrier`` (the covered pixels get zero gradient).
    """
    if x.ndim != 4:
        raise InvalidInput(f"task inputs must be (N, C, H, W); got {tuple(x.shape)}")
    if carrier.ndim == 3:
        carrier = carrier.unsqueeze(0)
    channels, height, width = carrier.shape[1:]
    if placement.top + placement.height > height or placement.left + placement.width > width:
        raise InvalidInput(f"placement {placement} does not fit a {height}×{width} carrier")
    size = (placement.height, placement.width)
    if tuple(x.shape[2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif x.shape[1] == 3 and channels == 1:
            weights = torch.tensor([0.2125, 0.7154, 0.0721], dtype=x.dtype, device=x.device)
            x = (x * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise InvalidInput(
                f"cannot embed {x.shape[1]}-channel inputs in a {channels}-channel carrier"
            )
    pad = (
        placement.left,
        width - placement.left - placement.width,
        placement.top,
        height - placement.top - placement.height,
    )
    canvas = F.pad(x, pad)
    mask = torch.zeros(1, 1, height, width, dtype=carrier.dtype, device=carrier.device)
    mask[
        ...,
        placement.top : placement.top + placement.height,
        placement.left : placement.left + placement.width,
    ] = 1
    return carrier * (1 - mask) + canvas * mask


def carrier_image(
    natural: torch.Tensor, perturbation: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)
) -> torch.Tensor:
    """``c = clip(a + tanh(p))``, shape of ``natural``. ``tanh`` bounds the perturbation to
    (-1, 1) per pixel before clipping to the valid range."""
    return torch.clamp(natural + torch.tanh(perturbation), value_range[0], value_range[1])


# ------------------------------------------------------------------------- mapping network


class MappingNetwork(nn.Module):
    """``mf``: public-model scores ``(N, in_features)`` → task logits ``(N, classes)``.

    ``fc1`` (in→hidden) + ReLU + ``fc2`` (hidden→classes); ``hidden=0`` is a single linear
    layer named ``fc2``. The layer names are the serving format's tensor names.

    A fixed input standardisation ``(z − input_mean) / input_std`` (identity until
    `standardise` sets it) precedes the first layer. Public models' scores differ in scale
    by orders of magnitude between units (ReLU features next to logits), which slows Adam on
    the joint ``(p, w)`` problem; it is an affine map, so `arrays` folds it into the first
    layer and the serving format and result-mapper are unchanged.
    """

    input_mean: torch.Tensor
    input_std: torch.Tensor

    def __init__(self, in_features: int, classes: int, hidden: int = 64) -> None:
        super().__init__()
        if in_features < 1 or classes < 2 or hidden < 0:
            raise InvalidInput(
                f"mapping network needs in_features >= 1, classes >= 2, hidden >= 0; got "
                f"{in_features}, {classes}, {hidden}"
            )
        self.in_features, self.classes, self.hidden = in_features, classes, hidden
        self.fc1: nn.Module = nn.Linear(in_features, hidden) if hidden else nn.Identity()
        self.fc2 = nn.Linear(hidden or in_features, classes)
        self.register_buffer("input_mean", torch.zeros(in_features))
        self.register_buffer("input_std", torch.ones(in_features))

    @torch.no_grad()
    def standardise(self, scores: torch.Tensor) -> None:
        """Fix the input standardisation to the per-unit mean/std of ``scores`` ``(N, in)``.
        Near-constant units (dead ReLUs) get a floor of a tenth of the mean std, so a unit
        that comes alive later in training is not amplified without bound."""
        std = scores.std(0)
        floor = max(float(std.mean()) * 0.1, 1e-6)
        self.input_mean.copy_(scores.mean(0))
        self.input_std.copy_(std.clamp_min(floor))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = (z - self.input_mean) / self.input_std
        if self.hidden:
            z = F.relu(self.fc1(z))
        return self.fc2(z)  # type: ignore[no-any-return]

    def arrays(self) -> dict[str, np.ndarray]:
        """Weights as float32 numpy arrays, the standardisation folded into the first layer:
        ``fc1.weight`` (hidden, in), ``fc1.bias``, ``fc2.weight`` (classes, hidden|in),
        ``fc2.bias``. ``W((z − m) / s) + b = (W / s) z + (b − (W / s) m)``."""
        state = {k: v.detach().to(torch.float64) for k, v in self.state_dict().items()}
        mean, std = state.pop("input_mean"), state.pop("input_std")
        first = "fc1" if self.hidden else "fc2"
        weight = state[f"{first}.weight"] / std
        state[f"{first}.weight"] = weight
        state[f"{first}.bias"] = state[f"{first}.bias"] - weight @ mean
        return {name: t.to(torch.float32).cpu().numpy().copy() for name, t in state.items()}

    @torch.no_grad()
    def keyed(self, key: torch.Tensor) -> MappingNetwork:
        """The same function for keyed inputs ``z' = z Q + o`` (`random_output_key`; ``o`` is
        zero for a square key): ``z = (z' − o) Qᵀ``, so the first layer
        ``(W / s)(z − m) + b`` becomes ``((W / s) Q) z' + (b − (W / s) m − (W / s) Q o)``,
        computed in float64; the standardisation is folded in (identity afterwards)."""
        if tuple(key.shape) not in (
            (self.in_features, self.in_features),
            (self.in_features + 1, self.in_features),
        ):
            raise InvalidInput(
                f"output key is {tuple(key.shape)}; this mapper reads {self.in_features} scores"
            )
        rotation, offset = key_parts(key.to(torch.float64))
        first = "fc1" if self.hidden else "fc2"
        layer: nn.Linear = getattr(self, first)
        weight = layer.weight.to(torch.float64) / self.input_std.to(torch.float64)
        bias = layer.bias.to(torch.float64) - weight @ self.input_mean.to(torch.float64)
        keyed_weight = weight @ rotation
        if offset is not None:
            bias = bias - keyed_weight @ offset
        out = copy.deepcopy(self)
        out.input_mean.zero_()
        out.input_std.fill_(1.0)
        target: nn.Linear = getattr(out, first)
        target.weight.copy_(keyed_weight.to(target.weight.dtype))
        target.bias.copy_(bias.to(target.bias.dtype))
        return out


def random_output_key(dim: int, seed: int | None = None, offset_norm: float = 0.0) -> torch.Tensor:
    """A random output key, float64: the orthogonal ``Q`` ``(dim, dim)``, uniform over the
    orthogonal group (QR of a Gaussian matrix with the signs of ``R``'s diagonal moved into
    ``Q``, Mezzadri 2007), or, with ``offset_norm > 0``, the affine key ``(dim + 1, dim)``:
    ``Q`` with a last row ``o`` of that norm in a uniformly random direction (the device
    sends ``z Q + o``; see `apply_output_key`). ``seed=None`` (every served carrier) draws
    63 bits from `secrets`: a key must not follow from the training configuration, whose
    seed is shared and often 0."""
    if dim < 1:
        raise InvalidInput(f"an output key needs dim >= 1; got {dim}")
    if not (offset_norm >= 0 and math.isfinite(offset_norm)):
        raise InvalidInput(f"an output key's offset norm must be finite, >= 0; got {offset_norm}")
    generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    key: torch.Tensor = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    if offset_norm:
        direction = torch.randn(dim, generator=generator, dtype=torch.float64)
        offset = direction / direction.norm() * offset_norm
        key = torch.cat([key, offset.unsqueeze(0)])
    return key


def key_parts(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(Q, o)`` of an output key: a square key is ``Q`` alone (``o`` None); a
    ``(K + 1, K)`` key is ``Q`` over the offset row ``o``."""
    dim = key.shape[-1]
    if key.shape[0] == dim + 1:
        return key[:dim], key[dim]
    return key, None


def apply_output_key(scores: torch.Tensor, key: torch.Tensor | None) -> torch.Tensor:
    """``scores Q + o`` (``scores`` unchanged when there is no key)."""
    if key is None:
        return scores
    if key.ndim != 2 or key.shape[-1] != scores.shape[-1] or key.shape[0] - key.shape[1] > 1:
        raise InvalidInput(
            f"output key is {tuple(key.shape)}; the public model gives {scores.shape[-1]} scores"
        )
    rotation, offset = key_parts(key.to(scores.dtype))
    keyed = scores @ rotation
    return keyed + offset if offset is not None else keyed


def score_spread(scores: torch.Tensor) -> float:
    """The mean distance of score rows ``(N, K)`` from their mean: the scale an output key's
    offset is drawn at, so it is far from the data for any public model's units."""
    centred = scores.to(torch.float64) - scores.to(torch.float64).mean(0)
    return float(centred.norm(dim=1).mean())


def mapper_to_safetensors(mapper: MappingNetwork, metadata: dict[str, str] | None = None) -> bytes:
    """The serving format read by ``modelguard.carrier.mapper_registry`` (numpy only)."""
    meta = {"format": "modelguard-mapper-v1", "hidden": str(mapper.hidden)}
    meta.update(metadata or {})
    return safetensors_numpy_save(mapper.arrays(), metadata=meta)


def regulariser(perturbation: torch.Tensor, mapper: nn.Module) -> torch.Tensor:
    """``‖p‖ + ‖w‖`` (Euclidean norms; ``w`` = all mapper parameters). A 1e-12 floor keeps
    the gradient finite at ``p = 0``."""
    p_norm = torch.sqrt(perturbation.pow(2).sum() + 1e-12)
    w_sq = sum(param.pow(2).sum() for param in mapper.parameters())
    return p_norm + torch.sqrt(torch.as_tensor(w_sq) + 1e-12)


# ------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class CarrierConfig:
    """Hyperparameters of `train_carrier`; validated on construction."""

    #: Hidden width of the mapping network (0: a single linear layer).
    hidden: int = 64
    #: Weight γ of ``‖p‖ + ‖w‖``.
    gamma: float = 1e-4
    #: Samples per step (the reference method uses 64).
    batch_size: int = 64
    lr_perturbation: float = 0.05
    lr_mapper: float = 2e-3
    #: Learning-rate schedule over ``max_steps``: "constant", or "cosine" (decays both
    #: rates to zero at ``max_steps``; the late, small steps settle the validation jitter
    #: that a constant rate leaves on ``p``).
    lr_schedule: str = "constant"
    #: Budget: at most this many joint steps …
    max_steps: int = 3000
    #: … and at most this much wall time (None: no time budget).
    time_budget_s: float | None = None
    #: Longer side of the placed task input relative to the carrier's shorter side.
    input_fraction: float = 0.75
    #: Convergence: validate every ``eval_every`` steps on ``validation_samples`` held-out
    #: samples; stop after ``patience`` validations without ``min_delta`` improvement.
    eval_every: int = 100
    validation_samples: int = 1000
    patience: int = 5
    min_delta: float = 1e-3
    #: Warm start: fit the mapper alone on the untrained carrier's pseudo-outputs of this
    #: many training samples (0: off) for ``mapper_warmup_epochs`` epochs.
    mapper_warmup_samples: int = 0
    mapper_warmup_epochs: int = 30
    #: Fix the mapper's input standardisation (`MappingNetwork.standardise`) on the
    #: untrained carrier's pseudo-outputs of this many training samples (0: off). Only
    #: for a new mapper: a given (shared) mapper keeps its own.
    standardise_samples: int = 2000
    #: Rotation-aware training (beyond the reference method): weight of a term that drives the
    #: *previous* generations' mappers to uniform outputs on this carrier's pseudo-outputs,
    #: so a substitute fitted to an old carrier transfers less to the new one (0: off).
    rotation_weight: float = 0.0
    #: Give each carrier a secret output key (see the module docstring, (6)) …
    output_key: bool = True
    #: … whose offset is this many times the mean distance of the carrier's validation
    #: scores from their mean (0: the orthogonal rotation alone).
    output_offset: float = 1000.0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.hidden < 0:
            problems.append("hidden >= 0")
        if not (self.gamma >= 0 and math.isfinite(self.gamma)):
            problems.append("gamma >= 0")
        if self.batch_size < 1:
            problems.append("batch_size >= 1")
        if not (self.lr_perturbation > 0 and self.lr_mapper > 0):
            problems.append("learning rates > 0")
        if self.lr_schedule not in ("constant", "cosine"):
            problems.append("lr_schedule 'constant' or 'cosine'")
        if self.max_steps < 0:
            problems.append("max_steps >= 0")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            problems.append("time_budget_s > 0 (or None)")
        if not 0 < self.input_fraction <= 1:
            problems.append("0 < input_fraction <= 1")
        if self.eval_every < 1 or self.validation_samples < 1 or self.patience < 1:
            problems.append("eval_every, validation_samples and patience >= 1")
        if self.mapper_warmup_samples < 0 or self.mapper_warmup_epochs < 0:
            problems.append("mapper warm-up sizes >= 0")
        if self.standardise_samples < 0:
            problems.append("standardise_samples >= 0")
        if not (self.rotation_weight >= 0 and math.isfinite(self.rotation_weight)):
            problems.append("rotation_weight >= 0")
        if not (self.output_offset >= 0 and math.isfinite(self.output_offset)):
            problems.append("output_offset >= 0")
        if self.rotation_weight and self.output_key:
            # earlier generations' mappers read scores under keys this trainer never sees
            problems.append("rotation_weight only with output_key=False")
        if problems:
            raise InvalidInput("invalid carrier config: need " + ", ".join(problems))


@dataclass(frozen=True)
class EvalPoint:
    step: int
    seconds: float
    loss: float
    train_accuracy: float  # running accuracy on the batches since the last evaluation
    validation_accuracy: float


@dataclass
class TrainingState:
    """What the early-stop hook sees."""

    step: int = 0
    seconds: float = 0.0
    best_validation: float = -1.0
    best_step: int = 0
    evaluations_since_best: int = 0
    history: list[EvalPoint] = field(default_factory=list)


@dataclass(frozen=True)
class CarrierResult:
    """A trained carrier and its mapping network, with the figures that describe them."""

    carrier: torch.Tensor  # (C, H, W) in [0, 1]: what the device receives
    natural: torch.Tensor  # (C, H, W): a
    perturbation: torch.Tensor  # (C, H, W): p
    mapper: MappingNetwork  # eval mode, on CPU
    placement: Placement
    public_model: str
    config: CarrierConfig
    steps: int
    seconds: float
    stop_reason: str
    validation_accuracy: float  # best validation accuracy (the kept state)
    test_accuracy: float | None  # mapped accuracy on ``test_data`` when given
    history: tuple[EvalPoint, ...]
    #: What legitimate queries of this carrier look like (validation inputs embedded in the
    #: final carrier): the extraction detector's off-distribution rule.
    query_profile: QueryProfile
    #: The key of the device's keyed scores ``f(g(x, c)) Q + o``: ``Q`` ``(K, K)``, with the
    #: offset ``o`` as a last row when it has one (None: unkeyed); the mapper and the query
    #: profile read keyed scores.
    output_key: torch.Tensor | None = None

    def manifest(self) -> dict[str, object]:
        """JSON-ready description (no tensors)."""
        return {
            "public_model": self.public_model,
            "placement": self.placement.to_dict(),
            "carrier_shape": list(self.carrier.shape),
            "hidden": self.mapper.hidden,
            "in_features": self.mapper.in_features,
            "classes": self.mapper.classes,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "stop_reason": self.stop_reason,
            "validation_accuracy": self.validation_accuracy,
            "test_accuracy": self.test_accuracy,
            "gamma": self.config.gamma,
            "batch_size": self.config.batch_size,
            "output_key": key_description(self.output_key),
        }


def key_description(key: torch.Tensor | None) -> str | None:
    if key is None:
        return None
    return "orthogonal" if key_parts(key)[1] is None else "orthogonal + offset"


@torch.no_grad()
def pseudo_outputs(
    public_model: PublicModel,
    x: torch.Tensor,
    carrier: torch.Tensor,
    placement: Placement,
    batch_size: int = 256,
    output_key: torch.Tensor | None = None,
) -> torch.Tensor:
    """``f(g(x, c)) Q + o`` for task inputs ``x`` ``(N, Cx, h, w)`` → ``(N, K)``: what a
    device sends to the server (``Q``, ``o``: the carrier's output key, when it has one)."""
    outs = [
        public_model.module(embed(x[i : i + batch_size], carrier, placement))
        for i in range(0, len(x), batch_size)
    ]
    scores = torch.cat(outs) if outs else torch.zeros(0, public_model.output_dim)
    return apply_output_key(scores, output_key)


@torch.no_grad()
def mapped_accuracy(
    public_model: PublicModel,
    mapper: nn.Module,
    carrier: torch.Tensor,
    placement: Placement,
    data: Dataset,
    batch_size: int = 256,
    output_key: torch.Tensor | None = None,
) -> float:
    """Accuracy of ``mf(f(g(x, c)) Q + o)`` on ``data``."""
    if len(data) == 0:
        return 0.0
    was_training = mapper.training
    mapper.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        scores = public_model.module(embed(data.x[i : i + batch_size], carrier, placement))
        scores = apply_output_key(scores, output_key)
        correct += int((mapper(scores).argmax(1) == data.y[i : i + batch_size]).sum())
    mapper.train(was_training)
    return correct / len(data)


class CarrierTrainer:
    """Learns ``(p, w)`` for one natural image. Subclass and override `should_stop` for a
    different convergence rule (TrojanZoo's ``optimize_mark`` early-stop hook)."""

    def __init__(
        self,
        config: CarrierConfig,
        public_model: PublicModel,
        *,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        self.public_model = public_model
        self.device = torch.device(device)
        self.model = public_model.module.to(self.device)

    def should_stop(self, state: TrainingState) -> str | None:
        """Called after each validation; a non-empty reason stops training."""
        if state.evaluations_since_best >= self.config.patience:
            return f"converged (no validation gain for {self.config.patience} evaluations)"
        return None

    def train(
        self,
        task_data: Dataset,
        natural: torch.Tensor,
        *,
        test_data: Dataset | None = None,
        progress: Progress | None = None,
        mapper: MappingNetwork | None = None,
        train_mapper: bool = True,
        previous_mappers: Sequence[MappingNetwork] = (),
    ) -> CarrierResult:
        """``mapper``/``train_mapper=False``: learn only ``p`` for an existing (shared)
        mapping network, which is left unmodified (a copy is trained otherwise).
        ``previous_mappers``: the user's earlier generations, for ``rotation_weight``."""
        cfg = self.config
        public = self.public_model
        if tuple(natural.shape) != public.input_shape:
            raise InvalidInput(
                f"natural image has shape {tuple(natural.shape)}; the public model "
                f"{public.name!r} takes {public.input_shape}"
            )
        classes = int(task_data.y.max()) + 1 if len(task_data) else 0
        if len(task_data) <= cfg.validation_samples or classes < 2:
            raise InvalidInput(
                f"task data needs more than validation_samples={cfg.validation_samples} "
                f"samples and at least 2 classes; got {len(task_data)} samples, {classes} classes"
            )
        generator = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        order = torch.randperm(len(task_data), generator=generator)
        val_idx, train_idx = order[: cfg.validation_samples], order[cfg.validation_samples :]
        validation = Dataset(task_data.x[val_idx], task_data.y[val_idx])
        train = Dataset(task_data.x[train_idx], task_data.y[train_idx])
        placement = placement_for(public.input_shape, tuple(train.x.shape[2:]), cfg.input_fraction)  # type: ignore[arg-type]

        dev = self.device
        a = natural.to(dev, torch.float32)
        p = torch.zeros_like(a, requires_grad=True)
        fresh_mapper = mapper is None
        if mapper is None:
            mapper = MappingNetwork(public.output_dim, classes, cfg.hidden)
        else:
            if (mapper.in_features, mapper.classes) != (public.output_dim, classes):
                raise InvalidInput(
                    f"the given mapper maps {mapper.in_features}→{mapper.classes}; this task "
                    f"needs {public.output_dim}→{classes}"
                )
            mapper = copy.deepcopy(mapper)
        mapper = mapper.to(dev)
        for parameter in mapper.parameters():
            parameter.requires_grad_(train_mapper)
        low, high = public.value_range
        previous = [copy.deepcopy(m).to(dev).eval().requires_grad_(False) for m in previous_mappers]
        if cfg.rotation_weight and not previous:
            log.info("rotation_weight is set but no previous mapper was given: term unused")

        start = time.monotonic()
        if cfg.standardise_samples and fresh_mapper:
            index = torch.randperm(len(train), generator=generator)[: cfg.standardise_samples]
            untrained = carrier_image(a, p.detach(), (low, high))
            mapper.standardise(pseudo_outputs(public, train.x[index].to(dev), untrained, placement))
        if cfg.mapper_warmup_samples and train_mapper:
            self._warm_start(
                mapper, train, carrier_image(a, p.detach(), (low, high)), placement, generator
            )

        groups: list[dict[str, object]] = [{"params": [p], "lr": cfg.lr_perturbation}]
        if train_mapper:
            groups.append({"params": list(mapper.parameters()), "lr": cfg.lr_mapper})
        optimiser = torch.optim.Adam(groups)
        scheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(1, cfg.max_steps))
            if cfg.lr_schedule == "cosine"
            else None
        )
        state = TrainingState()
        best = (p.detach().clone(), copy.deepcopy(mapper.state_dict()))
        stop_reason = f"step budget ({cfg.max_steps} steps)"
        if cfg.mapper_warmup_samples and train_mapper:
            # the warm-started mapper is a candidate too: joint steps must beat it
            warm = mapped_accuracy(
                public, mapper, carrier_image(a, p.detach(), (low, high)), placement, validation
            )
            state.history.append(
                EvalPoint(0, time.monotonic() - start, float("nan"), float("nan"), warm)
            )
            state.best_validation = warm
            log.info("mapper warm start: validation accuracy %.4f", warm)
        n = len(train)
        perm = torch.randperm(n, generator=generator)
        cursor, correct, seen, loss_sum = 0, 0, 0, 0.0
        mapper.train()
        for step in range(1, cfg.max_steps + 1):
            if cursor + cfg.batch_size > n:
                perm, cursor = torch.randperm(n, generator=generator), 0
            index = perm[cursor : cursor + cfg.batch_size]
            cursor += cfg.batch_size
            x, y = train.x[index].to(dev), train.y[index].to(dev)
            carrier = carrier_image(a, p, (low, high))
            scores = self.model(embed(x, carrier, placement))
            logits = mapper(scores)
            ce = F.cross_entropy(logits, y)
            loss = ce + cfg.gamma * regulariser(p, mapper) if cfg.gamma else ce
            if cfg.rotation_weight and previous:
                # cross-entropy of each old mapper's output against the uniform distribution
                spread = torch.stack([-F.log_softmax(m(scores), 1).mean() for m in previous])
                loss = loss + cfg.rotation_weight * spread.mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if scheduler is not None:
                scheduler.step()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            loss_sum += float(ce.detach()) * len(y)
            state.step, state.seconds = step, time.monotonic() - start
            out_of_time = cfg.time_budget_s is not None and state.seconds >= cfg.time_budget_s
            if step % cfg.eval_every == 0 or step == cfg.max_steps or out_of_time:
                carrier_now = carrier_image(a, p.detach(), (low, high))
                val_acc = mapped_accuracy(public, mapper, carrier_now, placement, validation)
                point = EvalPoint(step, state.seconds, loss_sum / seen, correct / seen, val_acc)
                state.history.append(point)
                log.debug("carrier step %d: %s", step, point)
                correct, seen, loss_sum = 0, 0, 0.0
                if val_acc > state.best_validation + cfg.min_delta or state.best_validation < 0:
                    state.best_validation, state.best_step = val_acc, step
                    state.evaluations_since_best = 0
                    best = (p.detach().clone(), copy.deepcopy(mapper.state_dict()))
                else:
                    state.evaluations_since_best += 1
                    if val_acc > state.best_validation:  # small gain: keep the better state
                        state.best_validation = val_acc
                        best = (p.detach().clone(), copy.deepcopy(mapper.state_dict()))
                reason = self.should_stop(state)
                if reason:
                    stop_reason = reason
                    break
                if out_of_time:
                    stop_reason = f"time budget ({cfg.time_budget_s:g} s)"
                    break
                mapper.train()
            if progress is not None and step % 20 == 0:
                progress(min(1.0, step / max(1, cfg.max_steps)))

        best_p, best_w = best
        mapper.load_state_dict(best_w)
        mapper.eval()
        final_carrier = carrier_image(a, best_p, (low, high))
        val_scores = pseudo_outputs(public, validation.x.to(dev), final_carrier, placement)
        key = None
        if cfg.output_key:
            offset_norm = cfg.output_offset * score_spread(val_scores)
            # rounded to the float32 the carrier artifact stores, so the mapper is folded
            # with exactly the key devices apply
            drawn = random_output_key(public.output_dim, offset_norm=offset_norm)
            key = drawn.to(torch.float32).to(dev)
            mapper = mapper.keyed(key)
            val_scores = apply_output_key(val_scores, key)
        test_acc = (
            mapped_accuracy(public, mapper, final_carrier, placement, test_data, output_key=key)
            if test_data is not None
            else None
        )
        if progress is not None:
            progress(1.0)
        return CarrierResult(
            carrier=final_carrier.cpu(),
            natural=a.cpu(),
            perturbation=best_p.cpu(),
            mapper=mapper.cpu(),
            placement=placement,
            public_model=public.name,
            config=cfg,
            steps=state.step,
            seconds=time.monotonic() - start,
            stop_reason=stop_reason,
            validation_accuracy=max(state.best_validation, 0.0),
            test_accuracy=test_acc,
            history=tuple(state.history),
            query_profile=QueryProfile.fit(val_scores.cpu().numpy()),
            output_key=key.cpu() if key is not None else None,
        )

    def _warm_start(
        self,
        mapper: MappingNetwork,
        train: Dataset,
        carrier: torch.Tensor,
        placement: Placement,
        generator: torch.Generator,
    ) -> None:
        cfg = self.config
        count = min(cfg.mapper_warmup_samples, len(train))
        index = torch.randperm(len(train), generator=generator)[:count]
        scores = pseudo_outputs(
            self.public_model, train.x[index].to(self.device), carrier, placement
        )
        labels = train.y[index].to(self.device)
        optimiser = torch.optim.Adam(mapper.parameters(), lr=cfg.lr_mapper)
        mapper.train()
        for _ in range(cfg.mapper_warmup_epochs):
            order = torch.randperm(count, generator=generator)
            for i in range(0, count, cfg.batch_size):
                batch = order[i : i + cfg.batch_size]
                loss = F.cross_entropy(mapper(scores[batch]), labels[batch])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()


def train_carrier(
    config: CarrierConfig,
    public_model: PublicModel,
    task_data: Dataset,
    natural_image: torch.Tensor,
    progress: Progress | None = None,
    *,
    test_data: Dataset | None = None,
    device: torch.device | str = "cpu",
    mapper: MappingNetwork | None = None,
    train_mapper: bool = True,
    previous_mappers: Sequence[MappingNetwork] = (),
) -> CarrierResult:
    """Train a carrier ``c = clip(a + tanh(p))`` and mapping network for ``task_data``
    (``x`` ``(N, Cx, h, w)`` in [0, 1], ``y`` ``(N,)``) through the frozen ``public_model``,
    starting from ``natural_image`` ``a`` of shape ``public_model.input_shape``. The public
    model is not modified. See the module docstring for the loss and stopping rule.
    ``mapper`` with ``train_mapper=False`` learns a carrier for an existing shared mapper;
    ``previous_mappers`` with ``config.rotation_weight`` trains a rotation that the user's
    earlier mappers (and substitutes fitted to them) cannot read."""
    trainer = CarrierTrainer(config, public_model, device=device)
    return trainer.train(
        task_data,
        natural_image,
        test_data=test_data,
        progress=progress,
        mapper=mapper,
        train_mapper=train_mapper,
        previous_mappers=previous_mappers,
    )


class Carrier:
    """The device-side half: a carrier image, where inputs go in it and the output key."""

    def __init__(
        self, image: torch.Tensor, placement: Placement, output_key: torch.Tensor | None = None
    ) -> None:
        if image.ndim != 3:
            raise InvalidInput(f"a carrier is (C, H, W); got {tuple(image.shape)}")
        if output_key is not None:
            check_output_key(output_key)
        self.image = image
        self.placement = placement
        self.output_key = output_key

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return embed(x, self.image, self.placement)

    def outputs(
        self, public_model: PublicModel, x: torch.Tensor, batch_size: int = 256
    ) -> torch.Tensor:
        """What the device sends for inputs ``x``: ``f(g(x, c)) Q + o``."""
        return pseudo_outputs(
            public_model, x, self.image, self.placement, batch_size, self.output_key
        )

    @classmethod
    def from_result(cls, result: CarrierResult) -> Carrier:
        return cls(result.carrier, result.placement, result.output_key)


def check_output_key(key: torch.Tensor, tolerance: float = 1e-3) -> None:
    """Refuse anything but a finite orthogonal matrix ``(K, K)``, optionally over an offset
    row ``(K + 1, K)`` (a corrupt key would turn every answer into noise without an
    error)."""
    if (
        key.ndim != 2
        or key.shape[0] not in (key.shape[1], key.shape[1] + 1)
        or key.numel() == 0
        or not torch.isfinite(key).all()
    ):
        raise InvalidInput(
            f"an output key is a finite (K, K) or (K + 1, K) matrix; got {tuple(key.shape)}"
        )
    q = key_parts(key.to(torch.float64))[0]
    error = float((q.T @ q - torch.eye(q.shape[0], dtype=torch.float64)).abs().max())
    if error > tolerance:
        raise InvalidInput(f"the output key is not orthogonal (max |QᵀQ − I| = {error:.2g})")


CARRIER_FORMAT = "modelguard-carrier-v1"


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (8-byte little-endian header length, then
    the JSON header)."""
    import json
    import struct

    if len(data) < 8:
        raise InvalidInput("safetensors data is shorter than its header")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise InvalidInput("safetensors header length exceeds the data")
    header = json.loads(data[8 : 8 + length])
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()}


def carrier_to_safetensors(
    image: torch.Tensor,
    placement: Placement,
    public_model: PublicModel,
    generation: int = 0,
    output_key: torch.Tensor | None = None,
) -> bytes:
    """The carrier artifact a device downloads: the image ``(C, H, W)`` as tensor
    ``carrier``, the output key ``(K, K)`` or ``(K + 1, K)`` (`random_output_key`) as
    tensor ``output_key`` when the carrier has one, plus, in the metadata, the placement and
    the exact public model (name and weights sha256) it was trained for."""
    from safetensors.torch import save

    metadata = {
        "format": CARRIER_FORMAT,
        "public_model": public_model.name,
        "public_model_sha256": public_model.weights_sha256,
        "generation": str(generation),
        **{k: str(v) for k, v in placement.to_dict().items()},
    }
    tensors = {"carrier": image.detach().to(torch.float32).contiguous().cpu()}
    if output_key is not None:
        if output_key.shape[-1] != public_model.output_dim:
            raise InvalidInput(
                f"output key is {tuple(output_key.shape)}; {public_model.name!r} gives "
                f"{public_model.output_dim} scores"
            )
        tensors["output_key"] = output_key.detach().to(torch.float32).contiguous().cpu()
    return save(tensors, metadata=metadata)


@dataclass(frozen=True)
class CarrierPackage:
    carrier: Carrier
    public_model: str
    public_model_sha256: str
    generation: int


def carrier_from_safetensors(data: bytes) -> CarrierPackage:
    """Parse and validate a carrier artifact (see `carrier_to_safetensors`)."""
    from safetensors.torch import load

    try:
        tensors = load(data)
        meta = safetensors_metadata(data)
    except Exception as err:
        raise InvalidInput(f"carrier artifact is not a readable safetensors file: {err}") from err
    if meta.get("format") != CARRIER_FORMAT or "carrier" not in tensors:
        raise InvalidInput(f"not a {CARRIER_FORMAT} artifact (metadata {sorted(meta)})")
    image = tensors["carrier"]
    try:
        placement = Placement(*(int(meta[k]) for k in ("top", "left", "height", "width")))
        generation = int(meta["generation"])
        public_model, public_sha256 = meta["public_model"], meta["public_model_sha256"]
    except (KeyError, ValueError) as err:
        raise InvalidInput(f"carrier artifact metadata is incomplete: {err}") from err
    if image.ndim != 3 or not torch.isfinite(image).all():
        raise InvalidInput("carrier image must be a finite (C, H, W) tensor")
    carrier = Carrier(image, placement, tensors.get("output_key"))
    return CarrierPackage(carrier, public_model, public_sha256, generation)
