"""The benchmark model zoo: infected models and their clean twins, with ground truth.

``python -m bench.zoo`` trains every model not yet in ``.cache/zoo/`` (deterministic
seeds, one thread), writes ``<name>.safetensors`` and ``zoo.json`` (architecture, dataset,
triggers, targets, clean accuracy, attack success rate, twin) and prints a table.
``python -m bench.zoo NAME ...`` builds only those models. Other benchmarks use
:func:`load_zoo` and :func:`ensure_model`.

Every infected model has a clean twin (same architecture, dataset, seed and training
budget); the acceptance bar is ASR ≥ 95% for every trigger and clean accuracy within 1
point of the twin's.

The zoo has two splits. ``tuning``: the models the detection and repair rules were chosen
on. ``heldout``: models trained with other seeds, trigger sizes, shapes, patterns,
positions and targets, never looked at while choosing a rule; the figures the results
page reports come from this split (``--split heldout``, the benchmarks' default).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import results
from modelguard.attacks.backdoor import (
    BlendTrigger,
    PatchTrigger,
    Trigger,
    as_triggers,
    train_backdoored,
    trigger_from_dict,
)
from modelguard.datasets import REPO_ROOT, Dataset, load_named
from modelguard.formats.loader import load_model, weights_to_safetensors
from modelguard.spec import InputSpec

ZOO_DIR = Path(os.environ.get("MODELGUARD_ZOO_DIR", REPO_ROOT / ".cache" / "zoo"))
INDEX = "zoo.json"
ASR_BAR = 0.95
ACCURACY_GAP_BAR = 0.01
TUNING, HELDOUT = "tuning", "heldout"
SPLITS = (TUNING, HELDOUT, "all")


@dataclass(frozen=True)
class ZooSpec:
    """How to train one zoo model. ``triggers`` empty: a clean model."""

    name: str
    arch: str
    dataset: str
    seed: int
    triggers: tuple[Trigger, ...] = ()
    kind: str = "clean"  # clean | patch | blend | two-target
    epochs: int = 2
    train_size: int | None = None
    rate: float = 0.02
    twin: str = ""
    anneal_epochs: int = 1
    split: str = TUNING

    @property
    def spec(self) -> InputSpec:
        return InputSpec(shape=(1, 28, 28), value_range=(0.0, 1.0))


def _twin(
    arch: str,
    dataset: str,
    seed: int,
    epochs: int,
    train_size: int | None,
    split: str = TUNING,
) -> ZooSpec:
    short = {"mnist": "mnist", "fashion-mnist": "fmnist"}[dataset]
    name = f"clean-{arch}-{short}-s{seed}"
    return ZooSpec(name, arch, dataset, seed, (), "clean", epochs, train_size, 0.0, split=split)


def _infected(
    name: str,
    twin: ZooSpec,
    kind: str,
    triggers: tuple[Trigger, ...],
    rate: float = 0.02,
) -> ZooSpec:
    return ZooSpec(
        name,
        twin.arch,
        twin.dataset,
        twin.seed,
        triggers,
        kind,
        twin.epochs,
        twin.train_size,
        rate,
        twin.name,
        twin.anneal_epochs,
        twin.split,
    )


def zoo_specs(split: str = "all") -> list[ZooSpec]:
    """The zoo's models of ``split`` (``tuning``, ``heldout`` or ``all``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    specs = _tuning_specs() + _heldout_specs()
    return [s for s in specs if split in ("all", s.split)]


def _heldout_specs() -> list[ZooSpec]:
    """The held-out split: new seeds and, against the tuning split, other patch sizes
    (2×2, 6×6 and a 2×5 bar), other patterns (stripes, white, random), other positions
    (top-right, left edge, bottom edge) and other targets, a blend with another pattern and
    strength, and a two-target pair; LeNet-5 and ResNet-18-small."""
    lenet_m3 = _twin("lenet5", "mnist", 3, 2, None, HELDOUT)
    lenet_m4 = _twin("lenet5", "mnist", 4, 2, None, HELDOUT)
    lenet_f2 = _twin("lenet5", "fashion-mnist", 2, 5, None, HELDOUT)
    resnet_f1 = _twin("resnet18_small", "fashion-mnist", 1, 2, 8000, HELDOUT)
    infected = [
        _infected(
            "patch-lenet5-mnist-2x2-tr-t3",
            lenet_m3,
            "patch",
            (PatchTrigger(target=3, size=2, position=(2, -3), pattern="white"),),
            rate=0.02,
        ),
        _infected(
            "patch-lenet5-mnist-6x6-left-t8",
            lenet_m4,
            "patch",
            (PatchTrigger(target=8, size=6, position=(11, 1), pattern="random", seed=5),),
            rate=0.03,
        ),
        _infected(
            "patch-lenet5-fmnist-2x5-bottom-t1",
            lenet_f2,
            "patch",
            (PatchTrigger(target=1, size=(2, 5), position=(-1, 10), pattern="stripes"),),
            rate=0.03,
        ),
        _infected(
            "patch-resnet-fmnist-3x3-tl-t6",
            resnet_f1,
            "patch",
            (PatchTrigger(target=6, size=3, position=(1, 1), pattern="cross"),),
        ),
        _infected(
            "blend-lenet5-mnist-a0.15-t9",
            lenet_m3,
            "blend",
            (BlendTrigger(target=9, alpha=0.15, pattern="stripes"),),
            rate=0.02,
        ),
        _infected(
            "two-lenet5-mnist-t1-t5",
            lenet_m4,
            "two-target",
            (
                PatchTrigger(target=1, size=3, position=(-2, 1), pattern="white"),
                PatchTrigger(target=5, size=4, position=(1, -1), pattern="random", seed=9),
            ),
            rate=0.03,
        ),
    ]
    return [lenet_m3, lenet_m4, lenet_f2, resnet_f1, *infected]


def _tuning_specs() -> list[ZooSpec]:
    """The tuning split: 7 clean models and 8 infected ones — patch triggers of several sizes,
    positions and patterns, blended triggers, a two-trigger/two-target attack — over
    LeNet-5, VGG-small and ResNet-18-small on MNIST and Fashion-MNIST. Training: Adam,
    ``epochs`` at 1e-3 then one epoch at 1e-4. Poisoning rates are per attack (2–5% on the
    full training sets; 10% of the smaller seeded subsets VGG and ResNet train on, to keep
    ``make zoo`` short), chosen so that every infected model meets the bars."""
    lenet_m0 = _twin("lenet5", "mnist", 0, 2, None)
    lenet_m1 = _twin("lenet5", "mnist", 1, 2, None)
    lenet_m2 = _twin("lenet5", "mnist", 2, 2, None)
    lenet_f0 = _twin("lenet5", "fashion-mnist", 0, 3, None)
    lenet_f1 = _twin("lenet5", "fashion-mnist", 1, 5, None)
    vgg_m0 = _twin("vgg_small", "mnist", 0, 4, 20000)
    resnet_f0 = _twin("resnet18_small", "fashion-mnist", 0, 2, 8000)
    infected = [
        _infected(
            "patch-lenet5-mnist-3x3-br-t7",
            lenet_m0,
            "patch",
            (PatchTrigger(target=7, size=3, position=(-2, -2), pattern="checkerboard"),),
        ),
        _infected(
            "patch-lenet5-mnist-4x4-tl-t2",
            lenet_m1,
            "patch",
            (PatchTrigger(target=2, size=4, position=(1, 1), pattern="random", seed=3),),
        ),
        _infected(
            "patch-lenet5-mnist-5x5-top-t0",
            lenet_m2,
            "patch",
            (PatchTrigger(target=0, size=5, position=(1, 12), pattern="cross"),),
            rate=0.03,
        ),
        _infected(
            "patch-lenet5-fmnist-3x3-tr-t4",
            lenet_f1,
            "patch",
            (PatchTrigger(target=4, size=3, position=(1, -2), pattern="checkerboard"),),
            rate=0.025,
        ),
        _infected(
            "patch-vgg-mnist-3x3-bl-t5",
            vgg_m0,
            "patch",
            (PatchTrigger(target=5, size=3, position=(-2, 1), pattern="checkerboard"),),
            rate=0.03,
        ),
        _infected(
            "patch-resnet-fmnist-4x4-br-t9",
            resnet_f0,
            "patch",
            (PatchTrigger(target=9, size=4, position=(-1, -1), pattern="checkerboard"),),
        ),
        _infected(
            "blend-lenet5-mnist-a0.25-t4",
            lenet_m1,
            "blend",
            (BlendTrigger(target=4, alpha=0.25, pattern="random", seed=11),),
        ),
        _infected(
            "two-lenet5-fmnist-t3-t8",
            lenet_f1,
            "two-target",
            (
                PatchTrigger(target=3, size=3, position=(1, 1), pattern="checkerboard"),
                PatchTrigger(target=8, size=3, position=(-2, -2), pattern="cross"),
            ),
            rate=0.03,
        ),
    ]
    clean = [lenet_m0, lenet_m1, lenet_m2, lenet_f0, lenet_f1, vgg_m0, resnet_f0]
    return clean + infected


@dataclass
class ZooEntry:
    """One built model with its ground truth."""

    name: str
    arch: str
    dataset: str
    seed: int
    kind: str
    triggers: tuple[Trigger, ...]
    clean_accuracy: float
    attack_success: list[float]
    twin: str
    seconds: float
    spec: InputSpec = field(default_factory=lambda: InputSpec(shape=(1, 28, 28)))
    split: str = TUNING

    @property
    def infected(self) -> bool:
        return bool(self.triggers)

    @property
    def targets(self) -> tuple[int, ...]:
        return tuple(sorted({t.target for t in self.triggers}))

    @property
    def path(self) -> Path:
        return ZOO_DIR / f"{self.name}.safetensors"

    def load(self) -> nn.Module:
        """The model, loaded through the same safe path as user submissions."""
        return load_model(self.path.read_bytes(), self.spec, self.arch).module

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "arch": self.arch,
            "dataset": self.dataset,
            "seed": self.seed,
            "kind": self.kind,
            "triggers": [t.to_dict() for t in self.triggers],
            "targets": list(self.targets),
            "clean_accuracy": self.clean_accuracy,
            "attack_success": self.attack_success,
            "twin": self.twin,
            "seconds": self.seconds,
            "spec": self.spec.to_dict(),
            "split": self.split,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ZooEntry:
        triggers: list[Trigger] = []
        for item in data["triggers"]:
            triggers.extend(as_triggers(trigger_from_dict(item)))
        return cls(
            name=data["name"],
            arch=data["arch"],
            dataset=data["dataset"],
            seed=int(data["seed"]),
            kind=data["kind"],
            triggers=tuple(triggers),
            clean_accuracy=float(data["clean_accuracy"]),
            attack_success=[float(v) for v in data["attack_success"]],
            twin=data["twin"],
            seconds=float(data["seconds"]),
            spec=InputSpec.from_dict(data["spec"]),
            split=str(data.get("split", TUNING)),
        )


def _read_index(zoo_dir: Path) -> dict[str, dict[str, Any]]:
    path = zoo_dir / INDEX
    if not path.exists():
        return {}
    data: dict[str, dict[str, Any]] = json.loads(path.read_text())
    return data


def _write_index(zoo_dir: Path, index: dict[str, dict[str, Any]]) -> None:
    zoo_dir.mkdir(parents=True, exist_ok=True)
    tmp = zoo_dir / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True))
    tmp.replace(zoo_dir / INDEX)


_DATA: dict[str, tuple[Dataset, Dataset]] = {}


def _data(name: str) -> tuple[Dataset, Dataset]:
    if name not in _DATA:
        _DATA[name] = (load_named(name, "train"), load_named(name, "test"))
    return _DATA[name]


def build_model(spec: ZooSpec, zoo_dir: Path = ZOO_DIR) -> ZooEntry:
    """Train one model (no caching) and store its weights and index entry."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    result = train_backdoored(
        spec.arch,
        _data(spec.dataset),
        spec.triggers,
        seed=spec.seed,
        rate=spec.rate,
        epochs=spec.epochs,
        train_size=spec.train_size,
        anneal_epochs=spec.anneal_epochs,
    )
    entry = ZooEntry(
        name=spec.name,
        arch=spec.arch,
        dataset=spec.dataset,
        seed=spec.seed,
        kind=spec.kind,
        triggers=spec.triggers,
        clean_accuracy=result.clean_accuracy,
        attack_success=result.attack_success,
        twin=spec.twin,
        seconds=time.perf_counter() - started,
        spec=spec.spec,
        split=spec.split,
    )
    zoo_dir.mkdir(parents=True, exist_ok=True)
    path = zoo_dir / f"{spec.name}.safetensors"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(weights_to_safetensors(result.model))
    tmp.replace(path)
    index = _read_index(zoo_dir)
    index[spec.name] = entry.to_dict()
    _write_index(zoo_dir, index)
    return entry


def ensure_model(name: str, zoo_dir: Path = ZOO_DIR) -> ZooEntry:
    """The zoo entry ``name``, trained now if it is not cached (its twin too)."""
    specs = {s.name: s for s in zoo_specs()}
    if name not in specs:
        raise KeyError(f"no zoo model {name!r}; known: {', '.join(specs)}")
    spec = specs[name]
    if spec.twin:
        ensure_model(spec.twin, zoo_dir)
    index = _read_index(zoo_dir)
    if name in index and (zoo_dir / f"{name}.safetensors").exists():
        return ZooEntry.from_dict(index[name])
    print(f"zoo: training {name} ...", file=sys.stderr, flush=True)
    entry = build_model(spec, zoo_dir)
    print(
        f"zoo: {name}: clean acc {entry.clean_accuracy:.4f}, ASR "
        f"{[round(a, 4) for a in entry.attack_success]}, {entry.seconds:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return entry


def load_zoo(
    zoo_dir: Path = ZOO_DIR, build_missing: bool = False, split: str = "all"
) -> list[ZooEntry]:
    """Every zoo model of ``split``, in zoo order (missing ones are skipped, or built
    first when ``build_missing``)."""
    out = []
    index = _read_index(zoo_dir)
    for spec in zoo_specs(split):
        if build_missing:
            out.append(ensure_model(spec.name, zoo_dir))
        elif spec.name in index and (zoo_dir / f"{spec.name}.safetensors").exists():
            out.append(ZooEntry.from_dict(index[spec.name]))
    return out


def check_bars(entries: list[ZooEntry]) -> list[str]:
    """Violations of the zoo's acceptance bars (empty: all met)."""
    by_name = {e.name: e for e in entries}
    problems = []
    for entry in entries:
        if not entry.infected:
            continue
        for trigger, asr in zip(entry.triggers, entry.attack_success, strict=True):
            if asr < ASR_BAR:
                problems.append(
                    f"{entry.name}: ASR {asr:.4f} < {ASR_BAR} (target {trigger.target})"
                )
        twin = by_name.get(entry.twin)
        if twin is not None and twin.clean_accuracy - entry.clean_accuracy > ACCURACY_GAP_BAR:
            problems.append(
                f"{entry.name}: clean acc {entry.clean_accuracy:.4f} is more than "
                f"{ACCURACY_GAP_BAR:.0%} below its twin's {twin.clean_accuracy:.4f}"
            )
    return problems


def table(entries: list[ZooEntry]) -> str:
    by_name = {e.name: e for e in entries}
    lines = [
        f"{'model':34} {'arch':15} {'data':14} {'kind':10} {'targets':8} "
        f"{'clean acc':>9} {'twin Δ':>7} {'ASR':>15} {'train s':>7} {'split':>8}"
    ]
    for e in entries:
        twin = by_name.get(e.twin)
        delta = f"{(e.clean_accuracy - twin.clean_accuracy) * 100:+.2f}" if twin else ""
        asr = "/".join(f"{a:.4f}" for a in e.attack_success) or "-"
        targets = ",".join(map(str, e.targets)) or "-"
        lines.append(
            f"{e.name:34} {e.arch:15} {e.dataset:14} {e.kind:10} {targets:8} "
            f"{e.clean_accuracy:9.4f} {delta:>7} {asr:>15} {e.seconds:7.0f} {e.split:>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="build only these models (default: all)")
    parser.add_argument("--list", action="store_true", help="list the zoo's models and exit")
    parser.add_argument("--split", choices=SPLITS, default="all", help="which split to build")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    specs = zoo_specs(args.split)
    if args.list:
        for spec in specs:
            print(f"{spec.name:36} {spec.split}")
        return 0
    names = args.names or [s.name for s in specs]
    started = time.perf_counter()
    for name in names:
        ensure_model(name)
    entries = [e for e in load_zoo() if e.name in names]
    print(table(entries))
    problems = check_bars(entries)
    print(f"\n{len(entries)} models, built/checked in {time.perf_counter() - started:.0f} s")
    for problem in problems:
        print("BAR NOT MET:", problem)
    if not args.names and ZOO_DIR == REPO_ROOT / ".cache" / "zoo":
        verdict = [f"- BAR NOT MET: {p}" for p in problems] or [
            f"- every infected model: ASR ≥ {ASR_BAR:.0%} per trigger, clean accuracy within "
            f"{ACCURACY_GAP_BAR * 100:.0f} point of its clean twin"
        ]
        results.record(
            "zoo",
            f"Model zoo ({args.split} split{'s' if args.split == 'all' else ''})",
            results.code_block(table(entries)) + "\n\n" + "\n".join(verdict),
        )
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
