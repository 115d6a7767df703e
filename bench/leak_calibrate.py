"""Calibrate the leak detector: ``python -m bench.leak_calibrate``.

Trains (or loads from ``.cache/leakzoo/``) a zoo of small benign and malicious models,
computes their per-layer features and writes the detector's parameters to
``services/leak_detector/core/calibration.json``. The zoo is split: ``calibration``
models fit the detector, ``holdout`` models (other seeds, other strengths, attack
variants the calibration never saw, and architectures it never saw) are only used by
``bench.bench_leak``.

Benign recipes: Adam without regularisation, L1, L2 (weight decay, two strengths), long
training, SGD with momentum, a larger learning rate, small batches, normal/Xavier
initialisation; LeNet-5, VGG-small, ResNet-18-small and an MLP, on MNIST and
Fashion-MNIST. Malicious: correlated value encoding and sign encoding (Song et al., CCS
2017) at several strengths, into the largest layer, two layers, or every layer.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from modelguard.attacks import leak
from modelguard.datasets import Dataset, load_fashion_mnist, load_mnist
from modelguard.leak.calibration import CALIBRATION_PATH, Calibration, fit_calibration
from modelguard.leak.features import LayerStats, layer_statistics
from modelguard.nn.architectures import build
from modelguard.nn.training import TrainConfig, accuracy, train_classifier

log = logging.getLogger("bench.leak_calibrate")

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache" / "leakzoo"
TEST_SIZE = 2000


# --------------------------------------------------------------------------------------
# Bench-only architectures (never used for calibration: "a model the detector was not
# calibrated on must not be flagged just for being different")
# --------------------------------------------------------------------------------------


class MLP(nn.Module):
    """LeNet-300-100 style MLP. Its first layer is legitimately image-like."""

    def __init__(self, hidden: tuple[int, ...] = (300, 100), num_classes: int = 10) -> None:
        super().__init__()
        sizes = (784, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.out = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)  # type: ignore[no-any-return]


class BigCNN(nn.Module):
    """A wider CNN (3.3 M weights, 6272×512 first FC layer) than anything calibrated."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1 = nn.Linear(128 * 7 * 7, 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)  # type: ignore[no-any-return]


EXTRA_ARCHS: dict[str, Callable[[], nn.Module]] = {
    "mlp": lambda: MLP((300, 100)),
    "mlp_wide": lambda: MLP((1000, 500)),
    "mlp_deep": lambda: MLP((512, 256, 128)),
    "cnn_big": BigCNN,
}


def build_arch(name: str) -> nn.Module:
    if name in EXTRA_ARCHS:
        return EXTRA_ARCHS[name]()
    return build(name)


# --------------------------------------------------------------------------------------
# Zoo
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooSpec:
    """One model of the zoo: architecture, data, training recipe and (maybe) attack."""

    name: str
    arch: str
    dataset: str
    split: str  # calibration | holdout | defence
    train_size: int = 10_000
    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    l1: float = 0.0
    weight_decay: float = 0.0
    optimiser: str = "adam"  # adam | sgd
    init: str = "default"  # default | normal | xavier
    seed: int = 0
    attack: str = ""  # "" | cve | sign | data-processing
    strength: float = 0.0
    layers: tuple[str, ...] = ()
    polarity: int = 1
    permutation_key: int | None = None
    absolute: bool = False
    bits: int = 8
    dp_images: int = 2

    @property
    def malicious(self) -> bool:
        return self.attack in ("cve", "sign")

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class ZooModel:
    spec: ZooSpec
    module: nn.Module
    accuracy: float
    figures: dict[str, Any] | None
    train_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def works(self) -> bool:
        return bool(self.figures and self.figures.get("works"))


_DATA: dict[tuple[str, str], Dataset] = {}


def dataset(name: str, split: str) -> Dataset:
    key = (name, split)
    if key not in _DATA:
        _DATA[key] = load_mnist(split) if name == "mnist" else load_fashion_mnist(split)
    return _DATA[key]


def test_set(name: str) -> Dataset:
    return dataset(name, "test").subset(TEST_SIZE, seed=99)


def _initialise(module: nn.Module, how: str, seed: int) -> None:
    if how == "default":
        return
    torch.manual_seed(seed)
    for sub in module.modules():
        if isinstance(sub, nn.Linear | nn.Conv2d):
            if how == "normal":
                nn.init.normal_(sub.weight, std=1.0 / math.sqrt(sub.weight[0].numel()))
            elif how == "xavier":
                nn.init.xavier_normal_(sub.weight)
            else:
                raise ValueError(f"unknown init {how!r}")


def _train_sgd(module: nn.Module, data: Dataset, spec: ZooSpec) -> None:
    """SGD with momentum (train_classifier is Adam only)."""
    generator = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    optimiser = torch.optim.SGD(
        module.parameters(), lr=spec.lr, momentum=0.9, weight_decay=spec.weight_decay
    )
    module.train()
    for _ in range(spec.epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), spec.batch_size):
            index = order[start : start + spec.batch_size]
            loss = F.cross_entropy(module(data.x[index]), data.y[index])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    module.eval()


def train_spec(spec: ZooSpec) -> ZooModel:
    data = dataset(spec.dataset, "train").subset(spec.train_size, seed=spec.seed + 7)
    torch.manual_seed(spec.seed)
    module = build_arch(spec.arch)
    _initialise(module, spec.init, spec.seed)
    config = TrainConfig(
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        lr=spec.lr,
        weight_decay=spec.weight_decay,
        l1=spec.l1,
        seed=spec.seed,
    )
    figures: dict[str, Any] | None = None
    start = time.perf_counter()
    if spec.attack == "":
        if spec.optimiser == "sgd":
            _train_sgd(module, data, spec)
        else:
            train_classifier(module, data, config)
    elif spec.attack == "cve":
        cve = leak.CorrelatedValueConfig(
            strength=spec.strength,
            layers=spec.layers,
            polarity=spec.polarity,
            permutation_key=spec.permutation_key,
            absolute=spec.absolute,
        )
        figures = leak.train_with_cve(module, data, config, cve).figures.to_dict()
    elif spec.attack == "sign":
        sign = leak.SignEncodingConfig(
            strength=spec.strength,
            layers=spec.layers,
            polarity=spec.polarity,
            permutation_key=spec.permutation_key,
            bits_per_pixel=spec.bits,
        )
        figures = leak.train_with_sign_encoding(module, data, config, sign).figures.to_dict()
    elif spec.attack == "data-processing":
        dp = leak.DataProcessingConfig(num_images=spec.dp_images)
        figures = leak.train_with_data_processing(module, data, config, dp).figures.to_dict()
    else:
        raise ValueError(f"unknown attack {spec.attack!r}")
    seconds = time.perf_counter() - start
    return ZooModel(spec, module, accuracy(module, test_set(spec.dataset)), figures, seconds)


def load_or_train(spec: ZooSpec, cache_dir: Path = CACHE_DIR) -> ZooModel:
    """A zoo model from the cache, or trained now and cached."""
    stem = cache_dir / f"{spec.name}-{spec.digest()}"
    weights, record = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if weights.exists() and record.exists():
        meta = json.loads(record.read_text())
        module = build_arch(spec.arch)
        module.load_state_dict(load_file(str(weights)))
        module.eval()
        return ZooModel(
            spec,
            module,
            meta["accuracy"],
            meta["figures"],
            meta["train_seconds"],
            meta.get("extra", {}),
        )
    model = train_spec(spec)
    cache_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.module.state_dict().items()}
    save_file(state, str(weights))
    record.write_text(
        json.dumps(
            {
                "spec": asdict(spec),
                "accuracy": model.accuracy,
                "figures": model.figures,
                "train_seconds": model.train_seconds,
                "extra": model.extra,
            },
            indent=1,
        )
    )
    log.info(
        "trained %s in %.1fs: accuracy %.3f %s",
        spec.name,
        model.train_seconds,
        model.accuracy,
        model.figures or "",
    )
    return model


def _benign(split: str, seed: int) -> list[ZooSpec]:
    specs: list[ZooSpec] = []
    recipes: list[tuple[str, dict[str, Any]]] = [
        ("plain", {}),
        ("l1", {"l1": 1e-5}),
        ("l1strong", {"l1": 1e-4}),
        ("l2", {"weight_decay": 1e-4}),
        ("l2strong", {"weight_decay": 1e-3}),
        ("long", {"train_size": 20_000, "epochs": 5}),
        ("sgd", {"optimiser": "sgd", "lr": 0.05}),
        ("lr3", {"lr": 3e-3}),
        ("batch32", {"batch_size": 32, "epochs": 1}),
        ("normal", {"init": "normal"}),
        ("xavier", {"init": "xavier", "l1": 1e-5}),
    ]
    for ds in ("mnist", "fashion"):
        d = "m" if ds == "mnist" else "f"
        for recipe, kw in recipes:
            specs.append(
                ZooSpec(
                    f"{split[:3]}-b-lenet5-{d}-{recipe}-s{seed}",
                    "lenet5",
                    ds,
                    split,
                    seed=seed,
                    **kw,
                )
            )
        vgg = {"train_size": 4000, "epochs": 1}
        for recipe, kw in (
            ("plain", {}),
            ("l2", {"weight_decay": 1e-4}),
            ("batch32", {"batch_size": 32}),
        ):
            specs.append(
                ZooSpec(
                    f"{split[:3]}-b-vgg-{d}-{recipe}-s{seed}",
                    "vgg_small",
                    ds,
                    split,
                    seed=seed,
                    **{**vgg, **kw},
                )
            )
        res = {"train_size": 3000, "epochs": 1, "batch_size": 32}
        for recipe, kw in (
            ("plain", {}),
            ("l1", {"l1": 1e-5}),
            ("sgd", {"optimiser": "sgd", "lr": 0.05}),
        ):
            specs.append(
                ZooSpec(
                    f"{split[:3]}-b-res-{d}-{recipe}-s{seed}",
                    "resnet18_small",
                    ds,
                    split,
                    seed=seed,
                    **{**res, **kw},
                )
            )
    return specs


def zoo_specs() -> list[ZooSpec]:
    """The whole zoo: calibration, hold-out and pruning-defence models."""
    specs: list[ZooSpec] = []
    # ---------------- calibration: benign
    specs += _benign("calibration", 0)
    for seed in (1, 2):  # the recipes whose statistics vary most between seeds
        specs += [
            s
            for s in _benign("calibration", seed)
            if "lenet5" in s.name
            and any(f"-{r}-" in s.name for r in ("plain", "l1strong", "l2strong", "sgd", "lr3"))
        ]
    for ds, d in (("mnist", "m"), ("fashion", "f")):
        specs.append(
            ZooSpec(f"cal-b-mlp-{d}-plain", "mlp", ds, "calibration", train_size=20_000, epochs=3)
        )
        specs.append(
            ZooSpec(
                f"cal-b-mlp-{d}-long",
                "mlp",
                ds,
                "calibration",
                train_size=20_000,
                epochs=8,
                weight_decay=1e-4,
            )
        )
    # ---------------- calibration: malicious
    lenet_layers = {"fc1": ("fc1",), "fc12": ("fc1", "fc2"), "all": ()}
    for ds, d in (("mnist", "m"), ("fashion", "f")):
        for key, layers in lenet_layers.items():
            for strength in (0.3, 1.0):
                specs.append(
                    ZooSpec(
                        f"cal-cve-lenet5-{d}-{key}-{strength:g}",
                        "lenet5",
                        ds,
                        "calibration",
                        attack="cve",
                        strength=strength,
                        layers=layers,
                    )
                )
            for strength in (50.0, 200.0, 1000.0):
                specs.append(
                    ZooSpec(
                        f"cal-sign-lenet5-{d}-{key}-{strength:g}",
                        "lenet5",
                        ds,
                        "calibration",
                        attack="sign",
                        strength=strength,
                        layers=layers,
                    )
                )
        specs.append(
            ZooSpec(
                f"cal-cve-vgg-{d}-fc1-1",
                "vgg_small",
                ds,
                "calibration",
                train_size=4000,
                epochs=1,
                attack="cve",
                strength=1.0,
                layers=("fc1",),
            )
        )
        specs.append(
            ZooSpec(
                f"cal-sign-vgg-{d}-fc1-200",
                "vgg_small",
                ds,
                "calibration",
                train_size=4000,
                epochs=1,
                attack="sign",
                strength=200.0,
                layers=("fc1",),
            )
        )
        specs.append(
            ZooSpec(
                f"cal-cve-res-{d}-l4-1",
                "resnet18_small",
                ds,
                "calibration",
                train_size=3000,
                epochs=2,
                batch_size=32,
                attack="cve",
                strength=1.0,
                layers=("layer4.1.conv2",),
            )
        )
        specs.append(
            ZooSpec(
                f"cal-sign-res-{d}-all-500",
                "resnet18_small",
                ds,
                "calibration",
                train_size=3000,
                epochs=2,
                batch_size=32,
                attack="sign",
                strength=500.0,
            )
        )
        specs.append(
            ZooSpec(
                f"cal-cve-mlp-{d}-h1-1",
                "mlp",
                ds,
                "calibration",
                train_size=20_000,
                epochs=3,
                attack="cve",
                strength=1.0,
                layers=("hidden.0",),
            )
        )
    # ---------------- hold-out: benign (other seeds; unseen architectures)
    specs += [
        s
        for s in _benign("holdout", 11)
        if "lenet5" in s.name or s.name.endswith(("plain-s11", "l1-s11"))
    ]
    for ds, d in (("mnist", "m"), ("fashion", "f")):
        specs.append(
            ZooSpec(
                f"hol-b-mlpwide-{d}",
                "mlp_wide",
                ds,
                "holdout",
                train_size=20_000,
                epochs=2,
                seed=11,
            )
        )
        specs.append(
            ZooSpec(
                f"hol-b-mlpdeep-{d}",
                "mlp_deep",
                ds,
                "holdout",
                train_size=20_000,
                epochs=4,
                seed=11,
                weight_decay=1e-4,
            )
        )
        specs.append(
            ZooSpec(
                f"hol-b-cnnbig-{d}", "cnn_big", ds, "holdout", train_size=4000, epochs=1, seed=11
            )
        )
        specs.append(
            ZooSpec(
                f"hol-b-res-{d}-e2-s11",
                "resnet18_small",
                ds,
                "holdout",
                train_size=3000,
                epochs=2,
                batch_size=32,
                seed=11,
            )
        )
    # ---------------- hold-out: malicious (other seeds, strengths and unseen variants)
    for ds, d in (("mnist", "m"), ("fashion", "f")):
        h = {"split": "holdout", "seed": 11}
        specs += [
            ZooSpec(
                f"hol-cve-lenet5-{d}-fc1-0.5",
                "lenet5",
                ds,
                attack="cve",
                strength=0.5,
                layers=("fc1",),
                **h,
            ),
            ZooSpec(f"hol-cve-lenet5-{d}-all-0.6", "lenet5", ds, attack="cve", strength=0.6, **h),
            ZooSpec(
                f"hol-cve-lenet5-{d}-fc1-neg",
                "lenet5",
                ds,
                attack="cve",
                strength=1.0,
                layers=("fc1",),
                polarity=-1,
                **h,
            ),
            ZooSpec(
                f"hol-cve-lenet5-{d}-fc1-abs",
                "lenet5",
                ds,
                attack="cve",
                strength=1.0,
                layers=("fc1",),
                absolute=True,
                **h,
            ),
            ZooSpec(
                f"hol-cve-lenet5-{d}-fc1-perm",
                "lenet5",
                ds,
                attack="cve",
                strength=2.0,
                layers=("fc1",),
                permutation_key=5,
                **h,
            ),
            ZooSpec(
                f"hol-cve-lenet5-{d}-fc2-2",
                "lenet5",
                ds,
                attack="cve",
                strength=2.0,
                layers=("fc2",),
                **h,
            ),
            ZooSpec(
                f"hol-sign-lenet5-{d}-fc1-100",
                "lenet5",
                ds,
                attack="sign",
                strength=100.0,
                layers=("fc1",),
                **h,
            ),
            ZooSpec(
                f"hol-sign-lenet5-{d}-all-300", "lenet5", ds, attack="sign", strength=300.0, **h
            ),
            ZooSpec(
                f"hol-sign-lenet5-{d}-fc1-neg",
                "lenet5",
                ds,
                attack="sign",
                strength=500.0,
                layers=("fc1",),
                polarity=-1,
                **h,
            ),
            ZooSpec(
                f"hol-sign-lenet5-{d}-fc1-perm",
                "lenet5",
                ds,
                attack="sign",
                strength=500.0,
                layers=("fc1",),
                permutation_key=5,
                **h,
            ),
            ZooSpec(
                f"hol-sign-lenet5-{d}-fc1-4bit",
                "lenet5",
                ds,
                attack="sign",
                strength=500.0,
                layers=("fc1",),
                bits=4,
                **h,
            ),
            ZooSpec(
                f"hol-cve-vgg-{d}-fc1-0.5",
                "vgg_small",
                ds,
                train_size=4000,
                epochs=1,
                attack="cve",
                strength=0.5,
                layers=("fc1",),
                **h,
            ),
            ZooSpec(
                f"hol-sign-vgg-{d}-fc1-1000",
                "vgg_small",
                ds,
                train_size=4000,
                epochs=1,
                attack="sign",
                strength=1000.0,
                layers=("fc1",),
                **h,
            ),
            ZooSpec(
                f"hol-cve-res-{d}-l4-2",
                "resnet18_small",
                ds,
                train_size=3000,
                epochs=2,
                batch_size=32,
                attack="cve",
                strength=2.0,
                layers=("layer4.0.conv2", "layer4.1.conv1"),
                **h,
            ),
            ZooSpec(
                f"hol-sign-res-{d}-l4-500",
                "resnet18_small",
                ds,
                train_size=3000,
                epochs=2,
                batch_size=32,
                attack="sign",
                strength=500.0,
                layers=("layer4.1.conv1", "layer4.1.conv2"),
                **h,
            ),
            ZooSpec(
                f"hol-cve-mlpwide-{d}-h1-1",
                "mlp_wide",
                ds,
                train_size=20_000,
                epochs=2,
                attack="cve",
                strength=1.0,
                layers=("hidden.0",),
                **h,
            ),
            ZooSpec(
                f"hol-sign-cnnbig-{d}-fc1-500",
                "cnn_big",
                ds,
                train_size=4000,
                epochs=1,
                attack="sign",
                strength=500.0,
                layers=("fc1",),
                **h,
            ),
        ]
    # ---------------- data-processing-stage attack (pruning defence; not a parameter attack)
    # and the attack toolkit's figures: every attack with the benign model's recipe (LeNet-5,
    # 10k images, 4 epochs, seed 0), so the accuracy cost is measured like for like
    for ds, d in (("mnist", "m"), ("fashion", "f")):
        specs.append(
            ZooSpec(
                f"def-dp-lenet5-{d}", "lenet5", ds, "defence", epochs=4, attack="data-processing"
            )
        )
        specs.append(ZooSpec(f"def-b-lenet5-{d}", "lenet5", ds, "defence", epochs=4))
        specs.append(
            ZooSpec(
                f"def-cve-lenet5-{d}",
                "lenet5",
                ds,
                "defence",
                epochs=4,
                attack="cve",
                strength=1.0,
                layers=("fc1",),
            )
        )
        specs.append(
            ZooSpec(
                f"def-cveabs-lenet5-{d}",
                "lenet5",
                ds,
                "defence",
                epochs=4,
                attack="cve",
                strength=1.0,
                layers=("fc1",),
                absolute=True,
            )
        )
        specs.append(
            ZooSpec(
                f"def-sign-lenet5-{d}",
                "lenet5",
                ds,
                "defence",
                epochs=4,
                attack="sign",
                strength=200.0,
                layers=("fc1",),
            )
        )
        specs.append(
            ZooSpec(
                f"def-signall-lenet5-{d}",
                "lenet5",
                ds,
                "defence",
                epochs=4,
                attack="sign",
                strength=50.0,
            )
        )
    return specs


def select(specs: Iterable[ZooSpec], split: str) -> list[ZooSpec]:
    return [s for s in specs if s.split == split]


# --------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------


def features_of(models: Iterable[ZooModel]) -> list[tuple[ZooModel, list[LayerStats]]]:
    return [(m, layer_statistics(m.module)) for m in models]


def real_scale_tuning_models() -> list[tuple[str, nn.Module, bool]]:
    """The real-scale zoo's tuning models that calibrate the detector, as ``(name, module,
    malicious)``: the published EfficientNet-Lite0 (depthwise and pointwise layers no
    small zoo model has), Lite0 fine-tuned (benign, and backdoored: fine-tuning moves the
    head's weights, and neither carries data) and its leak-encoded version. The held-out
    models (other published variants, fine-tunes, layers and encodings) are only reported
    on."""
    from bench import realzoo

    out = []
    for spec in realzoo.select(split=realzoo.TUNING):
        model = realzoo.build(spec)
        out.append((spec.name, model.load(), spec.leak))
    return out


def calibrate(
    models: list[ZooModel], real: list[tuple[str, nn.Module, bool]] | None = None
) -> Calibration:
    """Fit on benign models and on malicious ones whose encoding works (an encoding that
    does not leak need not be flagged and would only blur the threshold); ``real`` adds
    real-scale ``(name, module, malicious)`` models."""
    real = real or []
    benign = [layer_statistics(m.module) for m in models if not m.spec.malicious]
    malicious = [layer_statistics(m.module) for m in models if m.spec.malicious and m.works]
    benign += [layer_statistics(module) for _, module, bad in real if not bad]
    malicious += [layer_statistics(module) for _, module, bad in real if bad]
    digest = hashlib.sha256(
        "".join(sorted(m.spec.digest() for m in models) + [name for name, _, _ in real]).encode()
    )
    provenance = {
        "generated_by": "python -m bench.leak_calibrate",
        "zoo_digest": digest.hexdigest()[:16],
        "architectures": sorted({m.spec.arch for m in models}),
        "benign_recipes": sorted(
            {
                m.spec.name.split("-")[4]
                for m in models
                if not m.spec.malicious and m.spec.arch != "mlp"
            }
            | {"mlp"}
        ),
        "attacks": sorted({m.spec.attack for m in models if m.spec.malicious}),
        "real_scale_models": [name for name, _, _ in real],
    }
    return fit_calibration(benign, malicious, provenance=provenance)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=CALIBRATION_PATH, help="where to write the JSON"
    )
    parser.add_argument("--train-only", action="store_true", help="fill the cache, do not fit")
    parser.add_argument(
        "--split", default="calibration", help="train/load only this split (or 'all')"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    specs = zoo_specs() if args.split == "all" else select(zoo_specs(), args.split)
    models = [load_or_train(spec) for spec in specs]
    if args.train_only:
        return 0
    calibration_models = [m for m in models if m.spec.split == "calibration"]
    calibration = calibrate(calibration_models, real_scale_tuning_models())
    args.out.write_text(json.dumps(calibration.to_dict(), indent=1) + "\n")
    print(f"wrote {args.out} from {len(calibration_models)} models")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["ZooModel", "ZooSpec", "calibrate", "load_or_train", "main", "zoo_specs"]
