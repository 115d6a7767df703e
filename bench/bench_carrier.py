"""Carrier benchmark (adversarial reprogramming): mapped accuracy, the stealing experiment
with rotation, and automatic rotation by the extraction detector.

``python -m bench.bench_carrier`` (one thread; part of ``make bench``):

1. **Quality.** The project's LeNet-5 trained on Fashion-MNIST (cached) carries MNIST.
   ``--public-model`` (default ``lenet5-fashion-features``, carrier-trainer's default:
   the frozen LeNet-5's fc1/fc2 activations + logits, 214 scores): a carrier for user
   ``victim`` (generation 0), its rotation (generation 1) and a rotation-aware rotation,
   mapped accuracy on the 10,000 MNIST test images, the public model's own Fashion-MNIST
   accuracy before and after (it is frozen), and the same mapper trained on the
   *untrained* carrier (``p = 0``, what the carrier itself adds). ``--baseline``
   (default ``lenet5-fashion``, 10 logits): generation 0 only, for comparison.
2. **Stealing (the reference experiment).** An attacker holding the public model, the
carrier and the
   credential sends 200 rounds × 50 queries through the real `MapperRegistry` and trains a
   substitute mapper; its MNIST accuracy is measured every 10 rounds through the stolen
   carrier and through the rotated one. Plot: ``bench/out/carrier_stealing.png``.
3. **Automatic rotation.** The same registry with an `ExtractionDetector` that rotates on
   alarm, against four attackers (fast and slow with task data, a surrogate-data attacker
   using Fashion-MNIST, a noise prober) and 50 simulated legitimate users over a week.
4. **Quality, efficientnet-lite0** within ``--efficientnet-budget`` seconds of training
   (mapper warm start on cached pseudo-outputs, then joint ``(p, w)`` steps), evaluated
   on ``--efficientnet-test`` MNIST test images. ``--skip-efficientnet`` leaves it out.

Writes ``bench/out/carrier.json`` and each model's generation-0 mapper/carrier to
``.cache/carrier-bench/`` (the serving benchmark serves the lenet5-fashion one).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import results
from modelguard.carrier.carrier import (
    Carrier,
    CarrierConfig,
    CarrierResult,
    carrier_to_safetensors,
    mapped_accuracy,
    mapper_to_safetensors,
    pseudo_outputs,
    train_carrier,
)
from modelguard.carrier.extraction import Alarm, DetectorConfig, ExtractionDetector
from modelguard.carrier.mapper_registry import MapperRegistry, hash_credential, new_credential
from modelguard.carrier.natural_images import natural_image_for_user, user_image_index
from modelguard.carrier.public_models import PublicModel, load_public_model
from modelguard.carrier.query_profile import QueryProfile
from modelguard.carrier.stealing import (
    StealingConfig,
    StealingResult,
    replay_traffic,
    simulate_stealing,
)
from modelguard.config import CarrierTrainerSettings
from modelguard.datasets import REPO_ROOT, Dataset, load_fashion_mnist, load_mnist
from modelguard.errors import ModelGuardError
from modelguard.nn.training import accuracy
from modelguard.services.carrier_trainer.service import carrier_config

log = logging.getLogger("bench.carrier")

OUT_DIR = REPO_ROOT / "bench" / "out"
CACHE_DIR = REPO_ROOT / ".cache" / "carrier-bench"
LENET_CONFIG = CarrierConfig(
    hidden=256,
    input_fraction=0.6,
    lr_perturbation=0.05,
    lr_mapper=2e-3,
    max_steps=8000,
    eval_every=250,
    patience=8,
    validation_samples=2000,
    gamma=1e-4,
)
#: lenet5-fashion-features: measured (see the module docstring of `carrier`) to need a
#: decaying rate to settle; converges within the step budget.
FEATURES_CONFIG = replace(
    LENET_CONFIG, max_steps=6000, lr_schedule="cosine", eval_every=500, patience=100
)
CONFIGS = {"lenet5-fashion": LENET_CONFIG, "lenet5-fashion-features": FEATURES_CONFIG}
ROTATION_WEIGHT = 1.0
EFFICIENTNET_CONFIG = CarrierConfig(
    hidden=256,
    input_fraction=0.75,
    lr_perturbation=0.005,
    lr_mapper=1e-3,
    max_steps=100_000,
    eval_every=6,
    patience=1000,
    validation_samples=256,
    mapper_warmup_samples=2000,
    mapper_warmup_epochs=30,
    gamma=1e-4,
)


def _progress(label: str) -> Any:
    last = [0.0]

    def report(fraction: float) -> None:
        if fraction - last[0] >= 0.1 or fraction >= 1.0:
            last[0] = fraction
            log.info("%s: %3.0f%%", label, 100 * fraction)

    return report


# ---------------------------------------------------------------------------------- quality


class _OwnLogits(torch.nn.Module):
    """The public model's own-task logits: its last 10 scores (all of them for
    lenet5-fashion)."""

    def __init__(self, public: PublicModel) -> None:
        super().__init__()
        self.module = public.module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)[:, -10:]  # type: ignore[no-any-return]


def lenet_quality(
    public: PublicModel,
    train: Dataset,
    test: Dataset,
    config: CarrierConfig,
    generations: tuple[int, ...] = (0, 1),
    cache: bool = True,
) -> dict[str, Any]:
    fashion_test = load_fashion_mnist("test")
    own_before = accuracy(_OwnLogits(public), fashion_test)
    results: dict[int, CarrierResult] = {}
    for generation in generations:
        natural = natural_image_for_user("victim", generation, public.input_shape)
        results[generation] = train_carrier(
            replace(config, seed=generation),
            public,
            train,
            natural,
            _progress(f"{public.name} carrier victim/{generation}"),
            test_data=test,
        )
        log.info("victim/%d: %s", generation, results[generation].manifest())
    # what the carrier adds: the same mapper and steps with p frozen at 0 (a learning rate
    # of 1e-12 leaves tanh(p) ~ 0)
    frozen = train_carrier(
        replace(config, seed=0, lr_perturbation=1e-12),
        public,
        train,
        natural_image_for_user("victim", 0, public.input_shape),
        _progress(f"{public.name} untrained carrier (p = 0)"),
        test_data=test,
    )
    log.info("victim/0 with p = 0: %s", frozen.manifest())
    own_after = accuracy(_OwnLogits(public), fashion_test)
    if cache:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        (CACHE_DIR / f"mapper-{public.name}.safetensors").write_bytes(
            mapper_to_safetensors(results[0].mapper)
        )
        (CACHE_DIR / f"carrier-{public.name}.safetensors").write_bytes(
            carrier_to_safetensors(results[0].carrier, results[0].placement, public)
        )
    report: dict[str, Any] = {
        "public_model": public.name,
        "public_model_description": public.description,
        "output_dim": public.output_dim,
        "public_model_own_task": public.own_task,
        "public_model_own_accuracy_cached": public.own_accuracy,
        "public_model_own_accuracy_before": own_before,
        "public_model_own_accuracy_after": own_after,
        "config": asdict(config),
        "carriers": {
            str(g): {
                **r.manifest(),
                "natural_image_index": user_image_index("victim", g),
                "history": [asdict(p) for p in r.history],
            }
            for g, r in results.items()
        },
        "untrained_carrier_p0": {
            **frozen.manifest(),
            "history": [asdict(p) for p in frozen.history],
        },
        "_results": results,
    }
    if 1 not in results:
        return report
    # beyond the reference method: generation 1 trained so that generation 0's mapper
    # cannot read it
    aware = train_carrier(
        replace(config, seed=1, rotation_weight=ROTATION_WEIGHT),
        public,
        train,
        natural_image_for_user("victim", 1, public.input_shape),
        _progress(f"{public.name} carrier victim/1 (rotation-aware)"),
        test_data=test,
        previous_mappers=[results[0].mapper],
    )
    log.info("victim/1 rotation-aware: %s", aware.manifest())
    report["rotation_aware_generation_1"] = {
        **aware.manifest(),
        "rotation_weight": ROTATION_WEIGHT,
        "old_mapper_accuracy_on_it": mapped_accuracy(
            public, results[0].mapper, aware.carrier, aware.placement, test
        ),
        "old_mapper_accuracy_on_plain_rotation": mapped_accuracy(
            public, results[0].mapper, results[1].carrier, results[1].placement, test
        ),
    }
    report["_aware"] = aware
    return report


def efficientnet_quality(
    train: Dataset, test: Dataset, budget_s: float, test_count: int
) -> dict[str, Any]:
    public = load_public_model("efficientnet-lite0")
    natural = natural_image_for_user("victim", 0, public.input_shape)
    config = replace(EFFICIENTNET_CONFIG, time_budget_s=budget_s)
    test_subset = test.subset(test_count, seed=0)
    started = time.monotonic()
    result = train_carrier(
        config,
        public,
        train.subset(20_000, seed=1),
        natural,
        _progress("efficientnet-lite0"),
        test_data=test_subset,
    )
    total = time.monotonic() - started
    return {
        "public_model": public.name,
        "description": public.description,
        **result.manifest(),
        "test_images": test_count,
        "wall_seconds_total": round(total, 1),
        "history": [asdict(p) for p in result.history],
    }


# --------------------------------------------------------------------------------- stealing


class Service:
    """The registry as the attacker meets it, plus rotation (what the lead's wiring does on
    an alarm: publish CarrierRequested for the next generation, revoke the old one)."""

    def __init__(self, carriers: dict[int, CarrierResult], detector: DetectorConfig | None) -> None:
        self.clock = 0.0
        self.carriers = carriers
        self.credentials: dict[tuple[str, int], str] = {}
        self.rotations: list[Alarm] = []
        self.registry = MapperRegistry(clock=lambda: self.clock)
        if detector is not None:
            self.detector: ExtractionDetector | None = ExtractionDetector(
                detector, profiles=self.profile, on_alarm=self.rotate
            )
            self.registry.observer = self.detector
        else:
            self.detector = None

    def profile(self, user: str, generation: int) -> QueryProfile:
        return self.carriers[generation].query_profile

    def install(self, user: str, generation: int) -> str:
        credential = new_credential()
        self.credentials[(user, generation)] = credential
        weights = mapper_to_safetensors(self.carriers[generation].mapper)
        self.registry.hot_load(user, generation, weights, hash_credential(credential))
        return credential

    def rotate(self, alarm: Alarm) -> None:
        self.rotations.append(alarm)
        self.registry.revoke(alarm.user_id, alarm.generation)
        if alarm.generation + 1 in self.carriers:
            self.install(alarm.user_id, alarm.generation + 1)


def steal(
    public: PublicModel,
    service: Service,
    user: str,
    attacker_x: torch.Tensor,
    test: Dataset,
    config: StealingConfig,
    seconds_per_round: float,
    extra: dict[str, Carrier] | None = None,
) -> StealingResult:
    credential = service.credentials[(user, 0)]
    stolen = Carrier.from_result(service.carriers[0])

    def oracle(z: np.ndarray) -> np.ndarray:
        result = service.registry.map(user, credential, z.astype("<f4").tobytes(), len(z))
        return result.labels

    def tick(_: int) -> None:
        service.clock += seconds_per_round

    carriers = {"stolen": stolen, "rotated": Carrier.from_result(service.carriers[1])}
    carriers.update(extra or {})
    return simulate_stealing(
        config, public, stolen, attacker_x, oracle, test, carriers, classes=10, before_round=tick
    )


def stealing_experiment(
    public: PublicModel,
    carriers: dict[int, CarrierResult],
    aware: CarrierResult,
    train: Dataset,
    test: Dataset,
    rounds: int,
) -> dict[str, Any]:
    service = Service(carriers, detector=None)
    service.install("victim", 0)
    attacker_x = train.subset(len(train), seed=99).x
    started = time.monotonic()
    result = steal(
        public,
        service,
        "victim",
        attacker_x,
        test,
        StealingConfig(rounds=rounds, queries_per_round=50, hidden=256),
        60.0,
        extra={"rotated (rotation-aware)": Carrier.from_result(aware)},
    )
    # the reference method's rotation: the carrier is replaced, the old one is revoked at once
    service.rotate(
        Alarm("victim", 0, "manual", "seed experiment rotation", result.queries, service.clock)
    )
    old_credential = service.credentials[("victim", 0)]
    try:
        zeros = np.zeros((1, public.output_dim), "<f4").tobytes()
        service.registry.map("victim", old_credential, zeros, 1)
        after = "answered (BUG)"
    except ModelGuardError as err:
        after = f"{type(err).__name__}: {err}"
    final = result.curve[-1]
    return {
        "queries": result.queries,
        "curve": [{"queries": p.queries, **p.accuracy} for p in result.curve],
        "substitute_accuracy_stolen_carrier": final.accuracy["stolen"],
        "substitute_accuracy_after_rotation": final.accuracy["rotated"],
        "substitute_accuracy_after_rotation_aware": final.accuracy["rotated (rotation-aware)"],
        "old_credential_after_rotation": after,
        "usage_rows": service.registry.usage("victim").rows,
        "seconds": round(time.monotonic() - started, 1),
    }


def auto_rotation(
    public: PublicModel,
    carriers: dict[int, CarrierResult],
    train: Dataset,
    test: Dataset,
    detector: DetectorConfig,
) -> dict[str, Any]:
    fashion = load_fashion_mnist("train").subset(10_000, seed=5)
    generator = torch.Generator().manual_seed(6)
    attackers = {
        # name: (inputs, seconds between rounds of 50 queries)
        "fast, task data (MNIST)": (train.subset(10_000, seed=7).x, 1.0),
        "slow, task data (MNIST; 300 queries/h)": (train.subset(10_000, seed=8).x, 600.0),
        "slow, surrogate data (Fashion-MNIST)": (fashion.x, 600.0),
        "slow, uniform-noise prober": (torch.rand(10_000, 1, 28, 28, generator=generator), 600.0),
    }
    scenarios: dict[str, Any] = {}
    for name, (inputs, pace) in attackers.items():
        service = Service(carriers, detector)
        service.install("victim", 0)
        result = steal(
            public,
            service,
            "victim",
            inputs,
            test,
            StealingConfig(rounds=200, queries_per_round=50, hidden=256, eval_every=5),
            pace,
        )
        alarm = service.rotations[0] if service.rotations else None
        scenarios[name] = {
            "rotated_by": alarm.reason if alarm else None,
            "alarm_detail": alarm.detail if alarm else None,
            "queries_answered_before_rotation": result.queries,
            "refused": result.refused.split(":")[0],
            "substitute_accuracy_stolen_carrier": result.curve[-1].accuracy["stolen"],
            "substitute_accuracy_rotated_carrier": result.curve[-1].accuracy["rotated"],
            "simulated_hours": round(service.clock / 3600, 2),
        }
        log.info("auto-rotation %s: %s", name, scenarios[name])

    # legitimate users: a week of human-paced use on their own carrier
    legit_scores = pseudo_outputs(
        public, test.x, carriers[0].carrier, carriers[0].placement
    ).numpy()
    rng = np.random.default_rng(11)
    legit_detector = ExtractionDetector(detector, profiles=lambda u, g: carriers[0].query_profile)
    users, week = 50, 7 * 24 * 3600.0
    rows_per_user: list[int] = []
    for i in range(users):
        mean_gap = rng.uniform(60, 1800)  # one request every 1–30 minutes on average
        times = np.cumsum(rng.exponential(mean_gap, size=int(week / mean_gap * 1.5) + 10))
        times = times[times < week]
        batches = []
        for t in times:
            size = int(rng.integers(1, 4))
            rows = legit_scores[rng.integers(0, len(legit_scores), size=size)]
            batches.append((float(t), rows))
        report = replay_traffic(legit_detector, f"user-{i}", 0, batches)
        rows_per_user.append(report.rows)
    reasons: dict[str, int] = {}
    for alarm in legit_detector.alarms:
        reasons[alarm.reason] = reasons.get(alarm.reason, 0) + 1
    return {
        "detector": asdict(detector),
        "attackers": scenarios,
        "legitimate_users": {
            "users": users,
            "simulated_days": 7,
            "rows_per_user_median": int(np.median(rows_per_user)),
            "rows_per_user_max": int(max(rows_per_user)),
            "alarms_by_reason": reasons,
            "false_alarms": sum(v for k, v in reasons.items() if k != "budget"),
            "scheduled_budget_rotations": reasons.get("budget", 0),
        },
    }


def plot(
    stealing: dict[str, Any],
    scenarios: dict[str, Any] | None,
    mapped: float,
    path: Path,
    public_name: str,
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot")
        return
    curve = stealing["curve"]
    queries = [p["queries"] for p in curve]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    ax.plot(queries, [p["stolen"] for p in curve], label="substitute via the stolen carrier")
    ax.plot(queries, [p["rotated"] for p in curve], label="substitute via the rotated carrier")
    ax.plot(
        queries,
        [p["rotated (rotation-aware)"] for p in curve],
        label="substitute via a rotation-aware rotated carrier",
    )
    ax.axhline(mapped, color="grey", linestyle=":", label=f"victim's own mapper ({mapped:.1%})")
    ax.axhline(0.1, color="black", linewidth=0.5, linestyle="--", label="chance")
    if scenarios:
        for name, s in scenarios.items():
            ax.scatter(
                [s["queries_answered_before_rotation"]],
                [s["substitute_accuracy_stolen_carrier"]],
                marker="x",
                color="black",
                zorder=3,
            )
            ax.annotate(
                f"auto-rotated: {name.split(' (')[0]}",
                (s["queries_answered_before_rotation"], s["substitute_accuracy_stolen_carrier"]),
                fontsize=6,
                xytext=(4, -10),
                textcoords="offset points",
            )
    ax.set_xlabel("queries answered by the result-mapper")
    ax.set_ylabel("substitute accuracy on MNIST test")
    ax.set_title(f"Stealing a carrier's mapper ({public_name} → MNIST)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="carrier quality, stealing and rotation")
    parser.add_argument("--skip-efficientnet", action="store_true")
    parser.add_argument("--only-efficientnet", action="store_true")
    parser.add_argument(
        "--efficientnet-budget", type=float, default=900.0, help="seconds of training"
    )
    parser.add_argument("--efficientnet-test", type=int, default=1000)
    parser.add_argument("--stealing-rounds", type=int, default=200)
    parser.add_argument(
        "--public-model",
        default="lenet5-fashion-features",
        choices=sorted(CONFIGS),
        help="model of the full run (quality, stealing, auto-rotation)",
    )
    parser.add_argument(
        "--baseline",
        nargs="*",
        default=["lenet5-fashion"],
        choices=sorted(CONFIGS),
        help="models measured for quality only (generation 0)",
    )
    parser.add_argument(
        "--service-defaults",
        action="store_true",
        help="only measure a carrier trained exactly as carrier-trainer trains one with its "
        "default settings (public model, training samples, hidden width, steps, time budget)",
    )
    parser.add_argument("--max-steps", type=int, default=0, help="override every budget")
    parser.add_argument("--plot-only", action="store_true", help="redraw from carrier.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    train, test = load_mnist("train"), load_mnist("test")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out_path = OUT_DIR / "carrier.json"
    report: dict[str, Any] = json.loads(out_path.read_text()) if out_path.exists() else {}
    report.pop("lenet5_fashion", None)  # the layout before "quality" (one model)
    quality: dict[str, Any] = report.setdefault("quality", {})

    def config_of(name: str) -> CarrierConfig:
        config = CONFIGS[name]
        return replace(config, max_steps=args.max_steps) if args.max_steps else config

    if args.plot_only:
        name = report["stealing_public_model"]
        mapped = quality[name]["carriers"]["0"]["test_accuracy"]
        attackers = report.get("auto_rotation", {}).get("attackers")
        plot(report["stealing"], attackers, mapped, OUT_DIR / "carrier_stealing.png", name)
        return 0

    if args.service_defaults:
        settings = CarrierTrainerSettings()
        public = load_public_model(settings.public_model)
        task = train.subset(min(settings.train_samples, len(train)), seed=0)
        result = lenet_quality(
            public, task, test, carrier_config(settings, seed=0), generations=(0,), cache=False
        )
        result.pop("_results")
        result.pop("_aware", None)
        report["service_defaults"] = result
        out_path.write_text(json.dumps(report, indent=2))
        args.skip_efficientnet = True

    if not args.only_efficientnet and not args.service_defaults:
        public = load_public_model(args.public_model)
        result = lenet_quality(public, train, test, config_of(public.name))
        carriers: dict[int, CarrierResult] = result.pop("_results")
        aware: CarrierResult = result.pop("_aware")
        quality[public.name] = result
        out_path.write_text(json.dumps(report, indent=2))
        stealing = stealing_experiment(public, carriers, aware, train, test, args.stealing_rounds)
        report["stealing"] = stealing
        report["stealing_public_model"] = public.name
        rotation = auto_rotation(public, carriers, train, test, DetectorConfig())
        report["auto_rotation"] = rotation
        mapped = carriers[0].test_accuracy or 0.0
        plot(stealing, rotation["attackers"], mapped, OUT_DIR / "carrier_stealing.png", public.name)
        out_path.write_text(json.dumps(report, indent=2))
        for name in args.baseline:
            if name == public.name:
                continue
            baseline = load_public_model(name)
            result = lenet_quality(baseline, train, test, config_of(name), generations=(0,))
            result.pop("_results")
            quality[name] = result
            out_path.write_text(json.dumps(report, indent=2))

    if not args.skip_efficientnet:
        report["efficientnet_lite0"] = efficientnet_quality(
            train, test, args.efficientnet_budget, args.efficientnet_test
        )
        out_path.write_text(json.dumps(report, indent=2))

    summary = {
        "mapped_mnist": {
            name: {
                **{g: c["test_accuracy"] for g, c in q.get("carriers", {}).items()},
                "p=0": q.get("untrained_carrier_p0", {}).get("test_accuracy"),
                "seconds_gen0": q.get("carriers", {}).get("0", {}).get("seconds"),
                "own_accuracy_before_after": [
                    q.get("public_model_own_accuracy_before"),
                    q.get("public_model_own_accuracy_after"),
                ],
            }
            for name, q in quality.items()
        },
        "stealing_public_model": report.get("stealing_public_model"),
        "stealing_final": {
            k: report.get("stealing", {}).get(k)
            for k in (
                "queries",
                "substitute_accuracy_stolen_carrier",
                "substitute_accuracy_after_rotation",
                "substitute_accuracy_after_rotation_aware",
            )
        },
        "auto_rotation": {
            k: (
                v["rotated_by"],
                v["queries_answered_before_rotation"],
                round(v["substitute_accuracy_stolen_carrier"], 4),
            )
            for k, v in report.get("auto_rotation", {}).get("attackers", {}).items()
        },
        "legitimate": report.get("auto_rotation", {}).get("legitimate_users"),
        "efficientnet_lite0": {
            k: report.get("efficientnet_lite0", {}).get(k)
            for k in ("test_accuracy", "validation_accuracy", "steps", "seconds", "test_images")
        },
    }
    defaults = report.get("service_defaults", {})
    summary["service_defaults"] = {
        "public_model": defaults.get("public_model"),
        "config": defaults.get("config"),
        "mapped_mnist": defaults.get("carriers", {}).get("0", {}).get("test_accuracy"),
        "p=0": defaults.get("untrained_carrier_p0", {}).get("test_accuracy"),
    }
    text = json.dumps(summary, indent=2)
    print(text)
    results.record(
        "carrier",
        "Carrier serving: mapped accuracy, stealing and rotation",
        "Figures of the last full run of each part (`bench/out/carrier.json` keeps them "
        "all); `service_defaults` is a carrier trained exactly as carrier-trainer trains "
        "one with its default settings (`--service-defaults`); the other figures use the "
        "benchmark's own carrier configuration (`config` in carrier.json).\n\n"
        + results.code_block(text),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
