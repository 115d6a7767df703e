"""Carrier benchmark (adversarial reprogramming): mapped accuracy, the stealing experiment
with rotation, automatic rotation by the extraction detector, and the device's cost.

``python -m bench.bench_carrier`` (one thread; part of ``make bench``). Every carrier is
trained exactly as carrier-trainer trains one with its default settings (`carrier_config`
of `CarrierTrainerSettings()`: public model, training samples, mapper width, steps,
schedule, time budget, output key).

1. **Quality.** The default public model carries MNIST for user ``victim``: generation 0,
   its rotation (generation 1), and the same training with the carrier frozen at its
   natural image (``p = 0``: what the carrier itself adds); mapped accuracy on the 10,000
   MNIST test images; the public model's own Fashion-MNIST accuracy before and after (it
   is frozen); generation 0's own mapper on generation 1's outputs, with the rotated
   output key and with the old key kept (what rotating the carrier image alone does).
   ``--baseline`` public models (default ``lenet5-fashion-features``, ``lenet5-fashion``),
   the documented trade-offs: the same, and each goes through 2 and 3 as well.
2. **Stealing (the reference experiment).** An attacker holding the public model, the
   carrier (with its output key) and the credential sends 200 rounds × 50 queries through
   the real `MapperRegistry` and trains a substitute mapper; its MNIST accuracy is
   measured every 10 rounds through the stolen carrier, through the rotated one, and
   through the rotated one had the key been kept; then through the rotated carrier under
   100 fresh keys drawn as carrier-trainer draws them (one rotation is one draw), as it
   stands and for a **centring attacker** who knows the key has an offset and moves the new
   scores onto the mean of the ones it queried. Then the **rotation-aware attacker**
   (`re_steal`): it holds generation 1's package too, undoes the keys, and keeps training
   on ``--recovery-rounds`` × 50 fresh queries; queries until it is back within 2 points.
   Plot: ``bench/out/carrier_stealing.png``.
3. **Automatic rotation.** The same registry with an `ExtractionDetector` that rotates on
   alarm, against four attackers (fast and slow with task data, a surrogate-data attacker
   using Fashion-MNIST, a noise prober) and 50 simulated legitimate users over a week.
4. **Device.** One classification on the device path (embed, public model, output key)
   on one CPU thread, the bytes of the ``MapRequest`` it sends, the carrier download.
5. **Quality, efficientnet-lite0** within ``--efficientnet-budget`` seconds of training
   (mapper warm start on cached pseudo-outputs, then joint ``(p, w)`` steps), evaluated
   on ``--efficientnet-test`` MNIST test images. ``--skip-efficientnet`` leaves it out.

Writes ``bench/out/carrier.json`` and generation 0's mapper/carrier to
``.cache/carrier-bench/`` (the serving benchmark serves that mapper).
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
    MappingNetwork,
    apply_output_key,
    carrier_to_safetensors,
    key_parts,
    mapped_accuracy,
    mapper_to_safetensors,
    random_output_key,
    score_spread,
    train_carrier,
)
from modelguard.carrier.extraction import Alarm, DetectorConfig, ExtractionDetector
from modelguard.carrier.mapper_registry import MapperRegistry, hash_credential, new_credential
from modelguard.carrier.natural_images import natural_image_for_user, user_image_index
from modelguard.carrier.public_models import PUBLIC_MODELS, PublicModel, load_public_model
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
            carrier_to_safetensors(
                results[0].carrier, results[0].placement, public, 0, results[0].output_key
            )
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
    if 1 in results:
        # the victim's own generation-0 mapper (the best substitute there can be) on the
        # rotated carrier: with the rotated key, and with generation 0's key kept (what
        # rotating the carrier image alone would achieve)
        old, new = results[0], results[1]
        report["old_mapper_on_rotation"] = {
            "rotated_carrier_and_key": mapped_accuracy(
                public, old.mapper, new.carrier, new.placement, test, output_key=new.output_key
            ),
            "rotated_carrier_key_unchanged": mapped_accuracy(
                public, old.mapper, new.carrier, new.placement, test, output_key=old.output_key
            ),
        }
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
    train: Dataset,
    test: Dataset,
    rounds: int,
    recovery_rounds: int,
) -> dict[str, Any]:
    """The reference attacker (``rounds`` × 50 queries through generation 0), the rotation,
    then the rotation-aware attacker (`re_steal`)."""
    service = Service(carriers, detector=None)
    service.install("victim", 0)
    attacker_x = train.subset(len(train), seed=99).x
    started = time.monotonic()
    old, new = carriers[0], carriers[1]
    result = steal(
        public,
        service,
        "victim",
        attacker_x,
        test,
        StealingConfig(rounds=rounds, queries_per_round=50, hidden=256),
        60.0,
        extra={
            "rotated carrier, key unchanged": Carrier(new.carrier, new.placement, old.output_key)
        },
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
    before_rotation = final.accuracy["stolen"]
    # one rotation draws one key: the figure above is one draw; these are many
    # the substitute's own view of generation 0: the mean keyed score over as many of the
    # attacker's images as it queried (it queried a random subset of the same pool)
    queried = attacker_x[: result.queries]
    old_mean = Carrier.from_result(old).outputs(public, queried).mean(0)
    over_keys, centring = accuracy_over_fresh_keys(
        public,
        result.substitute,
        new,
        test,
        KEY_DRAWS,
        carriers[0].config.output_offset,
        recentre_on=old_mean,
    )
    recovery = re_steal(public, service, "victim", result.substitute, train, test, recovery_rounds)
    recovered_at = next(
        (p.queries for p in recovery.curve if p.accuracy["rotated"] >= before_rotation - 0.02),
        None,
    )
    return {
        "queries": result.queries,
        "curve": [{"queries": p.queries, **p.accuracy} for p in result.curve],
        "substitute_accuracy_stolen_carrier": before_rotation,
        "substitute_accuracy_after_rotation": final.accuracy["rotated"],
        "substitute_accuracy_after_rotation_key_unchanged": final.accuracy[
            "rotated carrier, key unchanged"
        ],
        "substitute_accuracy_after_rotation_over_keys": over_keys,
        "centring_attacker_over_keys": centring,
        "old_credential_after_rotation": after,
        "usage_rows": service.registry.usage("victim").rows,
        "rotation_aware_attacker": {
            "curve": [{"queries": p.queries, **p.accuracy} for p in recovery.curve],
            "queries_to_recover": recovered_at,
            "recovered_means": "within 2 points of its accuracy before the rotation",
        },
        "seconds": round(time.monotonic() - started, 1),
    }


#: Fresh output keys the stolen substitute is scored against (each rotation draws one).
KEY_DRAWS = 100


@torch.no_grad()
def accuracy_over_fresh_keys(
    public: PublicModel,
    substitute: MappingNetwork,
    rotated: CarrierResult,
    test: Dataset,
    draws: int,
    output_offset: float,
    recentre_on: torch.Tensor,
) -> tuple[dict[str, float], dict[str, float]]:
    """The substitute's accuracy through the rotated carrier under ``draws`` seeded fresh
    keys, drawn as carrier-trainer draws them (offset ``output_offset`` times the scores'
    spread): mean, max, and the share of rotations that leave it at or under 12%; first as
    it stands, then for the *centring attacker*, who knows the key has an offset and moves
    the new generation's scores (it needs a batch of them, labels not) onto
    ``recentre_on`` ``(K,)``, the mean of the scores it queried with, before its substitute
    reads them."""
    raw = Carrier(rotated.carrier, rotated.placement).outputs(public, test.x)
    offset_norm = output_offset * score_spread(raw)
    as_is, centred = [], []
    for draw in range(draws):
        key = random_output_key(public.output_dim, seed=10_000 + draw, offset_norm=offset_norm)
        keyed = apply_output_key(raw.to(torch.float64), key)
        for accuracies, scores in (
            (as_is, keyed),
            (centred, keyed - keyed.mean(0) + recentre_on.to(keyed.dtype)),
        ):
            predicted = substitute(scores.to(raw.dtype)).argmax(1)
            accuracies.append(float((predicted == test.y).float().mean()))

    def summary(accuracies: list[float]) -> dict[str, float]:
        return {
            "draws": draws,
            "mean": round(float(np.mean(accuracies)), 4),
            "max": round(max(accuracies), 4),
            "share_at_most_12_percent": round(float(np.mean(np.array(accuracies) <= 0.12)), 3),
        }

    return summary(as_is), summary(centred)


def re_steal(
    public: PublicModel,
    service: Service,
    user: str,
    substitute: MappingNetwork,
    train: Dataset,
    test: Dataset,
    rounds: int,
) -> StealingResult:
    """The rotation-aware attacker's second round. It holds generation 1's device package
    and credential (a device it controls was rotated too), so it knows both output keys: it
    reads the new carrier's raw scores under generation 0's key (``z Q₀ + o₀``, where its
    substitute already works), sends them to the server in generation 1's, and keeps
    training its substitute on the answers."""
    credential = service.credentials[(user, 1)]
    old, new = service.carriers[0], service.carriers[1]
    if old.output_key is None or new.output_key is None:
        raise ValueError("the rotation-aware attacker needs keyed carriers")
    attacker_view = Carrier(new.carrier, new.placement, old.output_key)
    old_rotation, old_offset = key_parts(old.output_key.to(torch.float64))
    new_key = new.output_key.to(torch.float64)

    def oracle(z: np.ndarray) -> np.ndarray:
        # undo generation 0's key, apply generation 1's
        raw = torch.from_numpy(z).to(torch.float64)
        if old_offset is not None:
            raw = raw - old_offset
        sent = apply_output_key(raw @ old_rotation.T, new_key).numpy()
        sent = np.ascontiguousarray(sent, dtype="<f4")
        return service.registry.map(user, credential, sent.tobytes(), len(z)).labels

    return simulate_stealing(
        StealingConfig(rounds=rounds, queries_per_round=50, hidden=256, eval_every=1, seed=1),
        public,
        attacker_view,
        train.subset(len(train), seed=98).x,
        oracle,
        test,
        {"rotated": attacker_view},
        classes=10,
        initial=substitute,
    )


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
    legit_scores = Carrier.from_result(carriers[0]).outputs(public, test.x).numpy()
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
    ax.plot(queries, [p["rotated"] for p in curve], label="… via the rotated carrier and key")
    ax.plot(
        queries,
        [p["rotated carrier, key unchanged"] for p in curve],
        label="… via the rotated carrier had the output key been kept",
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


@torch.no_grad()
def device_cost(public: PublicModel, carrier: CarrierResult, test: Dataset) -> dict[str, Any]:
    """What one classification costs the device on one CPU thread: embedding the input in
    the carrier, the public model and the output key (the ``DeviceClient`` path, one image
    per request), and the bytes of the request it sends (a ``MapRequest`` with a
    credential as `new_credential` issues them)."""
    from modelguard.proto.modelguard.v1 import result_mapper_pb2

    device = Carrier.from_result(carrier)
    images = test.x[:300]
    for x in images[:20]:  # warm-up
        device.outputs(public, x.unsqueeze(0))
    seconds = []
    for x in images:
        started = time.perf_counter()
        row = device.outputs(public, x.unsqueeze(0))
        seconds.append(time.perf_counter() - started)
    payload = np.ascontiguousarray(row.numpy(), dtype="<f4").tobytes()
    request = result_mapper_pb2.MapRequest(
        user_id="user-000001", credential=new_credential(), pseudo_output=payload, rows=1
    )
    return {
        "threads": torch.get_num_threads(),
        "classifications": len(seconds),
        "ms_median": round(float(np.median(seconds)) * 1e3, 3),
        "ms_p99": round(float(np.percentile(seconds, 99)) * 1e3, 3),
        "payload_bytes": len(payload),
        "request_bytes": request.ByteSize(),
        "carrier_artifact_bytes": len(
            carrier_to_safetensors(
                carrier.carrier, carrier.placement, public, 0, carrier.output_key
            )
        ),
    }


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
        "--recovery-rounds",
        type=int,
        default=60,
        help="rounds of 50 queries of the rotation-aware attacker after the rotation",
    )
    parser.add_argument(
        "--baseline",
        nargs="*",
        default=["lenet5-fashion-features", "lenet5-fashion"],
        choices=[m for m in PUBLIC_MODELS if m != "efficientnet-lite0"],
        help="other public models, measured like the default (quality, stealing, "
        "auto-rotation) with carrier-trainer's default configuration",
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
    for stale in ("lenet5_fashion", "service_defaults", "quality"):
        report.pop(stale, None)  # layouts of earlier versions of this benchmark
    quality: dict[str, Any] = report.setdefault("default_quality", {})
    settings = CarrierTrainerSettings()
    # exactly what carrier-trainer trains with its default settings (seed 0: generation 0)
    service_config = carrier_config(settings, seed=0)
    if args.max_steps:
        service_config = replace(service_config, max_steps=args.max_steps)
    task = train.subset(min(settings.train_samples, len(train)), seed=0)

    if args.plot_only:
        name = report["stealing_public_model"]
        mapped = quality[name]["carriers"]["0"]["test_accuracy"]
        attackers = report.get("auto_rotation", {}).get("attackers")
        plot(report["stealing"], attackers, mapped, OUT_DIR / "carrier_stealing.png", name)
        return 0

    if not args.only_efficientnet:
        public = load_public_model(settings.public_model)
        result = lenet_quality(public, task, test, service_config)
        carriers: dict[int, CarrierResult] = result.pop("_results")
        quality[public.name] = result
        out_path.write_text(json.dumps(report, indent=2))
        report["device"] = device_cost(public, carriers[0], test)
        stealing = stealing_experiment(
            public, carriers, train, test, args.stealing_rounds, args.recovery_rounds
        )
        report["stealing"] = stealing
        report["stealing_public_model"] = public.name
        rotation = auto_rotation(public, carriers, train, test, DetectorConfig())
        report["auto_rotation"] = rotation
        mapped = carriers[0].test_accuracy or 0.0
        plot(stealing, rotation["attackers"], mapped, OUT_DIR / "carrier_stealing.png", public.name)
        out_path.write_text(json.dumps(report, indent=2))
        others: dict[str, Any] = report.setdefault("other_public_models", {})
        for name in args.baseline:
            if name == public.name:
                continue
            baseline = load_public_model(name)
            result = lenet_quality(baseline, task, test, service_config, cache=False)
            baseline_carriers: dict[int, CarrierResult] = result.pop("_results")
            quality[name] = result
            others[name] = {
                "stealing": stealing_experiment(
                    baseline,
                    baseline_carriers,
                    train,
                    test,
                    args.stealing_rounds,
                    args.recovery_rounds,
                ),
                "auto_rotation": auto_rotation(
                    baseline, baseline_carriers, train, test, DetectorConfig()
                ),
            }
            out_path.write_text(json.dumps(report, indent=2))

    if not args.skip_efficientnet:
        report["efficientnet_lite0"] = efficientnet_quality(
            train, test, args.efficientnet_budget, args.efficientnet_test
        )
        out_path.write_text(json.dumps(report, indent=2))

    text = json.dumps(summarise(report), indent=2)
    print(text)
    results.record(
        "carrier",
        "Carrier serving: mapped accuracy, stealing and rotation",
        "Every carrier is trained exactly as carrier-trainer trains one with its default "
        "settings (`config`: public model, training samples, mapper width, steps, time "
        "budget, output key); the other public models are the documented trade-offs, "
        "measured with the same settings. Accuracy on the full MNIST test set; "
        "`bench/out/carrier.json` keeps the curves.\n\n" + results.code_block(text),
    )
    return 0


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    quality = report.get("default_quality", {})
    stealing = report.get("stealing", {})
    aware = stealing.get("rotation_aware_attacker", {})
    name = report.get("stealing_public_model")
    return {
        "default_public_model": name,
        "config": quality.get(name, {}).get("config"),
        "mapped_mnist": {
            model: {
                **{f"generation {g}": c["test_accuracy"] for g, c in q.get("carriers", {}).items()},
                "p=0": q.get("untrained_carrier_p0", {}).get("test_accuracy"),
                "training_seconds_gen0": q.get("carriers", {}).get("0", {}).get("seconds"),
                "own_accuracy_before_after": [
                    q.get("public_model_own_accuracy_before"),
                    q.get("public_model_own_accuracy_after"),
                ],
                "old_mapper_on_rotation": q.get("old_mapper_on_rotation"),
            }
            for model, q in quality.items()
        },
        "stealing (reference attacker)": {
            k: stealing.get(k)
            for k in (
                "queries",
                "substitute_accuracy_stolen_carrier",
                "substitute_accuracy_after_rotation",
                "substitute_accuracy_after_rotation_key_unchanged",
                "substitute_accuracy_after_rotation_over_keys",
            )
        },
        "centring attacker (re-centres the new scores; over the same keys)": stealing.get(
            "centring_attacker_over_keys"
        ),
        "rotation-aware attacker": {
            "queries_to_recover": aware.get("queries_to_recover"),
            "recovered_means": aware.get("recovered_means"),
            "accuracy_after_queries": {
                p["queries"]: round(p["rotated"], 4)
                for p in aware.get("curve", [])
                if p["queries"] in (0, 200, 550, 1000, 2050, 3000)
            },
        },
        "auto_rotation (attacker: reason, queries answered, substitute accuracy)": {
            k: (
                v["rotated_by"],
                v["queries_answered_before_rotation"],
                round(v["substitute_accuracy_stolen_carrier"], 4),
            )
            for k, v in report.get("auto_rotation", {}).get("attackers", {}).items()
        },
        "legitimate": report.get("auto_rotation", {}).get("legitimate_users"),
        "other public models (the trade-offs)": {
            model: _compact(quality.get(model, {}), other["stealing"], other["auto_rotation"])
            for model, other in report.get("other_public_models", {}).items()
        },
        "device": report.get("device"),
        **(
            {
                "efficientnet_lite0": {
                    k: report["efficientnet_lite0"].get(k)
                    for k in ("test_accuracy", "validation_accuracy", "steps", "seconds")
                }
            }
            if report.get("efficientnet_lite0", {}).get("test_accuracy") is not None
            else {}
        ),
    }


def _compact(
    quality: dict[str, Any], stealing: dict[str, Any], rotation: dict[str, Any]
) -> dict[str, Any]:
    """One public model's figures on a few lines: mapped accuracy, the substitutes after a
    rotation, the rotation-aware attacker, and what auto-rotation allows."""
    keys = stealing.get("substitute_accuracy_after_rotation_over_keys", {})
    centring = stealing.get("centring_attacker_over_keys", {})
    attackers = rotation.get("attackers", {})
    return {
        "mapped (generations 0, 1; p=0)": [
            *(c.get("test_accuracy") for c in quality.get("carriers", {}).values()),
            quality.get("untrained_carrier_p0", {}).get("test_accuracy"),
        ],
        "training_seconds_gen0": quality.get("carriers", {}).get("0", {}).get("seconds"),
        "substitute: stolen carrier, rotated (this key)": [
            round(stealing["substitute_accuracy_stolen_carrier"], 4),
            round(stealing["substitute_accuracy_after_rotation"], 4),
        ],
        "over 100 keys (mean, max, share <= 12%)": [
            keys.get("mean"),
            keys.get("max"),
            keys.get("share_at_most_12_percent"),
        ],
        "centring attacker (mean, max, share <= 12%)": [
            centring.get("mean"),
            centring.get("max"),
            centring.get("share_at_most_12_percent"),
        ],
        "rotation-aware: queries to recover": stealing.get("rotation_aware_attacker", {}).get(
            "queries_to_recover"
        ),
        "auto-rotation (queries answered, substitute accuracy)": {
            name: [
                v["queries_answered_before_rotation"],
                round(v["substitute_accuracy_stolen_carrier"], 4),
            ]
            for name, v in attackers.items()
        },
        "legitimate false alarms": rotation.get("legitimate_users", {}).get("false_alarms"),
    }


if __name__ == "__main__":
    sys.exit(main())
