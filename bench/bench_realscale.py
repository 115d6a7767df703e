"""Real-scale benchmark: ``python -m bench.bench_realscale [--split heldout|tuning|all]
[--only NAME …] [--skip-repair]`` (part of ``make bench``).

For every model of the real-scale zoo (`bench.realzoo`: published EfficientNet-Lite
classifiers, 1000 classes, 224²–260² inputs, and versions backdoored or leak-encoded by a
supply-chain attacker) it runs the ``modelguard`` commands exactly as a user would — one
process per command, the TorchScript file and the audit crops as files, default settings —
and records for each:

* ``detect``: wall time and peak RSS of the process (``/usr/bin/time``-style, from
  ``resource.getrusage`` of the child), the verdict, the flagged labels against the
  planted target;
* ``leakscan``: verdict and score;
* ``repair`` (backdoored models): the real trigger's attack success and the agreement with
  the published model on the evaluation crops (never seen by the audit), before and after.

The bars (issue): ``detect`` under 10 minutes and 4 GB peak RSS on a 1000-class model of
EfficientNet-Lite0's size; backdoored models flagged with their target; published models
neither flagged by ``detect`` nor by ``leakscan``; ``repair`` below 10% ASR with at most 3
points of agreement lost. Which split a model belongs to is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench import realzoo, results
from modelguard.attacks.backdoor import stamp

BARS = {"seconds": 600.0, "rss_gb": 4.0, "asr": 0.10, "agreement_drop": 0.03}


def run(command: list[str]) -> tuple[dict[str, Any], float, float]:
    """Run a ``modelguard`` command in its own process: its JSON output, wall seconds and
    peak RSS in GB (the child's own, from ``wait4``)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "modelguard.services.cli", *command],
            stdout=out,
            stderr=err,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed: {stderr[-2000:]}")
    return json.loads(stdout), seconds, usage.ru_maxrss / 2**20


def spec_args(model: realzoo.RealModel) -> list[str]:
    side = model.side
    return ["--input-shape", f"3,{side},{side}", "--value-range", "0,1"]


def evaluate(model: realzoo.RealModel, module: torch.nn.Module) -> dict[str, float]:
    published = realzoo.load_efficientnet_lite(model.spec.variant).module.eval()
    x = realzoo.crops(realzoo.EVAL_VARIANTS, model.side, seed=2, jitter=False)
    reference = realzoo.predictions(published, x)
    out = {"agreement": float((realzoo.predictions(module, x) == reference).float().mean())}
    if model.spec.backdoor:
        keep = reference != model.spec.target
        stamped = stamp(x[keep], model.spec.trigger(model.side))
        out["asr"] = float(
            (realzoo.predictions(module, stamped) == model.spec.target).float().mean()
        )
    return out


def bench_model(model: realzoo.RealModel, repair: bool, workdir: Path) -> dict[str, Any]:
    spec = model.spec
    row: dict[str, Any] = {"model": spec.name, "split": spec.split, "attack": spec.attack}
    data = str(model.data_path())
    detected, seconds, rss = run(
        ["detect", str(model.path), "--data", data, *spec_args(model), "--json"]
    )
    row.update(
        detect_verdict=detected["verdict"],
        flagged=detected["flagged"],
        target=spec.target if spec.backdoor else None,
        detect_seconds=seconds,
        detect_rss_gb=rss,
        labels_optimised=detected["evidence"].get("labels_optimised"),
    )
    leak, leak_seconds, _ = run(["leakscan", str(model.path), "--json"])
    row.update(leak_verdict=leak["verdict"], leak_score=leak["score"], leak_seconds=leak_seconds)
    if repair and spec.backdoor:
        out = workdir / f"{spec.name}-repaired.pt"
        repaired, repair_seconds, repair_rss = run(
            [
                "repair",
                str(model.path),
                "--data",
                data,
                *spec_args(model),
                "--out",
                str(out),
                "--json",
            ]
        )
        before = evaluate(model, model.load())
        after = evaluate(model, torch.jit.load(str(out)).eval()) if out.exists() else {}
        row.update(
            repair_seconds=repair_seconds,
            repair_rss_gb=repair_rss,
            repair_site=repaired.get("layer"),
            asr_before=before.get("asr"),
            asr_after=after.get("asr"),
            agreement_before=before["agreement"],
            agreement_after=after.get("agreement"),
        )
    return row


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | split | attack | detect | flagged (target) | time s | peak RSS GB | "
        "leakscan (score) | ASR before → after | agreement before → after |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        flagged = ",".join(str(k) for k in r["flagged"]) or "–"
        target = f" ({r['target']})" if r.get("target") is not None else ""
        asr = (
            f"{_fmt(r.get('asr_before'), 3)} → {_fmt(r.get('asr_after'), 3)}"
            if "asr_before" in r
            else "–"
        )
        agreement = (
            f"{_fmt(r.get('agreement_before'), 3)} → {_fmt(r.get('agreement_after'), 3)}"
            if "agreement_before" in r
            else "–"
        )
        lines.append(
            f"| {r['model']} | {r['split']} | {r['attack']} | {r['detect_verdict']} | "
            f"{flagged}{target} | {r['detect_seconds']:.0f} | {r['detect_rss_gb']:.2f} | "
            f"{r['leak_verdict']} ({r['leak_score']:.2f}) | {asr} | {agreement} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="all", choices=(realzoo.TUNING, realzoo.HELDOUT, "all"))
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument("--skip-repair", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in realzoo.select(args.only or None, args.split):
            model = realzoo.build(spec)
            row = bench_model(model, not args.skip_repair, Path(tmp))
            print(json.dumps(row), flush=True)
            rows.append(row)
    text = table(rows)
    print(text)
    notes = (
        "One process per command, as a user runs it (`modelguard detect|leakscan|repair "
        "MODEL.pt --data CROPS.npz --input-shape 3,S,S --value-range 0,1`), default "
        "settings; time and peak RSS are the process's. Bars: detect under "
        f"{BARS['seconds']:.0f} s and {BARS['rss_gb']:.0f} GB; repair below "
        f"{BARS['asr']:.0%} ASR, agreement drop at most {BARS['agreement_drop']:.0%}. "
        "Agreement: top-1 equal to the published model's on 216 evaluation crops the audit "
        "never saw. The attacks, crops and splits are described in `bench/realzoo.py`."
    )
    if args.only or args.skip_repair:
        notes += (
            " This run covered only the models listed"
            + (" and no repair" if args.skip_repair else "")
            + "; the others have not been measured yet."
        )
    results.record(
        "real_scale", "Real-scale models (EfficientNet-Lite, 1000 classes)", notes + "\n\n" + text
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
