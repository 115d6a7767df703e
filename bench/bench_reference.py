"""Natural and planted triggers compared with the published parent (`detect --reference`).

``python -m bench.bench_reference [--split tuning|heldout|all] [--only NAME ...]``

For every real-scale zoo model made by fine-tuning a published EfficientNet-Lite (the
benign fine-tune and the backdoored ones), the trigger reversal runs as `detect` runs it
(the service's plan, default settings); then *every* label it optimised, flagged or not,
has its reversed trigger stamped on the clean images and fed to the submitted model and to
the published parent (`modelguard.detection.reference`). A planted target's trigger is a
*planted* row; every other label's is a *natural* one (the fine-tunes plant one target
each). The rule `detect --reference` applies to flagged labels (inherited when the parent
follows the trigger at least `INHERITED_MIN_RATIO` as often) was chosen on the tuning rows;
the held-out models are measured by ``bench.bench_realscale --against-parent``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import numpy as np
import torch

from bench import realzoo, results
from bench.bench_realscale import parent
from modelguard.config import TriggerReversalSettings
from modelguard.datasets import Dataset
from modelguard.detection.neural_cleanse import ReversalResult
from modelguard.detection.reference import INHERITED_MIN_RATIO, compare_with_reference
from modelguard.services.trigger_reversal.service import reversal_plan
from modelguard.spec import InputSpec

OUT = realzoo.REPO_ROOT / "bench" / "out" / "reference.json"

#: The zoo's attacks made by fine-tuning a published model.
FINE_TUNED = ("finetune", "patch", "blend")


def model_rows(model: realzoo.RealModel) -> list[dict[str, Any]]:
    """One row per label the reversal optimised on ``model``."""
    spec = model.spec
    loaded = np.load(model.data_path())
    data = Dataset(torch.from_numpy(loaded["x"]).float(), torch.from_numpy(loaded["y"]).long())
    input_spec = InputSpec((3, model.side, model.side), (0.0, 1.0))
    plan = reversal_plan(data, TriggerReversalSettings())
    submitted = model.load()
    started = time.perf_counter()
    result = plan.detector.detect(submitted, plan.data, input_spec, plan.config)
    seconds = time.perf_counter() - started
    assert isinstance(result, ReversalResult)
    every = dataclasses.replace(result, flagged=result.labels_with_triggers)
    comparison = compare_with_reference(every, submitted, parent(model).load(), data, input_spec)
    norms = {r.label: r.l1_norm for r in result.labels if r.optimised}
    return [
        {
            "model": spec.name,
            "split": spec.split,
            "label": c.label,
            "kind": "planted" if spec.backdoor and c.label == spec.target else "natural",
            "flagged": c.label in result.flagged,
            "verdict": result.verdict,
            "submitted": c.submitted_success,
            "reference": c.reference_success,
            "ratio": c.reference_success / c.submitted_success if c.submitted_success else None,
            "l1": norms.get(c.label),
            "detect_seconds": seconds,
            "commit": results.STARTED_ON,
        }
        for c in comparison.labels
    ]


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | split | label | kind | flagged | submitted follows | parent follows | "
        "ratio | trigger L1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}"
        l1 = "–" if r["l1"] is None else f"{r['l1']:.0f}"
        lines.append(
            f"| {r['model']} | {r['split']} | {r['label']} | {r['kind']} | "
            f"{'yes' if r['flagged'] else 'no'} | {r['submitted']:.2f} | {r['reference']:.2f} | "
            f"{ratio} | {l1} |"
        )
    return "\n".join(lines)


def extremes(rows: list[dict[str, Any]]) -> str:
    """The smallest natural and the largest planted ratio, per split."""
    parts = []
    for split in (realzoo.TUNING, realzoo.HELDOUT):
        ratios = {
            kind: [r["ratio"] for r in rows if r["split"] == split and r["kind"] == kind]
            for kind in ("natural", "planted")
        }
        natural = [v for v in ratios["natural"] if v is not None]
        planted = [v for v in ratios["planted"] if v is not None]
        if not natural and not planted:
            continue
        lowest = f"at least {min(natural):.2f} over {len(natural)}" if natural else "none"
        highest = f"at most {max(planted):.2f} over {len(planted)}" if planted else "none"
        parts.append(f"{split}: natural triggers' ratio {lowest}, planted {highest}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    splits = (realzoo.TUNING, realzoo.HELDOUT, "all")
    parser.add_argument("--split", default=realzoo.TUNING, choices=splits)
    parser.add_argument("--only", nargs="*", default=[])
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for spec in realzoo.select(args.only or None, args.split):
        if spec.attack not in FINE_TUNED:
            continue
        new = model_rows(realzoo.build(spec))
        for row in new:
            print(json.dumps(row), flush=True)
        rows += new
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(rows, indent=1))
    write_page(rows)
    return 0


def write_page(rows: list[dict[str, Any]], command: str | None = None) -> None:
    """The results page's section for ``rows`` (``command``: the run that measured them,
    when not this process)."""
    text = table(rows)
    print(text)
    print(extremes(rows))
    notes = (
        "Every label the trigger reversal optimised on a fine-tuned zoo model (detect's "
        "settings: the triage's likeliest targets and labels at random), its reversed "
        "trigger stamped on the model's clean images: the share of the images of other "
        "labels sent to the label by the submitted model and by the published model it was "
        "fine-tuned from, and their ratio. `planted`: the fine-tune's backdoor target; "
        "`natural`: every other label. `detect --reference` sets a flagged label aside as "
        f"inherited when the ratio is at least {INHERITED_MIN_RATIO:g}, chosen on these "
        f"tuning rows. {extremes(rows)}."
    )
    commits = sorted({str(r.get("commit", "?"))[:12] for r in rows})
    results.record(
        "reference",
        "Reference comparison (natural and planted triggers on the published parent)",
        f"{notes} Rows measured on commit {', '.join(commits)}.\n\n{text}",
        command,
    )


if __name__ == "__main__":
    raise SystemExit(main())
