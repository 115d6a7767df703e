"""Speed of the batched trigger reversal against the faithful per-label Neural Cleanse.

``python -m bench.bench_reversal_speed [--models a,b] [--images 1000] [--seed 0]``

For each model (default: an infected and a clean LeNet-5/MNIST of the zoo's held-out
split), in one process and one thread: the faithful per-label Neural Cleanse
(:mod:`modelguard.detection.neural_cleanse_sequential` with the paper's decision rule,
``ReversalConfig.paper()``: every label with the full budget, ``batch_size`` images a
step, the MAD test on linear norms) against what ``modelguard detect`` runs
(:func:`modelguard.detection.neural_cleanse.reverse_triggers` with the default config:
screening of all labels at once, refinement of the suspects, this project's rule). Both
share the model, clean data, step budget, λ schedule and stopping rule. Prints both
detection results, wall time, images through the model, and the ratio. Bars: ≥ 5× faster
at equal or better detection; a full 10-label LeNet-5/MNIST scan of 1,000 clean images
under 15 s.

The machine is shared: both sides are timed ``--repeats`` times and the medians compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from bench import results
from bench.bench_detection import OUT, clean_set
from bench.zoo import ensure_model
from modelguard.datasets import REPO_ROOT
from modelguard.detection.neural_cleanse import ReversalConfig, ReversalResult, reverse_triggers
from modelguard.detection.neural_cleanse_sequential import reverse_triggers_sequential

DEFAULT_MODELS = "patch-lenet5-mnist-6x6-left-t8,clean-lenet5-mnist-s4"


def describe(result: ReversalResult) -> str:
    flagged = ", ".join(f"{k} (index {result.labels[k].anomaly_index:.2f})" for k in result.flagged)
    return f"{result.verdict}: {flagged or 'nothing flagged'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = ReversalConfig(seed=args.seed)
    baseline_config = ReversalConfig.paper(seed=args.seed)
    rows: list[dict[str, Any]] = []
    ok = True
    for name in [m for m in args.models.split(",") if m]:
        entry = ensure_model(name)
        model = entry.load()
        data = clean_set(entry.dataset, args.images)
        truth = ",".join(map(str, entry.targets)) or "none (clean)"
        print(
            f"\n== {name}  ({entry.arch}, {entry.dataset}, {len(data)} clean images; "
            f"true target: {truth})"
        )
        sequential_runs = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            sequential = reverse_triggers_sequential(model, data, entry.spec, baseline_config)
            sequential_runs.append(time.perf_counter() - started)
        sequential_s = statistics.median(sequential_runs)
        batched_runs = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            batched = reverse_triggers(model, data, entry.spec, config)
            batched_runs.append(time.perf_counter() - started)
        batched_s = statistics.median(batched_runs)
        ratio = sequential_s / batched_s
        started = time.perf_counter()
        single = reverse_triggers(
            model, data, entry.spec, ReversalConfig(seed=args.seed, restarts=1)
        )
        single_s = time.perf_counter() - started
        single_right = set(single.flagged) == set(entry.targets)
        seq_right = set(sequential.flagged) == set(entry.targets)
        bat_right = set(batched.flagged) == set(entry.targets)
        print(
            f"  Neural Cleanse (per label, paper)  : {sequential_s:6.1f} s  "
            f"{sequential.evaluations:>8} images  {sequential.steps:>5} label-steps  "
            f"-> {describe(sequential)} [{'right' if seq_right else 'WRONG'}]"
            f"  (runs: {', '.join(f'{s:.1f}' for s in sequential_runs)} s)"
        )
        print(
            f"  batched (screen + refine)          : {batched_s:6.1f} s  "
            f"{batched.evaluations:>8} images  {batched.steps:>5} label-steps  "
            f"-> {describe(batched)} [{'right' if bat_right else 'WRONG'}]"
            f"  (runs: {', '.join(f'{s:.1f}' for s in batched_runs)} s)"
        )
        print(
            f"  batched, one screening run        : {single_s:6.1f} s  "
            f"{single.evaluations:>8} images  {single.steps:>5} label-steps  "
            f"-> {describe(single)} [{'right' if single_right else 'WRONG'}]"
        )
        print(
            f"  speed-up: {ratio:.1f}x wall time ({sequential_s / single_s:.1f}x with one "
            f"screening run); {sequential.evaluations / batched.evaluations:.1f}x fewer images; "
            f"screening runs made: {len(batched.restarts)}"
        )
        equal_or_better = bat_right or not seq_right
        fast = ratio >= 5.0
        under = batched_s < 15.0 if entry.arch == "lenet5" else True
        ok = ok and equal_or_better and fast and under
        print(
            f"  bars: >=5x {'met' if fast else 'NOT met'}; detection "
            f"{'equal or better' if equal_or_better else 'WORSE'}; "
            f"{'<15 s' if under else '>=15 s'}"
        )
        rows.append(
            {
                "model": name,
                "targets": list(entry.targets),
                "sequential_seconds": sequential_s,
                "sequential_runs": sequential_runs,
                "sequential_rule": baseline_config.rule,
                "batched_rule": config.rule,
                "batched_seconds": batched_s,
                "batched_runs": batched_runs,
                "ratio": ratio,
                "sequential_flagged": list(sequential.flagged),
                "batched_flagged": list(batched.flagged),
                "sequential_evaluations": sequential.evaluations,
                "batched_evaluations": batched.evaluations,
                "sequential_label_steps": sequential.steps,
                "batched_label_steps": batched.steps,
                "batched_screening_runs": len(batched.restarts),
                "single_run_seconds": single_s,
                "single_run_flagged": list(single.flagged),
            }
        )
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "reversal_speed.json"
    path.write_text(json.dumps(rows, indent=2))
    print(f"\n(details in {path.relative_to(REPO_ROOT)})")
    table = [
        "| model | Neural Cleanse, per label, paper rule | batched (`modelguard detect`) | ratio |",
        "|---|---|---|---|",
    ]
    for row in rows:
        table.append(
            f"| {row['model']} (target {','.join(map(str, row['targets'])) or 'none'}) "
            f"| {row['sequential_seconds']:.1f} s, flags "
            f"{','.join(map(str, row['sequential_flagged'])) or 'nothing'} "
            f"| {row['batched_seconds']:.1f} s, flags "
            f"{','.join(map(str, row['batched_flagged'])) or 'nothing'} "
            f"| {row['ratio']:.1f}× |"
        )
    results.record(
        "reversal_speed",
        "Trigger reversal speed (held-out split)",
        "\n".join(table)
        + f"\n\nMedian of {args.repeats} timed runs per side, one thread, {args.images} "
        "clean images. Bars: ≥ 5× at equal or better detection; a 10-label LeNet-5 scan "
        f"under 15 s: {'met' if ok else 'NOT met'}.",
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
