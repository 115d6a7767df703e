"""Leak-detector benchmark: ``python -m bench.bench_leak`` (part of ``make bench``).

On the hold-out zoo of ``bench.leak_calibrate`` (models never used for calibration: other
seeds, other strengths, attack variants and architectures the calibration never saw) it
reports, per model, the attack figures (leaked-image correlation, bit accuracy, clean
accuracy against the benign model of the same recipe), the verdict, the score and the
time; then the detection rate, the false-positive rate and the time per model against
the issue's bar; then the pruning defence against the data-processing-stage attack
(leaked-image similarity and clean accuracy before and after).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench import results
from bench.leak_calibrate import ZooModel, ZooSpec, dataset, load_or_train, test_set, zoo_specs
from modelguard.attacks import leak
from modelguard.datasets import Dataset
from modelguard.leak.detector import detect_leak
from modelguard.leak.pruning_defence import PruningDefenceConfig, prune_dormant_neurons
from modelguard.nn.training import TrainConfig, accuracy, train_classifier

log = logging.getLogger("bench.bench_leak")

MS_BAR = 100.0


def _reference(spec: ZooSpec, benign: dict[str, ZooModel]) -> ZooModel | None:
    """The benign hold-out model trained with the attacked model's recipe."""
    for model in benign.values():
        s = model.spec
        if (s.arch, s.dataset, s.seed, s.train_size, s.epochs, s.batch_size, s.lr) == (
            spec.arch,
            spec.dataset,
            spec.seed,
            spec.train_size,
            spec.epochs,
            spec.batch_size,
            spec.lr,
        ) and (s.l1, s.weight_decay, s.optimiser, s.init) == (0.0, 0.0, "adam", "default"):
            return model
    return None


def detection(models: list[ZooModel]) -> dict[str, Any]:
    detect_leak(models[0].module)  # warm-up (imports, caches)
    rows: list[dict[str, Any]] = []
    benign = {m.spec.name: m for m in models if not m.spec.attack}
    for model in models:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            verdict = detect_leak(model.module)
            times.append(time.perf_counter() - started)
        reference = _reference(model.spec, benign) if model.spec.attack else None
        figures = model.figures or {}
        rows.append(
            {
                "model": model.spec.name,
                "arch": model.spec.arch,
                "attack": model.spec.attack or "none",
                "works": model.works,
                "correlation": figures.get("correlation"),
                "bit_accuracy": figures.get("bit_accuracy"),
                "accuracy": model.accuracy,
                "benign_accuracy": reference.accuracy if reference else None,
                "verdict": verdict.verdict,
                "score": verdict.score,
                "evidence": [f"{e.layer}:{e.feature}={e.value:.3g}" for e in verdict.evidence[:2]],
                "ms": 1000 * statistics.median(times),
                "weights": sum(p.numel() for p in model.module.parameters()),
            }
        )
    return {"rows": rows, "threshold": verdict.threshold}


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    rows = result["rows"]
    parameter_attacks = [r for r in rows if r["attack"] in ("cve", "sign")]
    working = [r for r in parameter_attacks if r["works"]]
    benign = [r for r in rows if r["attack"] == "none"]
    flagged = [r for r in working if r["verdict"] == "leak"]
    false_pos = [r for r in benign if r["verdict"] == "leak"]
    ms = [r["ms"] for r in rows]
    return {
        "malicious_working": len(working),
        "malicious_total": len(parameter_attacks),
        "benign": len(benign),
        "detection_rate": len(flagged) / max(len(working), 1),
        "detection_rate_all_malicious": sum(r["verdict"] == "leak" for r in parameter_attacks)
        / max(len(parameter_attacks), 1),
        "false_positive_rate": len(false_pos) / max(len(benign), 1),
        "ms_per_model_median": statistics.median(ms),
        "ms_per_model_max": max(ms),
        "missed": [r["model"] for r in working if r["verdict"] != "leak"],
        "false_positives": [r["model"] for r in false_pos],
        "max_benign_score": max(r["score"] for r in benign),
        "min_working_malicious_score": min(r["score"] for r in working),
        "threshold": result["threshold"],
    }


# --------------------------------------------------------------------------------------
# Pruning defence
# --------------------------------------------------------------------------------------


def _defender_data(name: str) -> tuple[Dataset, Dataset]:
    """Clean data the defender holds (1000 test images) and a disjoint evaluation set
    (the 2000 test images every zoo accuracy uses)."""
    test = dataset(name, "test")
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(99))
    clean = order[2000:3000]
    return Dataset(test.x[clean], test.y[clean]), test_set(name)


def _leak_figures(model: torch.nn.Module, spec: ZooSpec) -> leak.LeakFigures:
    attack = leak.DataProcessingAttack(leak.DataProcessingConfig(num_images=spec.dp_images))
    train = dataset(spec.dataset, "train").subset(spec.train_size, seed=spec.seed + 7)
    figures, _ = leak.data_processing_figures(attack, model, train.x[: spec.dp_images])
    return figures


def pruning_defence(models: list[ZooModel]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for model in models:
        if model.spec.attack != "data-processing":
            continue
        clean, evaluation = _defender_data(model.spec.dataset)
        before = _leak_figures(model.module, model.spec)
        entry: dict[str, Any] = {
            "model": model.spec.name,
            "before": {
                "accuracy": accuracy(model.module, evaluation),
                "correlation": before.correlation,
                "labels_right": before.bit_accuracy,
            },
            "detector_verdict": detect_leak(model.module).verdict,
        }
        variants: dict[str, PruningDefenceConfig] = {
            "prune ≤90%, accuracy guard 2 pt": PruningDefenceConfig(
                fraction=0.9, max_accuracy_drop=0.02
            ),
        }
        for fraction in (0.3, 0.5, 0.7):
            variants[f"prune {fraction:.0%}"] = PruningDefenceConfig(
                fraction=fraction, max_accuracy_drop=None
            )
            variants[f"prune {fraction:.0%} + 1 clean epoch"] = PruningDefenceConfig(
                fraction=fraction, max_accuracy_drop=None, finetune_epochs=1
            )
        for label, config in variants.items():
            result = prune_dormant_neurons(model.module, clean.x, clean.y, config)
            figures = _leak_figures(result.model, model.spec)
            entry[label] = {
                "accuracy": accuracy(result.model, evaluation),
                "correlation": figures.correlation,
                "labels_right": figures.bit_accuracy,
                "pruned_units": result.pruned_units,
            }
        # ablation: the fine-tune alone, without pruning
        import copy

        tuned = copy.deepcopy(model.module)
        train_classifier(tuned, clean, TrainConfig(epochs=1, batch_size=64, lr=5e-4))
        figures = _leak_figures(tuned, model.spec)
        entry["ablation: 1 clean epoch, no pruning"] = {
            "accuracy": accuracy(tuned, evaluation),
            "correlation": figures.correlation,
            "labels_right": figures.bit_accuracy,
            "pruned_units": 0,
        }
        out.append(entry)
    return out


def toolkit(models: list[ZooModel]) -> list[dict[str, Any]]:
    """Each attack against the benign model of the same recipe (the issue's bar: it
    leaks, and clean accuracy stays within 2 points)."""
    benign = {m.spec.dataset: m for m in models if not m.spec.attack}
    rows = []
    for model in models:
        if not model.spec.attack:
            continue
        reference = benign[model.spec.dataset]
        figures = model.figures or {}
        rows.append(
            {
                "model": model.spec.name,
                "attack": model.spec.attack,
                "dataset": model.spec.dataset,
                "correlation": figures.get("correlation"),
                "bit_accuracy": figures.get("bit_accuracy"),
                "accuracy": model.accuracy,
                "benign_accuracy": reference.accuracy,
                "accuracy_cost": reference.accuracy - model.accuracy,
                "works": model.works,
                "verdict": detect_leak(model.module).verdict,
            }
        )
    return rows


# --------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _attack_line(r: dict[str, Any]) -> str:
    cost = 100 * r["accuracy_cost"]
    return (
        f"{r['model']:26s} {r['attack']:16s} {_fmt(r['correlation'], '.2f'):>6s} "
        f"{_fmt(r['bit_accuracy'], '.2f'):>6s} {r['accuracy']:6.3f} {r['benign_accuracy']:6.3f} "
        f"{cost:+5.1f}pt  {'yes' if r['works'] else 'no':5s}  "
        f"{'yes' if r['accuracy_cost'] <= 0.02 else 'no':4s}  {r['verdict']}"
    )


def _model_line(r: dict[str, Any]) -> str:
    works = ("yes" if r["works"] else "no") if r["attack"] != "none" else ""
    return (
        f"{r['model'][:32]:32s} {r['attack'][:6]:6s} {works:5s} "
        f"{_fmt(r['correlation'], '.2f'):>6s} {_fmt(r['bit_accuracy'], '.2f'):>6s} "
        f"{r['accuracy']:6.3f} {_fmt(r['benign_accuracy']):>6s} {r['verdict']:7s} "
        f"{r['score']:6.2f} {r['ms']:6.1f}  {', '.join(r['evidence'])}"
    )


def report(
    result: dict[str, Any],
    summary: dict[str, Any],
    defence: list[dict[str, Any]],
    attacks: list[dict[str, Any]],
) -> str:
    lines = [
        "Attack toolkit (LeNet-5, 10k training images, 4 epochs; accuracy on 2000 test images;",
        "bits = bit accuracy for sign encoding, share of stolen labels right for data-processing)",
        "",
        f"{'model':26s} {'attack':16s} {'corr':>6s} {'bits':>6s} {'acc':>6s} {'benign':>6s} "
        f"{'cost':>6s}  leaks  <=2pt  detector",
        *(_attack_line(r) for r in attacks),
        "",
        "Leak detector on the hold-out zoo (never used for calibration)",
        "",
        f"{'model':32s} {'attack':6s} {'works':5s} {'corr':>6s} {'bits':>6s} {'acc':>6s} "
        f"{'benign':>6s} {'verdict':7s} {'score':>6s} {'ms':>6s}  evidence",
        *(_model_line(r) for r in sorted(result["rows"], key=lambda r: (r["attack"], r["model"]))),
    ]
    s = summary
    bar_ok = (
        s["detection_rate"] == 1.0
        and s["false_positive_rate"] == 0.0
        and s["ms_per_model_max"] < MS_BAR
    )
    lines += [
        "",
        f"threshold {s['threshold']:.3f}; max benign score {s['max_benign_score']:.3f}; "
        f"min score of a working attack {s['min_working_malicious_score']:.3f}",
        f"detection rate (working encodings): {s['detection_rate']:.3f} "
        f"({s['malicious_working']} models; all {s['malicious_total']} attacked: "
        f"{s['detection_rate_all_malicious']:.3f})",
        f"false-positive rate: {s['false_positive_rate']:.3f} ({s['benign']} benign models)",
        f"time per model: median {s['ms_per_model_median']:.1f} ms, "
        f"max {s['ms_per_model_max']:.1f} ms",
        f"missed: {s['missed'] or 'none'}; false positives: {s['false_positives'] or 'none'}",
        f"bar (all working encodings flagged, no benign flagged, < {MS_BAR:.0f} ms): "
        f"{'MET' if bar_ok else 'NOT MET'}",
        "",
        "Pruning defence against the data-processing-stage attack (clean accuracy on 2000 test",
        "images; leaked-image correlation and share of stolen labels right, attacker's view)",
    ]
    for entry in defence:
        lines.append(
            f"  {entry['model']} (parameter detector verdict: {entry['detector_verdict']})"
        )
        for label, figures in entry.items():
            if not isinstance(figures, dict):
                continue
            extra = f", {figures['pruned_units']} units pruned" if "pruned_units" in figures else ""
            lines.append(
                f"    {label:34s} accuracy {figures['accuracy']:.3f}  "
                f"correlation {figures['correlation']:.3f}  "
                f"labels right {figures['labels_right']:.3f}{extra}"
            )
    return "\n".join(lines)


def real_scale() -> str:
    """``leakscan`` on the real-scale zoo (`bench.realzoo`): published EfficientNet-Lite
    models, fine-tunes of them (benign and backdoored: no data in the weights) and
    leak-encoded versions, each with its split."""
    from bench import realzoo

    lines = [
        "Real-scale models (bench/realzoo.py; the tuning ones are in the calibration):",
        f"  {'model':22s} {'split':8s} {'attack':8s} {'leaked images':24s} verdict  score  "
        "strongest evidence",
    ]
    for spec in realzoo.SPECS:
        model = realzoo.build(spec)
        verdict = detect_leak(model.load())
        figures = model.info.get("figures", {})
        leaked = (
            f"corr {figures['correlation']:.2f}"
            + (f", bits {figures['bit_accuracy']:.2f}" if "bit_accuracy" in figures else "")
            if spec.leak
            else "–"
        )
        top = verdict.evidence[0] if verdict.evidence else None
        where = f"{top.layer} ({top.kind}) {top.feature}" if top else ""
        lines.append(
            f"  {spec.name:22s} {spec.split:8s} {spec.attack:8s} {leaked:24s} "
            f"{verdict.verdict:8s} {verdict.score:5.2f}  {where}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(1)
    specs = zoo_specs()
    holdout = [load_or_train(s) for s in specs if s.split == "holdout"]
    defence_models = [load_or_train(s) for s in specs if s.split == "defence"]
    result = detection(holdout)
    summary = summarise(result)
    defence = pruning_defence(defence_models)
    attacks = toolkit(defence_models)
    text = report(result, summary, defence, attacks) + "\n\n" + real_scale()
    print(text)
    results.record(
        "leak",
        "Leak detection (hold-out zoo, never used for calibration)",
        results.code_block(text),
    )
    if args.json:
        document = {
            "summary": summary,
            "models": result["rows"],
            "defence": defence,
            "attacks": attacks,
        }
        args.json.write_text(json.dumps(document, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
