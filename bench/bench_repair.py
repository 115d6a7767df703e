"""Repair benchmark: ``python -m bench.bench_repair [--ensure] [--models NAME ...]``.

For every infected model of the zoo (`bench.zoo`): the defender gets 5% of the training
set (3,000 samples) as clean data, reverses the triggers with the trigger-reversal core
(Neural Cleanse), and repairs with each mode (rollback pruning, Shapley pruning, the
Fine-Pruning baseline). The *real* trigger, which no repair sees, grades the result on
the full clean test set: attack success rate and clean accuracy before and after, with
the fraction of the layer pruned, model evaluations and wall time.

Bar (from the issue): ASR < 10% and a clean-accuracy drop of at most 3 points on every
patch-trigger model for the rollback and Shapley modes. Blended and two-target models are
reported as they are. ``--ablation`` adds a rollback run whose fine-tunes use clean data
only (no reversed-trigger unlearning), to show what pruning alone achieves.

Writes ``bench/out/repair.json`` and ``bench/out/repair.md``; exits 1 when the bar is not
met. Reversals are cached in ``.cache/repairzoo/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import results
from bench.zoo import HELDOUT, SPLITS, ZooEntry, build_model, ensure_model, load_zoo, zoo_specs
from modelguard.attacks.backdoor import attack_success_rate
from modelguard.datasets import REPO_ROOT, Dataset, load_named
from modelguard.detection.triggers import ReversedTrigger
from modelguard.nn.training import accuracy
from modelguard.repair.context import RepairContext, copy_model
from modelguard.repair.fine_pruning import FinePruningConfig
from modelguard.repair.registry import repair
from modelguard.repair.result import RepairResult
from modelguard.repair.rollback import RollbackConfig
from modelguard.repair.shapley_prune import ShapleyPruneConfig
from modelguard.spec import wrap

log = logging.getLogger("bench.repair")

OUT = REPO_ROOT / "bench" / "out"
CACHE = REPO_ROOT / ".cache" / "repairzoo"
CLEAN_FRACTION = 0.05
ASR_BAR = 0.10
DROP_BAR = 0.03
BAR_MODES = ("rollback", "shapley")
SUSPECT_THRESHOLD = 1.0


@dataclass
class Row:
    model: str
    kind: str
    arch: str
    mode: str
    flagged: list[int]
    asr_before: float
    asr_after: float
    acc_before: float
    acc_after: float
    reversed_before: float
    reversed_after: float
    pruned: int
    neurons: int
    layer: str
    evaluations: int
    seconds: float
    reversal_seconds: float
    notes: list[str]
    detected: bool = True

    @property
    def drop(self) -> float:
        return self.acc_before - self.acc_after

    @property
    def meets_bar(self) -> bool:
        return self.asr_after < ASR_BAR and self.drop <= DROP_BAR


def real_asr(model: nn.Module, entry: ZooEntry, test: Dataset) -> float:
    """Max over the model's real triggers (the attack works if any trigger works)."""
    wrapped = wrap(model, entry.spec)
    rates = [
        attack_success_rate(wrapped, test, t, value_range=entry.spec.value_range)
        for t in entry.triggers
    ]
    return max(rates)


def reversed_triggers(
    entry: ZooEntry, model: nn.Module, clean: Dataset, steps: int
) -> tuple[list[ReversedTrigger], float, dict[str, Any]]:
    """Neural Cleanse on the defender's clean data (cached per model and budget)."""
    from modelguard.detection.neural_cleanse import ReversalConfig, reverse_triggers

    CACHE.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(entry.path.read_bytes()).hexdigest()[:12]
    extra = {"steps": steps} if steps else {}
    config = ReversalConfig(seed=0, suspect_threshold=SUSPECT_THRESHOLD, **extra)
    # the cache is keyed by the model and the whole reversal config (defaults change)
    settings = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()
    path = CACHE / f"reversal-{entry.name}-{digest}-{settings[:10]}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        flagged = [int(v) for v in saved["flagged"]]
        seconds = float(saved["seconds"])
        masks, patterns = saved["masks"], saved["patterns"]
        summary = json.loads(path.with_suffix(".json").read_text())
    else:
        # the decision (anomaly index > 2) is the pipeline's; refining labels from index 1
        # on only gives the fallback below refined triggers to work with
        result = reverse_triggers(model, clean, entry.spec, config)
        flagged = list(result.flagged)
        seconds = result.seconds
        masks, patterns = result.masks, result.patterns
        summary = result.to_dict()
        torch.save(
            {
                "flagged": torch.tensor(flagged, dtype=torch.long),
                "seconds": torch.tensor(seconds),
                "masks": masks,
                "patterns": patterns,
            },
            path,
        )
        path.with_suffix(".json").write_text(json.dumps(summary, default=str))
    summary["repair_labels"] = flagged
    if not flagged:
        # the pipeline would not repair an unflagged model; the benchmark of the *repair*
        # still runs, against the reversal's suspects (else its smallest trigger), and says so
        labels = summary.get("labels", [])
        if summary.get("suspects"):
            flagged = [int(k) for k in summary["suspects"]]
            how = "the reversal's suspects"
        elif labels:
            flagged = [int(min(labels, key=lambda r: r["l1_norm"])["label"])]
            how = "the label of the smallest reversed trigger (unrefined)"
        summary["repair_labels"] = flagged
        if flagged:
            summary["fallback"] = f"no label flagged: repaired against {how} {flagged}"
    triggers = [ReversedTrigger(k, masks[k], patterns[k]) for k in flagged]
    return triggers, seconds, summary


def configs(fast: bool) -> dict[str, Any]:
    rollback = RollbackConfig()
    shapley = ShapleyPruneConfig()
    if fast:
        rollback = replace(rollback, passes=1)
        shapley = replace(shapley, shapley=replace(shapley.shapley, max_evaluations=3000))
    return {
        "rollback": rollback,
        "shapley": shapley,
        "fine-pruning": FinePruningConfig(),
        "rollback-clean-ft": replace(
            rollback, finetune=replace(rollback.finetune, unlearn_fraction=0.0)
        ),
    }


def finetune_only(
    model: nn.Module,
    clean: Dataset,
    entry: ZooEntry,
    triggers: list[ReversedTrigger],
    config: RollbackConfig,
) -> RepairResult:
    """Ablation: the rollback mode's final fine-tune (with reversed-trigger unlearning)
    and no pruning at all."""
    started = time.perf_counter()
    context = RepairContext.build(
        copy_model(model),
        clean,
        entry.spec,
        triggers,
        layer=None,
        validation_fraction=config.validation_fraction,
        attack_samples=config.attack_samples,
        val_samples=config.val_samples,
        finetune=config.finetune,
        seed=config.seed,
        progress=None,
    )
    before = context.measure()
    after = context.final_fine_tune(revival=config.asr_stop)
    return RepairResult(
        mode="finetune-only",
        layer=context.probe.info.name,
        target_labels=list(context.attack.labels),
        pruned=[],
        before=before,
        after=after,
        curve=[],
        evaluations=context.evaluations,
        seconds=time.perf_counter() - started,
        neurons=context.probe.neurons,
        model=context.model,
        notes=context.notes,
    )


def run(args: argparse.Namespace) -> list[Row]:
    torch.set_num_threads(1)
    if args.ensure:
        wanted = args.models or [s.name for s in zoo_specs(args.split) if s.triggers]
        entries = [ensure_model(name) for name in wanted]
    elif args.build_missing:
        # infected models only (their clean twins are not needed here)
        present = {e.name for e in load_zoo()}
        for spec in zoo_specs(args.split):
            if (
                spec.triggers
                and spec.name not in present
                and (not args.models or spec.name in args.models)
            ):
                log.info("training zoo model %s", spec.name)
                build_model(spec)
        entries = [e for e in load_zoo(split=args.split) if e.infected]
        if args.models:
            entries = [e for e in entries if e.name in args.models]
    else:
        entries = [e for e in load_zoo(split=args.split) if e.infected]
        if args.models:
            entries = [e for e in entries if e.name in args.models]
    if not entries:
        raise SystemExit("no infected zoo model found: run `make zoo` or pass --ensure")
    modes = list(args.modes) + (["rollback-clean-ft", "finetune-only"] if args.ablation else [])
    mode_configs = configs(args.fast)
    rows: list[Row] = []
    datasets: dict[str, tuple[Dataset, Dataset]] = {}
    for entry in entries:
        if entry.dataset not in datasets:
            datasets[entry.dataset] = (
                load_named(entry.dataset, "train"),
                load_named(entry.dataset, "test"),
            )
        train, test = datasets[entry.dataset]
        clean = train.subset(int(CLEAN_FRACTION * len(train)), seed=1234)
        try:
            model = entry.load()
            digest_ok = entry.path.exists()
        except FileNotFoundError:
            digest_ok = False
        if not digest_ok:  # the zoo is being rebuilt under us
            log.warning("%s disappeared from the zoo; skipped", entry.name)
            continue
        acc_before = accuracy(wrap(model, entry.spec), test)
        asr_before = real_asr(model, entry, test)
        triggers, reversal_seconds, summary = reversed_triggers(entry, model, clean, args.steps)
        flagged = [t.label for t in triggers]
        fallback = [summary["fallback"]] if "fallback" in summary else []
        log.info("%s: flagged %s (true targets %s)", entry.name, flagged, list(entry.targets))
        for mode in modes:
            if not triggers:
                rows.append(
                    Row(
                        entry.name,
                        entry.kind,
                        entry.arch,
                        mode,
                        [],
                        asr_before,
                        asr_before,
                        acc_before,
                        acc_before,
                        float("nan"),
                        float("nan"),
                        0,
                        0,
                        "",
                        0,
                        0.0,
                        reversal_seconds,
                        ["no label flagged by the reversal: not repaired"],
                    )
                )
                continue
            started = time.perf_counter()
            config = mode_configs["rollback" if mode == "finetune-only" else mode]
            if mode == "finetune-only":
                result = finetune_only(model, clean, entry, triggers, config)
            else:
                base_mode = "rollback" if mode == "rollback-clean-ft" else mode
                result = repair(model, clean, entry.spec, triggers, mode=base_mode, config=config)
            seconds = time.perf_counter() - started
            assert result.model is not None
            row = Row(
                model=entry.name,
                kind=entry.kind,
                arch=entry.arch,
                mode=mode,
                flagged=flagged,
                asr_before=asr_before,
                asr_after=real_asr(result.model, entry, test),
                acc_before=acc_before,
                acc_after=accuracy(wrap(result.model, entry.spec), test),
                reversed_before=result.before.reversed_asr,
                reversed_after=result.after.reversed_asr,
                pruned=len(result.pruned),
                neurons=result.neurons,
                layer=result.layer,
                evaluations=result.evaluations,
                seconds=seconds,
                reversal_seconds=reversal_seconds,
                notes=fallback + result.notes,
                detected=not fallback,
            )
            rows.append(row)
            print(line(row), flush=True)
    return rows


HEADER = (
    f"{'model':32} {'mode':17} {'flagged':8} {'ASR before':>10} {'ASR after':>9} "
    f"{'acc before':>10} {'acc after':>9} {'drop':>6} {'pruned':>12} {'evals':>7} "
    f"{'repair s':>8} {'NC s':>6}"
)


def line(row: Row) -> str:
    pruned = f"{row.pruned}/{row.neurons} {row.pruned / row.neurons:.0%}" if row.neurons else "-"
    labels = ",".join(map(str, row.flagged)) or "-"
    if not row.detected:
        labels += "*"
    return (
        f"{row.model:32} {row.mode:17} {labels:8} "
        f"{row.asr_before:10.4f} {row.asr_after:9.4f} {row.acc_before:10.4f} "
        f"{row.acc_after:9.4f} {row.drop * 100:+6.2f} {pruned:>12} {row.evaluations:7d} "
        f"{row.seconds:8.1f} {row.reversal_seconds:6.1f}"
    )


def bar_problems(rows: list[Row]) -> list[str]:
    problems = []
    for row in rows:
        if row.kind == "patch" and row.mode in BAR_MODES and not row.meets_bar:
            problems.append(
                f"{row.model} [{row.mode}]: ASR {row.asr_after:.4f} (bar < {ASR_BAR}), "
                f"accuracy drop {row.drop * 100:.2f} points (bar <= {DROP_BAR * 100:.0f})"
            )
    return problems


def write(rows: list[Row], problems: list[str], path: Path, split: str = HELDOUT) -> None:
    path.mkdir(parents=True, exist_ok=True)
    document = {
        "split": split,
        "bar": {"asr_below": ASR_BAR, "max_accuracy_drop": DROP_BAR, "modes": BAR_MODES},
        "clean_fraction": CLEAN_FRACTION,
        "rows": [
            {
                **row.__dict__,
                "drop": row.drop,
                "pruned_fraction": row.pruned / row.neurons if row.neurons else 0.0,
                "meets_bar": row.meets_bar,
            }
            for row in rows
        ],
        "bar_problems": problems,
    }
    (path / "repair.json").write_text(json.dumps(document, indent=2, default=str))
    lines = [
        "# Repair benchmark",
        "",
        f"Zoo split: {split}.",
        "",
        "```",
        HEADER,
        *[line(r) for r in rows],
        "```",
        "",
    ]
    lines += [
        "`*`: no label flagged by the reversal; repaired against its suspects, or else the "
        "label of its smallest trigger (see notes in repair.json).",
        "",
    ]
    lines += [f"- BAR NOT MET: {p}" for p in problems] or ["- bar met on every patch model"]
    (path / "repair.md").write_text("\n".join(lines) + "\n")
    if path == OUT:  # smoke runs to another folder leave the results page alone
        results.record("repair", f"Repair ({split} split)", "\n".join(lines[2:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=[], help="only these zoo models")
    parser.add_argument(
        "--modes",
        nargs="*",
        default=["rollback", "shapley", "fine-pruning"],
        choices=["rollback", "shapley", "fine-pruning"],
    )
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default=HELDOUT,
        help="zoo split (default heldout: the models no rule was chosen on)",
    )
    parser.add_argument("--ensure", action="store_true", help="train missing zoo models")
    parser.add_argument(
        "--build-missing",
        action="store_true",
        help="train missing infected zoo models (not their clean twins)",
    )
    parser.add_argument(
        "--ablation", action="store_true", help="add rollback with clean-only fine-tuning"
    )
    parser.add_argument("--fast", action="store_true", help="smaller budgets (smoke runs)")
    parser.add_argument(
        "--steps", type=int, default=0, help="Neural Cleanse steps per label (0: its default)"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(HEADER, flush=True)
    rows = run(args)
    problems = bar_problems(rows)
    write(rows, problems, args.out, args.split)
    for problem in problems:
        print("BAR NOT MET:", problem)
    if not problems:
        print(
            "bar met: ASR < 10% and accuracy drop <= 3 points on every patch model "
            f"({', '.join(BAR_MODES)})"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
