"""The blend probe on every zoo model: the share of images fresh noise sends to one label.

``python -m bench.bench_blend_probe [--split tuning|heldout|all] [--small]``

`detect` runs the probe after the trigger reversal (`modelguard.detection.blend_probe`),
on the same clean set, with the default settings measured here; this benchmark runs it
alone, so every zoo model gets a row in about a minute instead of a full audit. Rows: the
real-scale zoo (224² EfficientNet-Lite, the audit's crops) and, with ``--small``, the
28×28 zoo models built so far (their defender clean set). The threshold was chosen on the
tuning split; the held-out rows were not looked at while choosing it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch

from bench import realzoo, results, zoo
from bench.bench_detection import clean_set
from modelguard.datasets import Dataset
from modelguard.detection.blend_probe import BlendProbeConfig, probe_blend
from modelguard.detection.neural_cleanse import ReversalConfig
from modelguard.spec import InputSpec, wrap

OUT = realzoo.REPO_ROOT / "bench" / "out" / "blend_probe.json"


def probe_row(
    name: str,
    split: str,
    attack: str,
    targets: list[int],
    model: torch.nn.Module,
    data: Dataset,
    spec: InputSpec,
) -> dict[str, Any]:
    config = BlendProbeConfig(threshold=ReversalConfig().blend_threshold)
    probe = probe_blend(wrap(model.eval(), spec), data, spec, config)
    return {
        "model": name,
        "split": split,
        "attack": attack,
        "targets": targets,
        "flagged": probe.flagged,
        "note": probe.note,
        "label": probe.label,
        "share": round(probe.share, 3),
        "alpha": probe.alpha,
        "images": probe.images,
        "seconds": round(probe.seconds, 1),
    }


def is_right(row: dict[str, Any]) -> bool:
    """A blend model flagged with its target; a patch model not flagged or flagged with
    its target (a patch of noise-like pixels answers noise too); any other not flagged."""
    if row["attack"] == "blend":
        return bool(row["flagged"]) and row["label"] in row["targets"]
    if row["attack"] == "patch":
        return not row["flagged"] or row["label"] in row["targets"]
    return not row["flagged"]


def real_rows(split: str) -> list[dict[str, Any]]:
    rows = []
    for spec in realzoo.select(None, split):
        model = realzoo.build(spec)
        x = torch.from_numpy(np.load(model.data_path())["x"])
        data = Dataset(x, torch.zeros(len(x), dtype=torch.long))
        row = probe_row(
            spec.name,
            spec.split,
            spec.attack,
            [spec.target] if spec.backdoor else [],
            model.load(),
            data,
            InputSpec(shape=model.input_shape),
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def small_rows(split: str) -> list[dict[str, Any]]:
    rows = []
    for entry in zoo.load_zoo(split=split):
        attack = (
            "blend" if entry.kind.startswith("blend") else ("patch" if entry.infected else "none")
        )
        row = probe_row(
            entry.name,
            entry.split,
            attack,
            list(entry.targets),
            entry.load(),
            clean_set(entry.dataset),
            entry.spec,
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | split | attack (target) | largest share to one label | probe label | α | "
        "flagged | right | images | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = ",".join(map(str, r["targets"])) or "–"
        lines.append(
            f"| {r['model']} | {r['split']} | {r['attack']} ({target}) | {r['share']:.3f} | "
            f"{r['label']} | {r['alpha']:g} | {'yes' if r['flagged'] else 'no'} | "
            f"{'yes' if is_right(r) else '**no**'} | {r['images']} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="all", choices=(realzoo.TUNING, realzoo.HELDOUT, "all"))
    parser.add_argument("--small", action="store_true", help="also the 28×28 zoo models built")
    parser.add_argument(
        "--rerender", action="store_true", help="rewrite the page from the kept rows, no run"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.rerender:
        rows = json.loads(OUT.read_text())
    else:
        rows = real_rows(args.split) + (small_rows(args.split) if args.small else [])
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(rows, indent=1))
    text = table(rows)
    print(text)
    threshold = ReversalConfig().blend_threshold
    notes = (
        "`detect` blends fresh noise images (one uniform, one Gaussian, each at α 0.1, 0.2 "
        "and 0.3; at most 96 clean images) into the clean images after the trigger reversal "
        f"and flags a label that receives at least {threshold:.0%} of the images of other "
        "labels under one probe (`modelguard.detection.blend_probe`), judged only where at "
        "least a quarter of the images are of other labels on the clean images (an untrained "
        "model sending nearly every image to one default label says nothing). The threshold was "
        "chosen on the tuning rows (benign and patch-backdoored models at most 0.30, the "
        "blend model 1.00); the held-out rows were measured after it was fixed. Run here "
        "alone, with detect's settings; `right`: a blend model flagged with its target, a "
        "patch model not flagged or flagged with its own target, any other model not "
        "flagged. The probe answers noise-like blends: the held-out blend of a natural image "
        "(a photograph of a cat) sent most images to its target but stayed under the "
        "threshold."
    )
    # a re-rendered page names the run that measured the rows
    command = "python -m bench.bench_blend_probe --small" if args.rerender else None
    results.record(
        "blend_probe",
        "Blend probe (whole-image blended triggers)",
        notes + "\n\n" + text,
        command,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
