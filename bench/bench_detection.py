"""Detection quality of the batched trigger reversal over the model zoo.

``python -m bench.bench_detection [--seeds 0,1,2] [--restarts N] [--models a,b]``

Per model and seed: verdict, flagged labels with their anomaly index, true targets, the
largest index among the other labels, correct or not. A clean model is correct when
nothing is flagged; an infected one when exactly its targets are flagged (``found`` also
lists whether every target was among the flagged labels). Bars (from the issue): every
patch-trigger model flagged with the right target, no clean model flagged; blended and
two-target results are reported as they are. Several seeds show repeatability.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch

from bench.zoo import ZooEntry, load_zoo
from services.trigger_reversal.core import ReversalConfig, ReversalResult, reverse_triggers
from shared.datasets import REPO_ROOT, load_named

OUT = REPO_ROOT / "bench" / "out"
CLEAN_IMAGES = 1000


def clean_set(dataset: str, count: int = CLEAN_IMAGES) -> Any:
    """The defender's small clean set: a fixed subset of the test split."""
    return load_named(dataset, "test").subset(count, seed=0)


def evaluate(entry: ZooEntry, result: ReversalResult) -> dict[str, Any]:
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
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--models", default="", help="comma-separated zoo names (default all)")
    parser.add_argument("--images", type=int, default=CLEAN_IMAGES)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    wanted = {m for m in args.models.split(",") if m}
    entries = [e for e in load_zoo(build_missing=True) if not wanted or e.name in wanted]
    rows: list[dict[str, Any]] = []
    header = (
        f"{'model':32} {'kind':10} {'seed':>4} {'targets':>7} {'flagged (index)':>22} "
        f"{'target idx':>12} {'max other':>9} {'ok':>3} {'s':>6}"
    )
    print(header)
    print("-" * len(header))
    started = time.perf_counter()
    for entry in entries:
        model = entry.load()
        data = clean_set(entry.dataset, args.images)
        for seed in seeds:
            config = ReversalConfig(seed=seed, restarts=args.restarts)
            result = reverse_triggers(model, data, entry.spec, config)
            row = evaluate(entry, result) | {"seed": seed}
            rows.append(row)
            targets = ",".join(map(str, row["targets"])) or "-"
            print(
                f"{entry.name:32} {entry.kind:10} {seed:>4} {targets:>7} "
                f"{_fmt_index(row['flagged_index']):>22} {_fmt_index(row['target_index']):>12} "
                f"{row['max_other_index']:9.2f} {'yes' if row['correct'] else 'NO':>3} "
                f"{row['seconds']:6.1f}",
                flush=True,
            )
    print(f"\n{len(rows)} scans in {time.perf_counter() - started:.0f} s")
    summary = summarise(rows)
    for line in summary["lines"]:
        print(line)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "detection.json"
    path.write_text(json.dumps({"rows": rows, "summary": summary}, indent=2, default=str))
    print(f"(details in {path.relative_to(REPO_ROOT)})")
    return 0 if summary["bars_met"] else 1


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
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
    bars = patch_found == patch_n and clean_ok == clean_n
    lines.append(
        "BARS MET (every patch model's target flagged, no clean model flagged)"
        if bars
        else "BARS NOT MET"
    )
    return {"lines": lines, "bars_met": bars}


if __name__ == "__main__":
    raise SystemExit(main())
