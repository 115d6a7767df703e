"""Detection quality of the batched trigger reversal over the model zoo.

``python -m bench.bench_detection [--seeds 0,1,2] [--rule modelguard|paper|both]
[--split heldout|tuning|all] [--restarts N] [--models a,b]``

By default both rules run, side by side, on the zoo's held-out split (models no rule was
chosen on); the full run writes its section of the results page (``docs/benchmarks.md``).

Per model and seed: verdict, flagged labels with their anomaly index, true targets, the
largest index among the other labels below the median, correct or not. A clean model is
correct when nothing is flagged; an infected one when exactly its targets are flagged
(``found``: every target is among the flagged labels). A last column shows, as a
diagnostic only, what the same MAD test would flag on the other scale (the decision's
scale: the rule's, or ``--norm-scale``; under the default rule the diagnostic is the
linear MAD test on the same screening norms). ``--rule paper`` runs Neural Cleanse's
original test (``ReversalConfig.paper()``), the same preset as ``modelguard detect``. Bars
(from the issue): every patch-trigger model flagged with the right target, no clean model
flagged; blended and two-target results are reported as they are. Several seeds show
repeatability.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch

from bench import results
from bench.zoo import HELDOUT, SPLITS, ZooEntry, load_zoo
from modelguard.datasets import REPO_ROOT, load_named
from modelguard.detection.mad import mad_test
from modelguard.detection.neural_cleanse import (
    MODELGUARD,
    RULES,
    ReversalConfig,
    ReversalResult,
    reverse_triggers,
)
from modelguard.detection.optimizer import MASK_STARTS

OUT = REPO_ROOT / "bench" / "out"
BOTH = "both"
CLEAN_IMAGES = 1000


def clean_set(dataset: str, count: int = CLEAN_IMAGES) -> Any:
    """The defender's small clean set: a fixed subset of the test split."""
    return load_named(dataset, "test").subset(count, seed=0)


def evaluate(entry: ZooEntry, result: ReversalResult, other_scale: str) -> dict[str, Any]:
    targets = set(entry.targets)
    flagged = set(result.flagged)
    others = [
        r.anomaly_index
        for r in result.labels
        if r.label not in targets
        and not math.isnan(r.anomaly_index)
        and r.l1_norm < _median(result)
    ]
    correct = flagged == targets
    # diagnostic only (not the decision): the same MAD test on the other scale
    log_mad = mad_test(
        [None if math.isnan(r.l1_norm) else r.l1_norm for r in result.labels], scale=other_scale
    )
    log_flagged = set(log_mad.flagged)
    return {
        "model": entry.name,
        "kind": entry.kind,
        "targets": sorted(targets),
        "verdict": result.verdict,
        "flagged": sorted(flagged),
        "flagged_index": {k: result.labels[k].anomaly_index for k in sorted(flagged)},
        "target_index": {k: result.labels[k].anomaly_index for k in sorted(targets)},
        "max_other_index": max(others, default=0.0),
        "found": targets <= flagged if targets else not flagged,
        "correct": correct,
        "log_flagged": sorted(log_flagged),
        "log_target_index": {k: log_mad.anomaly_index[k] for k in sorted(targets)},
        "log_found": targets <= log_flagged if targets else not log_flagged,
        "log_correct": log_flagged == targets,
        "seconds": result.seconds,
        "evaluations": result.evaluations,
    }


def _median(result: ReversalResult) -> float:
    value = result.evidence.get("median_norm")
    return float(value) if isinstance(value, (int, float)) else math.inf


def _fmt_index(values: dict[int, float]) -> str:
    return ",".join(f"{k}:{v:.2f}" for k, v in values.items()) or "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument(
        "--rule",
        choices=(*RULES, BOTH),
        default=BOTH,
        help="decision rule (default both: this project's and Neural Cleanse's, side by side)",
    )
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default=HELDOUT,
        help="zoo split (default heldout: the models no rule was chosen on)",
    )
    parser.add_argument("--restarts", type=int, help="screening runs at most (default: rule's)")
    parser.add_argument("--models", default="", help="comma-separated zoo names (default all)")
    parser.add_argument("--images", type=int, default=CLEAN_IMAGES)
    parser.add_argument("--norm-scale", choices=("log", "linear"), help="default: rule's")
    parser.add_argument("--mask-start", choices=MASK_STARTS, help="default: rule's")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.restarts is not None:
        overrides["restarts"] = args.restarts
    if args.norm_scale is not None:
        overrides["norm_scale"] = args.norm_scale
    if args.mask_start is not None:
        overrides["mask_start"] = args.mask_start
    rules = list(RULES) if args.rule == BOTH else [args.rule]
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    wanted = {m for m in args.models.split(",") if m}
    entries = [
        e for e in load_zoo(build_missing=True, split=args.split) if not wanted or e.name in wanted
    ]
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    summaries: dict[str, dict[str, Any]] = {}
    printed: list[str] = []
    for rule in rules:
        scale = ReversalConfig.for_rule(rule, **overrides).norm_scale
        other = "linear" if scale == "log" else "log"
        header = (
            f"{'model':32} {'kind':10} {'seed':>4} {'targets':>7} {'flagged (index)':>22} "
            f"{'target idx':>12} {'max other':>9} {'ok':>3} {'s':>6} | {other + '-MAD flags':>13}"
        )
        lines = [f"rule {rule} ({args.split} split)", header, "-" * len(header)]
        print("\n".join(lines), flush=True)
        rule_rows = []
        for entry in entries:
            model = entry.load()
            data = clean_set(entry.dataset, args.images)
            for seed in seeds:
                config = ReversalConfig.for_rule(rule, seed=seed, **overrides)
                result = reverse_triggers(model, data, entry.spec, config)
                row = evaluate(entry, result, other) | {"seed": seed, "rule": rule}
                rule_rows.append(row)
                targets = ",".join(map(str, row["targets"])) or "-"
                line = (
                    f"{entry.name:32} {entry.kind:10} {seed:>4} {targets:>7} "
                    f"{_fmt_index(row['flagged_index']):>22} "
                    f"{_fmt_index(row['target_index']):>12} "
                    f"{row['max_other_index']:9.2f} {'yes' if row['correct'] else 'NO':>3} "
                    f"{row['seconds']:6.1f} | {','.join(map(str, row['log_flagged'])) or '-':>13}"
                )
                lines.append(line)
                print(line, flush=True)
        summary = summarise(rule_rows, other)
        summaries[rule] = summary
        rows += rule_rows
        lines += ["", *summary["lines"]]
        print("\n".join(["", *summary["lines"]]), flush=True)
        printed.append("\n".join(lines))
    print(f"\n{len(rows)} scans in {time.perf_counter() - started:.0f} s")
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "detection.json"
    path.write_text(
        json.dumps(
            {"split": args.split, "rules": rules, "rows": rows, "summary": summaries},
            indent=2,
            default=str,
        )
    )
    print(f"(details in {path.relative_to(REPO_ROOT)})")
    # the page reports the held-out split only, with the rule's own settings
    if not wanted and args.split == HELDOUT and not overrides:
        results.record(
            "detection",
            f"Backdoor detection ({args.split} split)",
            f"{len(entries)} models × seeds {args.seeds}, {args.images} clean images each. "
            "`modelguard` is what `modelguard detect` runs; `paper` is Neural Cleanse's "
            "original test (`--rule paper`). Bars (this project's rule): every patch "
            "model's target flagged, no clean model flagged.\n\n"
            + "\n\n".join(results.code_block(text) for text in printed),
        )
    decisive = summaries.get(MODELGUARD) or next(iter(summaries.values()))
    return 0 if decisive["bars_met"] else 1


def summarise(rows: list[dict[str, Any]], other: str = "linear") -> dict[str, Any]:
    def share(kind: str, key: str) -> tuple[int, int]:
        chosen = [r for r in rows if r["kind"] == kind]
        return sum(bool(r[key]) for r in chosen), len(chosen)

    lines = []
    patch_ok, patch_n = share("patch", "correct")
    patch_found, _ = share("patch", "found")
    clean_ok, clean_n = share("clean", "correct")
    blend_ok, blend_n = share("blend", "correct")
    two_ok, two_n = share("two-target", "correct")
    two_found, _ = share("two-target", "found")
    lines.append(
        f"patch triggers: {patch_ok}/{patch_n} exactly right "
        f"({patch_found}/{patch_n} with the target among the flagged labels)"
    )
    lines.append(f"clean models:   {clean_ok}/{clean_n} not flagged")
    lines.append(f"blended:        {blend_ok}/{blend_n} exactly right")
    lines.append(f"two-target:     {two_ok}/{two_n} exactly right ({two_found}/{two_n} both found)")
    log_patch, _ = share("patch", "log_found")
    log_clean, _ = share("clean", "log_correct")
    log_blend, _ = share("blend", "log_correct")
    log_two, _ = share("two-target", "log_found")
    lines.append(
        f"(diagnostic, not the decision: the MAD test on {other} norms would find {log_patch}/"
        f"{patch_n} patch targets, {log_blend}/{blend_n} blends, {log_two}/{two_n} two-target "
        f"pairs, and leave {log_clean}/{clean_n} clean models unflagged)"
    )
    bars = patch_found == patch_n and clean_ok == clean_n
    lines.append(
        "BARS MET (every patch model's target flagged, no clean model flagged)"
        if bars
        else "BARS NOT MET"
    )
    return {"lines": lines, "bars_met": bars}


if __name__ == "__main__":
    raise SystemExit(main())
