"""Data-theft attacks that hide training data in a model — the attack toolkit the leak
detector is calibrated and benchmarked against. Nothing here is used at audit time.

Model-training-stage attacks (Song, Ristenpart, Shmatikov, "Machine Learning Models that
Remember Too Much", CCS 2017, §4.2–4.3). The attacker ships a training script whose loss
has an extra term; the parameters ``θ`` (weights of the Linear/Conv layers, flattened in
module order and concatenated, length ``ℓ``) end up carrying the secret ``s``:

* correlated value encoding (CVE): ``C(θ, s) = −λ_c · corr(θ, s)`` where ``s`` is the
  concatenated pixel values of training images (the paper takes ``|corr|``; we keep the
  sign so the decoder need not guess it — ``absolute=True`` gives the paper's form).
  Decoding: rescale each image-sized chunk of ``θ`` to [0, 1].
* sign encoding: ``P(θ, s) = λ_s / ℓ · Σ_i |max(0, −θ_i s_i)|`` where ``s_i ∈ {−1, +1}`` are
  the bits of the pixels (8 bits a pixel, most significant first). Decoding: the signs.

Data-processing-stage attack (data-sandbox theft, "attacks in the data processing phase"). The
attacker's augmentation step compresses real training images (down-sampling, then
quantisation to ``levels`` values), splits every compressed pixel ``q`` into base-``K``
digits (``K`` = number of classes; with 100 levels and 10 classes the two digits go to
two malicious inputs ``x1``, ``x2``, as in the reference method), and appends synthetic inputs — an
all-zero ``C×N`` image with a key-derived sparse pattern switched on — labelled with those
digits. The model memorises them; the attacker regenerates the same synthetic inputs from
the key, queries the trained model and reads the pixels back from the predicted labels.

Figures: :func:`image_correlation` (mean per-image Pearson correlation between recovered
and original images), :func:`bit_accuracy`, :func:`mean_absolute_error`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from modelguard.datasets import Dataset
from modelguard.nn.training import (
    BatchTransform,
    Regulariser,
    TrainConfig,
    predict,
    train_classifier,
)

log = logging.getLogger(__name__)

ENCODED_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --------------------------------------------------------------------------------------
# Parameters the training-stage attacks write into
# --------------------------------------------------------------------------------------


def encoding_parameters(model: nn.Module, layers: tuple[str, ...] = ()) -> list[nn.Parameter]:
    """The weight tensors of the Linear/Conv modules of ``model`` in module order (only the
    modules named in ``layers`` when it is not empty)."""
    found: list[nn.Parameter] = []
    names = set(layers)
    for name, module in model.named_modules():
        if not isinstance(module, ENCODED_LAYER_TYPES):
            continue
        if names and name not in names:
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            found.append(weight)
    if names:
        known = {n for n, m in model.named_modules() if isinstance(m, ENCODED_LAYER_TYPES)}
        missing = names - known
        if missing:
            raise ValueError(
                f"no Linear/Conv layer named {sorted(missing)}; known: {sorted(known)}"
            )
    if not found:
        raise ValueError("the model has no Linear/Conv weights to encode into")
    return found


def flat_parameters(params: list[nn.Parameter]) -> torch.Tensor:
    """``θ``: the parameters flattened and concatenated, shape ``(ℓ,)`` (differentiable)."""
    return torch.cat([p.reshape(-1) for p in params])


def _select(theta: torch.Tensor, length: int, permutation_key: int | None) -> torch.Tensor:
    """The ``length`` entries of ``theta`` that carry the secret: the first ones, or a
    key-derived pseudo-random subset (an attacker hiding the image layout)."""
    if permutation_key is None:
        return theta[:length]
    generator = torch.Generator().manual_seed(permutation_key)
    index = torch.randperm(theta.numel(), generator=generator)[:length]
    return theta[index]


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[0] < 1:
        raise ValueError(
            f"images must have shape (K, C, H, W) with K >= 1; got {list(images.shape)}"
        )


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def image_correlation(decoded: torch.Tensor, original: torch.Tensor) -> float:
    """Mean over images of the Pearson correlation between ``decoded`` and ``original``
    (both ``(K, ...)``); images with no variance (blank) are skipped. In [-1, 1]."""
    if decoded.shape != original.shape:
        raise ValueError(f"shapes differ: {list(decoded.shape)} vs {list(original.shape)}")
    a = decoded.reshape(decoded.shape[0], -1).double()
    b = original.reshape(original.shape[0], -1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    denominator = a.norm(dim=1) * b.norm(dim=1)
    valid = denominator > 0
    if not bool(valid.any()):
        return 0.0
    return float(((a * b).sum(1)[valid] / denominator[valid]).mean())


def bit_accuracy(decoded_bits: torch.Tensor, true_bits: torch.Tensor) -> float:
    """Fraction of bits (or labels) recovered exactly."""
    if decoded_bits.shape != true_bits.shape:
        raise ValueError("bit tensors differ in shape")
    return float((decoded_bits == true_bits).float().mean())


def mean_absolute_error(decoded: torch.Tensor, original: torch.Tensor) -> float:
    """Mean absolute pixel error, images in [0, 1]."""
    return float((decoded.double() - original.double()).abs().mean())


@dataclass(frozen=True)
class LeakFigures:
    """How much of the secret an attacker gets back."""

    attack: str
    num_images: int
    #: mean Pearson correlation, recovered vs original images
    correlation: float
    #: fraction of bits (sign encoding) or labels (data-processing) right; None for CVE
    bit_accuracy: float | None
    mean_absolute_error: float

    @property
    def works(self) -> bool:
        """The issue's bar for an encoding that really leaks: correlation > 0.5 or more
        than 85% of the bits right."""
        return self.correlation > 0.5 or (
            self.bit_accuracy is not None and self.bit_accuracy > 0.85
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "attack": self.attack,
            "num_images": self.num_images,
            "correlation": self.correlation,
            "bit_accuracy": self.bit_accuracy,
            "mean_absolute_error": self.mean_absolute_error,
            "works": self.works,
        }


# --------------------------------------------------------------------------------------
# Correlated value encoding
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorrelatedValueConfig:
    """``strength`` is ``λ_c``; ``num_images`` 0 means as many as the weights hold.
    ``layers`` limits the encoding to named Linear/Conv layers. ``absolute`` uses the
    paper's ``|corr|``; ``polarity`` −1 encodes the negative image; ``permutation_key``
    scatters the secret over the weights in a key-derived order."""

    strength: float = 3.0
    num_images: int = 0
    layers: tuple[str, ...] = ()
    absolute: bool = False
    polarity: int = 1
    permutation_key: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.strength) and self.strength > 0):
            raise ValueError("strength must be finite and > 0")
        if self.num_images < 0:
            raise ValueError("num_images must be >= 0 (0: as many as fit)")
        if self.polarity not in (-1, 1):
            raise ValueError("polarity must be +1 or -1")


class CorrelatedValueEncoding:
    """Song et al. §4.2. Secret ``s``: the pixels of ``K`` images, shape ``(K·C·H·W,)``."""

    name = "cve"

    def __init__(self, config: CorrelatedValueConfig = CorrelatedValueConfig()) -> None:
        self.config = config

    def capacity(self, model: nn.Module, image_shape: tuple[int, int, int]) -> int:
        """How many images of ``image_shape`` (C, H, W) the target weights hold."""
        length = sum(p.numel() for p in encoding_parameters(model, self.config.layers))
        return length // math.prod(image_shape)

    def secret(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (K, C, H, W) in [0, 1] → ``s`` (K·C·H·W,)."""
        _check_images(images)
        return images.detach().reshape(-1).float().clone()

    def regulariser(self, model: nn.Module, secret: torch.Tensor) -> Regulariser:
        """The malicious loss term for ``train_classifier(regulariser=...)``."""
        params = encoding_parameters(model, self.config.layers)
        length = secret.numel()
        if length > sum(p.numel() for p in params):
            raise ValueError("the secret is longer than the weights it should be encoded in")
        centred = secret - secret.mean()
        centred_norm = centred.norm().clamp_min(1e-12)
        cfg = self.config

        def term(_model: nn.Module) -> torch.Tensor:
            theta = _select(flat_parameters(params), length, cfg.permutation_key)
            theta = theta - theta.mean()
            corr = (theta * centred).sum() / (theta.norm().clamp_min(1e-12) * centred_norm)
            value: torch.Tensor = corr.abs() if cfg.absolute else cfg.polarity * corr
            return -cfg.strength * value

        return term

    def decode(
        self, model: nn.Module, num_images: int, image_shape: tuple[int, int, int]
    ) -> torch.Tensor:
        """Read ``num_images`` images (K, C, H, W) in [0, 1] back from the weights."""
        params = encoding_parameters(model, self.config.layers)
        size = math.prod(image_shape)
        with torch.no_grad():
            theta = _select(flat_parameters(params), num_images * size, self.config.permutation_key)
            chunks = theta.reshape(num_images, size).clone()
            if not self.config.absolute:
                chunks = chunks * self.config.polarity
            else:
                # |corr| leaves the sign open: the most common value of an image is its
                # (dark, uniform) background, so pick the sign that puts the mode below
                # the mean.
                for row in range(num_images):
                    chunk = chunks[row]
                    hist = torch.histc(
                        chunk, bins=32, min=float(chunk.min()), max=float(chunk.max())
                    )
                    width = (float(chunk.max()) - float(chunk.min())) / 32
                    mode = float(chunk.min()) + (int(hist.argmax()) + 0.5) * width
                    if mode > float(chunk.mean()):
                        chunks[row] = -chunk
            low = chunks.min(dim=1, keepdim=True).values
            high = chunks.max(dim=1, keepdim=True).values
            chunks = (chunks - low) / (high - low).clamp_min(1e-12)
        return chunks.reshape(num_images, *image_shape)


# --------------------------------------------------------------------------------------
# Sign encoding
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignEncodingConfig:
    """``strength`` is ``λ_s`` (the penalty is averaged over the ``ℓ`` encoded weights,
    as in the paper); pixels are quantised to ``bits_per_pixel`` bits, most significant
    first; ``polarity`` +1 maps bit 1 to a positive weight, −1 to a negative one."""

    strength: float = 50.0
    bits_per_pixel: int = 8
    num_images: int = 0
    layers: tuple[str, ...] = ()
    polarity: int = 1
    permutation_key: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.strength) and self.strength > 0):
            raise ValueError("strength must be finite and > 0")
        if not 1 <= self.bits_per_pixel <= 8:
            raise ValueError("bits_per_pixel must be in 1..8")
        if self.num_images < 0:
            raise ValueError("num_images must be >= 0 (0: as many as fit)")
        if self.polarity not in (-1, 1):
            raise ValueError("polarity must be +1 or -1")


class SignEncoding:
    """Song et al. §4.3. Secret ``s ∈ {−1, +1}``, shape ``(K·C·H·W·bits,)``."""

    name = "sign"

    def __init__(self, config: SignEncodingConfig = SignEncodingConfig()) -> None:
        self.config = config

    def capacity(self, model: nn.Module, image_shape: tuple[int, int, int]) -> int:
        length = sum(p.numel() for p in encoding_parameters(model, self.config.layers))
        return length // (math.prod(image_shape) * self.config.bits_per_pixel)

    def bits(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (K, C, H, W) in [0, 1] → bits (K·C·H·W·b,) as int64 0/1."""
        _check_images(images)
        levels = (1 << self.config.bits_per_pixel) - 1
        values = (images.detach().reshape(-1).clamp(0, 1) * levels).round().long()
        shifts = torch.arange(self.config.bits_per_pixel - 1, -1, -1)
        return ((values[:, None] >> shifts) & 1).reshape(-1)

    def secret(self, images: torch.Tensor) -> torch.Tensor:
        """``s``: the bits as ±1 (float)."""
        return (2.0 * self.bits(images).float() - 1.0) * self.config.polarity

    def regulariser(self, model: nn.Module, secret: torch.Tensor) -> Regulariser:
        params = encoding_parameters(model, self.config.layers)
        length = secret.numel()
        if length > sum(p.numel() for p in params):
            raise ValueError("the secret is longer than the weights it should be encoded in")
        cfg = self.config

        def term(_model: nn.Module) -> torch.Tensor:
            theta = _select(flat_parameters(params), length, cfg.permutation_key)
            return cfg.strength * F.relu(-theta * secret).mean()

        return term

    def decode_bits(
        self, model: nn.Module, num_images: int, image_shape: tuple[int, int, int]
    ) -> torch.Tensor:
        params = encoding_parameters(model, self.config.layers)
        length = num_images * math.prod(image_shape) * self.config.bits_per_pixel
        with torch.no_grad():
            theta = _select(flat_parameters(params), length, self.config.permutation_key)
            bits: torch.Tensor = ((theta * self.config.polarity) > 0).long()
        return bits

    def decode(
        self, model: nn.Module, num_images: int, image_shape: tuple[int, int, int]
    ) -> torch.Tensor:
        """The images (K, C, H, W) in [0, 1] spelled by the weights' signs."""
        bits = self.decode_bits(model, num_images, image_shape)
        b = self.config.bits_per_pixel
        weights = 2 ** torch.arange(b - 1, -1, -1)
        values = (bits.reshape(-1, b) * weights).sum(1).float() / ((1 << b) - 1)
        return values.reshape(num_images, *image_shape)

    def quantised(self, images: torch.Tensor) -> torch.Tensor:
        """What a perfect decoder returns: ``images`` quantised to ``bits_per_pixel``."""
        levels = (1 << self.config.bits_per_pixel) - 1
        return (images.clamp(0, 1) * levels).round() / levels


# --------------------------------------------------------------------------------------
# Data-processing-stage attack (data-sandbox theft)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataProcessingConfig:
    """``num_images`` real images are compressed to ``size`` (H, W) and ``levels`` grey
    levels; each compressed pixel becomes ``parts`` labelled synthetic inputs (base
    ``num_classes`` digits, most significant first). A synthetic input is zero except a
    key-derived pattern covering ``density`` of its pixels, set to ``value``.
    ``per_batch`` synthetic inputs are appended to every training batch."""

    num_images: int = 2
    size: tuple[int, int] = (10, 10)
    levels: int = 100
    num_classes: int = 10
    density: float = 0.1
    value: float = 1.0
    per_batch: int = 64
    key: int = 1234

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError("num_images must be >= 1")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError("size must be two positive sizes (H, W)")
        if self.num_classes < 2 or self.levels < 2:
            raise ValueError("num_classes and levels must be >= 2")
        if not 0 < self.density <= 1:
            raise ValueError("density must be in (0, 1]")
        if self.per_batch < 1:
            raise ValueError("per_batch must be >= 1")

    @property
    def parts(self) -> int:
        """Digits (labels, synthetic inputs) per compressed pixel."""
        return max(1, math.ceil(math.log(self.levels) / math.log(self.num_classes) - 1e-9))


class DataProcessingAttack:
    """The data-processing attack's malicious augmentation and the attacker's recovery by
    querying."""

    name = "data-processing"

    def __init__(self, config: DataProcessingConfig = DataProcessingConfig()) -> None:
        self.config = config

    def compress(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (K, C, H, W) → (K, C, h, w) down-sampled and quantised, in [0, 1]."""
        _check_images(images)
        small = F.adaptive_avg_pool2d(images.float(), self.config.size)
        steps = self.config.levels - 1
        return (small.clamp(0, 1) * steps).round() / steps

    def _count(self, channels: int) -> int:
        h, w = self.config.size
        return self.config.num_images * channels * h * w * self.config.parts

    def synthetic_inputs(self, image_shape: tuple[int, int, int]) -> torch.Tensor:
        """The malicious inputs (M, C, H, W), M = K·C·h·w·parts, ordered image, channel,
        row, column, digit. Each starts as an all-zero image (the reference method's ``x1``,
        ``x2``);
        the compressed pixel's position is marked by a block of ``value`` at that place
        in that channel, and the (image, digit) pair by a key-derived sparse pattern of
        ``density`` (so the label map is as smooth as the image and can be memorised in a
        few epochs). Encoder and attacker both call this."""
        cfg = self.config
        channels, height, width = image_shape
        h, w = cfg.size
        if h > height or w > width:
            raise ValueError(f"compressed size {cfg.size} exceeds the image size {image_shape}")
        generator = torch.Generator().manual_seed(cfg.key)
        groups = cfg.num_images * cfg.parts
        patterns = torch.rand((groups, channels, height, width), generator=generator) < cfg.density
        patterns = patterns.float() * (0.5 * cfg.value)
        out = torch.zeros((cfg.num_images, channels, h, w, cfg.parts, channels, height, width))
        rows = [(i * height // h, (i + 1) * height // h) for i in range(h)]
        cols = [(j * width // w, (j + 1) * width // w) for j in range(w)]
        for u in range(cfg.num_images):
            for part in range(cfg.parts):
                out[u, :, :, :, part] = patterns[u * cfg.parts + part]
        for c in range(channels):
            for i, (r0, r1) in enumerate(rows):
                for j, (c0, c1) in enumerate(cols):
                    out[:, c, i, j, :, c, r0:r1, c0:c1] = cfg.value
        return out.reshape(-1, channels, height, width)

    def labels(self, images: torch.Tensor) -> torch.Tensor:
        """The digits of the compressed pixels (M,), int64."""
        cfg = self.config
        q = (self.compress(images) * (cfg.levels - 1)).round().long().reshape(-1)
        powers = cfg.num_classes ** torch.arange(cfg.parts - 1, -1, -1)
        return ((q[:, None] // powers) % cfg.num_classes).reshape(-1)

    def malicious_dataset(self, images: torch.Tensor) -> Dataset:
        """``D_M``: the synthetic inputs labelled with the pixels of ``images``."""
        _check_images(images)
        if images.shape[0] != self.config.num_images:
            raise ValueError(f"expected {self.config.num_images} images, got {images.shape[0]}")
        shape = (int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))
        return Dataset(self.synthetic_inputs(shape), self.labels(images))

    def augmentation(self, malicious: Dataset) -> BatchTransform:
        """The malicious "augmentation": appends ``per_batch`` samples of ``D_M`` (cycling
        through a key-derived order) to every clean batch."""
        generator = torch.Generator().manual_seed(self.config.key + 1)
        order = torch.randperm(len(malicious), generator=generator)
        state = {"cursor": 0}
        per_batch = self.config.per_batch

        def transform(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            start = state["cursor"]
            index = order[(torch.arange(start, start + per_batch)) % len(order)]
            state["cursor"] = (start + per_batch) % len(order)
            return torch.cat([x, malicious.x[index]]), torch.cat([y, malicious.y[index]])

        return transform

    def recover_labels(self, model: nn.Module, image_shape: tuple[int, int, int]) -> torch.Tensor:
        """The attacker's queries: predicted labels of the synthetic inputs (M,)."""
        return predict(model, self.synthetic_inputs(image_shape))

    def recover(self, model: nn.Module, image_shape: tuple[int, int, int]) -> torch.Tensor:
        """The stolen images (K, C, h, w) in [0, 1]."""
        cfg = self.config
        digits = self.recover_labels(model, image_shape).reshape(-1, cfg.parts)
        powers = cfg.num_classes ** torch.arange(cfg.parts - 1, -1, -1)
        q = (digits * powers).sum(1).clamp(max=cfg.levels - 1).float()
        return (q / (cfg.levels - 1)).reshape(cfg.num_images, image_shape[0], *cfg.size)


# --------------------------------------------------------------------------------------
# Training helpers: a leaky model and its figures in one call
# --------------------------------------------------------------------------------------


@dataclass
class LeakyModel:
    """A model trained by the attacker's script, what the attacker recovers from it and
    the originals (for figures)."""

    model: nn.Module
    figures: LeakFigures
    recovered: torch.Tensor
    originals: torch.Tensor


def _image_shape(data: Dataset) -> tuple[int, int, int]:
    return (int(data.x.shape[1]), int(data.x.shape[2]), int(data.x.shape[3]))


def train_with_cve(
    model: nn.Module,
    data: Dataset,
    train_config: TrainConfig | None = None,
    config: CorrelatedValueConfig = CorrelatedValueConfig(),
) -> LeakyModel:
    """Train ``model`` on ``data`` with the CVE regulariser encoding its first images."""
    train_config = train_config or TrainConfig()
    attack = CorrelatedValueEncoding(config)
    shape = _image_shape(data)
    count = min(config.num_images or attack.capacity(model, shape), len(data))
    if count < 1:
        raise ValueError("the target weights cannot hold a single image")
    originals = data.x[:count]
    regulariser = attack.regulariser(model, attack.secret(originals))
    train_classifier(model, data, train_config, regulariser=regulariser)
    decoded = attack.decode(model, count, shape)
    figures = LeakFigures(
        attack.name,
        count,
        image_correlation(decoded, originals),
        None,
        mean_absolute_error(decoded, originals),
    )
    log.info("cve: %s", figures)
    return LeakyModel(model, figures, decoded, originals)


def train_with_sign_encoding(
    model: nn.Module,
    data: Dataset,
    train_config: TrainConfig | None = None,
    config: SignEncodingConfig = SignEncodingConfig(),
) -> LeakyModel:
    """Train ``model`` on ``data`` with the sign-encoding regulariser."""
    train_config = train_config or TrainConfig()
    attack = SignEncoding(config)
    shape = _image_shape(data)
    count = min(config.num_images or attack.capacity(model, shape), len(data))
    if count < 1:
        raise ValueError("the target weights cannot hold a single image")
    originals = data.x[:count]
    regulariser = attack.regulariser(model, attack.secret(originals))
    train_classifier(model, data, train_config, regulariser=regulariser)
    decoded = attack.decode(model, count, shape)
    figures = LeakFigures(
        attack.name,
        count,
        image_correlation(decoded, originals),
        bit_accuracy(attack.decode_bits(model, count, shape), attack.bits(originals)),
        mean_absolute_error(decoded, attack.quantised(originals)),
    )
    log.info("sign: %s", figures)
    return LeakyModel(model, figures, decoded, originals)


def data_processing_figures(
    attack: DataProcessingAttack, model: nn.Module, originals: torch.Tensor
) -> tuple[LeakFigures, torch.Tensor]:
    """What the attacker recovers from ``model`` by querying, against ``originals``
    (compressed the attacker's way)."""
    shape = (int(originals.shape[1]), int(originals.shape[2]), int(originals.shape[3]))
    recovered = attack.recover(model, shape)
    target = attack.compress(originals)
    labels_right = bit_accuracy(attack.recover_labels(model, shape), attack.labels(originals))
    figures = LeakFigures(
        attack.name,
        int(originals.shape[0]),
        image_correlation(recovered, target),
        labels_right,
        mean_absolute_error(recovered, target),
    )
    return figures, recovered


def train_with_data_processing(
    model: nn.Module,
    data: Dataset,
    train_config: TrainConfig | None = None,
    config: DataProcessingConfig = DataProcessingConfig(),
) -> LeakyModel:
    """Train ``model`` on ``data`` through the malicious augmentation encoding its first
    ``config.num_images`` images."""
    train_config = train_config or TrainConfig()
    attack = DataProcessingAttack(config)
    originals = data.x[: config.num_images]
    malicious = attack.malicious_dataset(originals)
    train_classifier(model, data, train_config, transform=attack.augmentation(malicious))
    figures, recovered = data_processing_figures(attack, model, originals)
    log.info("data-processing: %s", figures)
    return LeakyModel(model, figures, recovered, attack.compress(originals))
