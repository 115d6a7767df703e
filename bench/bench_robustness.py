"""Robustness benchmark: ``python -m bench.bench_robustness``.

Checks the robustness evaluation against Madry et al., "Towards Deep Learning Models
Resistant to Adversarial Attacks" (ICLR 2018), on MNIST: a standard LeNet-5 falls to
near 0% robust accuracy under PGD at ε = 0.3 (L∞), while one adversarially trained on
PGD examples (every training batch replaced by its PGD images, as in the paper) holds
well above 80%. Both models are trained here with the same seed and budget; the figures
are those of `modelguard.robustness.evaluate_robustness` with its gradient-masking check,
on a seeded subset of the MNIST test split.

Zoo curves: the same evaluation, at the same ε, of models of the benchmark zoo
(`bench.zoo`, held-out split): every clean model and the first backdoored model of each
architecture, each on its own data set's test images. The zoo must be built (``python -m
bench.zoo``, or ``--ensure`` trains what is missing). Every curve, clean accuracy at ε = 0
then robust accuracy against ε, is drawn in one plot written beside the results page.

Adversarial Robustness Toolbox comparison: the LeNet-5 pair and the first clean zoo
model of each architecture are attacked again, on the same images, by our FGSM and PGD
and by ART's ``FastGradientMethod`` and
``ProjectedGradientDescent`` through its ``PyTorchClassifier`` (L∞, same ε, steps, step
size and random start). The two accuracies are printed side by side; an implementation
that follows the same papers should agree within a few points, and the run fails when
any pair differs by more than 5 points.

``--smoke`` trains on a few hundred images for one epoch and attacks a few images (zoo
and ART included), to check the script runs; it writes nothing and fails on no figure.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent
from art.estimators.classification import PyTorchClassifier
from torch import nn

from bench import results
from bench.zoo import HELDOUT, ZOO_DIR, ZooEntry, ensure_model, load_zoo, zoo_specs
from modelguard.datasets import Dataset, load_mnist, load_named
from modelguard.formats.loader import load_model
from modelguard.nn.architectures import build
from modelguard.nn.training import TrainConfig, accuracy, train_classifier
from modelguard.plots import line_plot_png
from modelguard.robustness.attacks import PgdConfig, fgsm, pgd
from modelguard.robustness.evaluate import PGD, RobustnessConfig, evaluate_robustness
from modelguard.spec import InputSpec

log = logging.getLogger("bench.bench_robustness")

SPEC = InputSpec(shape=(1, 28, 28), value_range=(0.0, 1.0))
ANCHOR_EPS = 0.3
EPS = (0.1, 0.2, ANCHOR_EPS)
#: Madry et al.'s anchors at ε = 0.3: a standard CNN "near 0%", an adversarially trained
#: one "well above 80%" (89% in the paper against PGD with 100 steps).
STANDARD_MAX = 0.05
ADVERSARIAL_MIN = 0.80
#: How far, in percentage points, our accuracy under an attack may lie from ART's under
#: the same attack before the run fails: "within a few points".
ART_MAX_POINTS = 5.0
ART_NOTE = (
    "ART: adversarial-robustness-toolbox 1.20.1 (installed with --no-deps beside torch "
    "2.13; scikit-learn, which its evasion attacks import, comes from the `bench` extra). "
    "Same model, same images, same ε, steps, step size (2.5 · ε / steps) and random start; "
    f"the run fails when any difference exceeds {ART_MAX_POINTS:g} points."
)
PLOT = results.PAGE.with_name("benchmarks-robustness.png")
FGSM_NAME, PGD_NAME = "FGSM", "PGD"


def train_standard(train: Dataset, config: TrainConfig) -> nn.Module:
    return train_classifier(build("lenet5"), train, config)


def train_adversarial(train: Dataset, config: TrainConfig, eps: float, steps: int) -> nn.Module:
    """Madry et al.'s adversarial training: each batch is replaced by PGD images (L∞,
    random start) against the model as it is at that step."""
    model = build("lenet5")
    generator = torch.Generator().manual_seed(config.seed)
    attack = PgdConfig(steps=steps)

    def adversarial(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pgd(model, x, y, eps, attack, generator=generator), y

    return train_classifier(model, train, config, transform=adversarial)


def evaluate(
    name: str, model: nn.Module, test: Dataset, config: RobustnessConfig, spec: InputSpec = SPEC
) -> dict[str, Any]:
    started = time.perf_counter()
    result = evaluate_robustness(model, test, spec, config)
    log.info("%s evaluated in %.0f s", name, time.perf_counter() - started)
    return {"model": name, "clean": accuracy(model, test), **result.to_dict()}


def zoo_subset(split: str = HELDOUT) -> list[str]:
    """The zoo models whose curves are drawn: every clean model of ``split`` and the first
    backdoored model of each architecture, in zoo order."""
    specs = zoo_specs(split)
    backdoored: dict[str, str] = {}
    for spec in specs:
        if spec.triggers:
            backdoored.setdefault(spec.arch, spec.name)
    return [s.name for s in specs if not s.triggers] + list(backdoored.values())


def zoo_entries(names: list[str], zoo_dir: Path, ensure: bool) -> list[ZooEntry]:
    """The entries ``names`` of the zoo in ``zoo_dir``; trained first when ``ensure``,
    else a missing one stops the run with the command that builds it."""
    if ensure:
        return [ensure_model(name, zoo_dir) for name in names]
    present = {e.name: e for e in load_zoo(zoo_dir)}
    missing = [name for name in names if name not in present]
    if missing:
        raise SystemExit(
            f"zoo models missing from {zoo_dir}: {', '.join(missing)}. Build them with "
            f"`python -m bench.zoo {' '.join(missing)}` (or `make zoo`), or pass --ensure"
        )
    return [present[name] for name in names]


def load_zoo_model(entry: ZooEntry, zoo_dir: Path) -> nn.Module:
    """The zoo model, through the same safe loader as user submissions."""
    path = zoo_dir / f"{entry.name}.safetensors"
    return load_model(path.read_bytes(), entry.spec, entry.arch).module


def zoo_models(
    entries: list[ZooEntry], zoo_dir: Path, images: int
) -> list[tuple[ZooEntry, nn.Module, Dataset]]:
    """Each zoo model with a seeded subset of its own data set's test split."""
    return [
        (
            entry,
            load_zoo_model(entry, zoo_dir),
            load_named(entry.dataset, "test").subset(images, seed=1),
        )
        for entry in entries
    ]


def compared_on_art(entries: list[ZooEntry]) -> set[str]:
    """The zoo models ART is compared on besides the LeNet-5 pair: the first clean model
    of each architecture."""
    first: dict[str, str] = {}
    for entry in entries:
        if not entry.infected:
            first.setdefault(entry.arch, entry.name)
    return set(first.values())


def table(rows: list[dict[str, Any]], eps: tuple[float, ...]) -> list[str]:
    head = "| model | clean | " + " | ".join(f"ε={e:g} PGD / robust" for e in eps)
    lines = [head + " | masking check |", "|" + "---|" * (len(eps) + 3)]
    for row in rows:
        cells = []
        for point in row["points"]:
            pgd_acc = next(a["accuracy"] for a in point["attacks"] if a["attack"] == PGD)
            cells.append(f"{pgd_acc:.1%} / {point['robust_accuracy']:.1%}")
        masking = row["masking"]
        check = "; ".join(masking["reasons"]) if masking["flagged"] else "passed"
        lines.append(f"| {row['model']} | {row['clean']:.1%} | {' | '.join(cells)} | {check} |")
    return lines


def curve_plot(rows: list[dict[str, Any]], eps: tuple[float, ...]) -> bytes:
    """Every model's curve as a PNG: clean accuracy at ε = 0, then robust accuracy."""
    series = {
        row["model"]: [row["clean"], *(p["robust_accuracy"] for p in row["points"])] for row in rows
    }
    return line_plot_png(
        [0.0, *eps],
        series,
        title="Robust accuracy against ε (L∞; FGSM and PGD)",
        xlabel="ε",
        ylabel="robust accuracy",
    )


def anchors(rows: list[dict[str, Any]]) -> list[str]:
    """Each anchor of Madry et al. at ε = 0.3, met or not."""
    at = {
        row["model"]: next(p["robust_accuracy"] for p in row["points"] if p["eps"] == ANCHOR_EPS)
        for row in rows
    }
    standard, adversarial = at["standard"], at["adversarially trained"]
    return [
        f"- standard LeNet-5 at ε = 0.3: {standard:.1%} robust "
        f"({'met' if standard <= STANDARD_MAX else 'NOT MET'}: near 0%, at most "
        f"{STANDARD_MAX:.0%})",
        f"- adversarially trained LeNet-5 at ε = 0.3: {adversarial:.1%} robust "
        f"({'met' if adversarial >= ADVERSARIAL_MIN else 'NOT MET'}: at least "
        f"{ADVERSARIAL_MIN:.0%})",
    ]


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def compare_with_art(
    name: str,
    model: nn.Module,
    test: Dataset,
    spec: InputSpec,
    eps: tuple[float, ...],
    attack: PgdConfig,
) -> list[dict[str, Any]]:
    """Our FGSM and PGD against ART's on ``model`` (raw inputs: ``spec`` declares no
    normalisation) and the images of ``test``: per attack and ε, the accuracy under each
    and the difference in points (ours − ART's)."""
    if spec.normalised:
        raise ValueError("the ART comparison takes models of raw inputs")
    model.eval()
    x, y = test.x.float(), test.y
    low, high = spec.value_range
    with torch.no_grad():
        classes = int(model(x[:1]).shape[1])
    classifier = PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(spec.shape),
        nb_classes=classes,
        clip_values=(low, high),
        device_type="cpu",
    )
    np.random.seed(0)  # ART draws its random start from numpy's global generator
    x_np, y_np = x.numpy(), y.numpy()
    out = []
    for e in eps:
        step = attack.step_size_fraction * e
        art_attacks = {
            FGSM_NAME: FastGradientMethod(classifier, norm=np.inf, eps=e, batch_size=256),
            PGD_NAME: ProjectedGradientDescent(
                classifier,
                norm=np.inf,
                eps=e,
                eps_step=step,
                max_iter=attack.steps,
                num_random_init=attack.restarts if attack.random_start else 0,
                batch_size=256,
                verbose=False,
            ),
        }
        ours = {
            FGSM_NAME: fgsm(model, x, y, e, value_range=(low, high)),
            PGD_NAME: pgd(
                model,
                x,
                y,
                e,
                attack,
                value_range=(low, high),
                generator=torch.Generator().manual_seed(0),
            ),
        }
        for attack_name, art_attack in art_attacks.items():
            x_art = torch.from_numpy(art_attack.generate(x=x_np, y=y_np)).float()
            mine, theirs = _correct(model, ours[attack_name], y), _correct(model, x_art, y)
            out.append(
                {
                    "model": name,
                    "attack": attack_name,
                    "eps": e,
                    "ours": mine,
                    "art": theirs,
                    "points": (mine - theirs) * 100,
                }
            )
    return out


def art_table(comparisons: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | attack | ε | ours | ART | difference (points) |",
        "|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        lines.append(
            f"| {c['model']} | {c['attack']} | {c['eps']:g} | {c['ours']:.1%} | {c['art']:.1%} "
            f"| {c['points']:+.1f} |"
        )
    return lines


def art_verdict(comparisons: list[dict[str, Any]], max_points: float = ART_MAX_POINTS) -> str:
    """The largest difference against ``max_points``: a line starting ``- ART agreement:
    met`` or ``NOT MET``."""
    worst = max(comparisons, key=lambda c: abs(c["points"]))
    met = abs(worst["points"]) <= max_points
    return (
        f"- ART agreement: {'met' if met else 'NOT MET'}: largest difference "
        f"{abs(worst['points']):.1f} points ({worst['model']}, {worst['attack']}, "
        f"ε = {worst['eps']:g}); at most {max_points:g} allowed"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-size", type=int, default=60_000, help="MNIST training images")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs of both models")
    parser.add_argument("--train-steps", type=int, default=7, help="PGD steps in training")
    parser.add_argument("--test-images", type=int, default=500, help="images attacked")
    parser.add_argument(
        "--zoo-images",
        type=int,
        default=100,
        help="images attacked per zoo model (the ResNets dominate the run's time)",
    )
    parser.add_argument("--steps", type=int, default=40, help="PGD steps in the evaluation")
    parser.add_argument("--restarts", type=int, default=1, help="PGD runs in the evaluation")
    parser.add_argument("--zoo-dir", type=Path, default=ZOO_DIR, help="the built model zoo")
    parser.add_argument("--ensure", action="store_true", help="train missing zoo models")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny settings, to check the script; no record"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("art").setLevel(logging.WARNING)  # a line per attack and ε otherwise
    if args.smoke:
        args.train_size, args.epochs, args.train_steps = 300, 1, 2
        args.test_images, args.zoo_images, args.steps = 10, 10, 3
    # the zoo first: a missing model stops the run before anything is trained
    entries = zoo_entries(zoo_subset(), args.zoo_dir, args.ensure)
    torch.manual_seed(0)
    train = load_mnist("train").subset(args.train_size, seed=0)
    test = load_mnist("test").subset(args.test_images, seed=1)
    training = TrainConfig(epochs=args.epochs, batch_size=64, lr=1e-3, seed=0)
    config = RobustnessConfig(
        eps=EPS,
        steps=args.steps,
        restarts=args.restarts,
        max_images=args.test_images,
        time_budget_seconds=3600.0,
    )
    started = time.perf_counter()
    standard = train_standard(train, training)
    log.info("standard model trained in %.0f s", time.perf_counter() - started)
    started = time.perf_counter()
    robust = train_adversarial(train, training, ANCHOR_EPS, args.train_steps)
    log.info("adversarially trained model trained in %.0f s", time.perf_counter() - started)
    rows = [
        evaluate("standard", standard, test, config),
        evaluate("adversarially trained", robust, test, config),
    ]
    models = zoo_models(entries, args.zoo_dir, args.zoo_images)
    zoo = [
        evaluate(f"{entry.name} ({entry.dataset})", model, data, config, entry.spec)
        for entry, model, data in models
    ]
    attack = PgdConfig(steps=args.steps, restarts=args.restarts)
    started = time.perf_counter()
    comparisons = [
        *compare_with_art("standard", standard, test, SPEC, EPS, attack),
        *compare_with_art("adversarially trained", robust, test, SPEC, EPS, attack),
    ]
    on_art = compared_on_art(entries)
    for entry, model, data in models:
        if entry.name in on_art:
            comparisons += compare_with_art(entry.name, model, data, entry.spec, EPS, attack)
    log.info("ART comparison in %.0f s", time.perf_counter() - started)
    plot = curve_plot(rows + zoo, EPS)
    verdict = art_verdict(comparisons)
    lines = [
        f"LeNet-5 on MNIST ({args.train_size:,} training images, {args.epochs} epochs; the "
        f"adversarial model trained on PGD images, ε = 0.3, {args.train_steps} steps), "
        f"{args.test_images} test images attacked with PGD (L∞, {args.steps} steps, "
        f"{args.restarts} random start(s)) and FGSM; robust = correct under every attack "
        "at that ε and below.",
        "",
        *table(rows, EPS),
        "",
        *anchors(rows),
        "",
        f"Zoo models (held-out split: every clean model, the first backdoored one of each "
        f"architecture), {args.zoo_images} test images of each model's own data set, same "
        "attacks:",
        "",
        *table(zoo, EPS),
        "",
        f"![Robust accuracy against ε]({PLOT.name})",
        "",
        "Our attacks against the Adversarial Robustness Toolbox's, accuracy under each (the "
        "LeNet-5 pair and the first clean zoo model of each architecture):",
        "",
        *art_table(comparisons),
        "",
        verdict,
        "",
        ART_NOTE,
    ]
    print("\n".join(lines))
    if args.smoke:
        log.info(
            "smoke: plot of %d curves rendered (%d bytes), not written", len(rows + zoo), len(plot)
        )
        return 0
    PLOT.write_bytes(plot)
    results.record("robustness", "Adversarial robustness (MNIST, model zoo)", "\n".join(lines))
    failed = any("NOT MET" in line for line in [*anchors(rows), verdict])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
