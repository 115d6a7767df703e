"""Speed of the reversal's screening steps with the convolution weights channels-last
against the model's own layout (as loaded), on the real-scale zoo's published models.

``python -m bench.bench_pass_layout [--models lite0,lite1,lite2] [--steps 6] [--rounds 3]``

What ``modelguard detect`` runs on a 1000-class model, at its settings: the labels a
triage leaves (``triage_candidates + reference_labels``) screened together, each step
``screening_batch_size`` stamped images per label, in passes sized from the default
memory budget. Each round times ``--steps`` steps in either layout, the order swapped
every round, in one process, and the medians over rounds are compared: the ratio holds on
a noisy machine better than the times. The choice ``detect`` makes
(:func:`modelguard.detection.budget.faster_layout`: channels-last unless a timing on a
few images finds it clearly slower) is made ``--choices`` times and counted: the speed-up
a user gets is the chosen layout's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch

from bench import realzoo, results
from modelguard.detection.budget import faster_layout, measure_pass_cost, pass_memory
from modelguard.detection.neural_cleanse import ReversalConfig
from modelguard.detection.optimizer import TriggerOptimizer
from modelguard.nn.layout import AS_LOADED, CHANNELS_LAST, LAYOUTS, weight_layout
from modelguard.nn.probe import evaluating, frozen_weights

DEFAULT_MODELS = "lite0,lite1,lite2"


def seconds_per_step(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    labels: list[int],
    config: ReversalConfig,
    images_per_pass: int,
    steps: int,
) -> float:
    optimizer = TriggerOptimizer(
        model,
        x,
        y,
        labels,
        (0.0, 1.0),
        config.optimizer_settings(screening=True, max_batch_images=images_per_pass),
        torch.Generator().manual_seed(0),
    )
    optimizer.optimize(1)  # the first step allocates what the others reuse
    started = time.perf_counter()
    optimizer.optimize(1 + steps)
    return (time.perf_counter() - started) / steps


def bench(name: str, steps: int, rounds: int, choices: int) -> dict[str, Any]:
    (spec,) = realzoo.select([name])
    zoo_model = realzoo.build(spec)
    model = zoo_model.load()
    data = np.load(zoo_model.data_path())
    x, y = torch.from_numpy(data["x"]).float(), torch.from_numpy(data["y"]).long()
    config = ReversalConfig()
    labels = list(range(config.triage_candidates + config.reference_labels))
    with evaluating(model), frozen_weights(model):
        picks = [faster_layout(model, x) for _ in range(choices)]
        cost = measure_pass_cost(model, x)
        room = pass_memory(config.memory_budget_mb, len(labels), zoo_model.input_shape)
        images_per_pass = min(config.max_batch_images, cost.images_per_pass(room))
        times: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
        for round_ in range(rounds):
            for layout in LAYOUTS if round_ % 2 == 0 else LAYOUTS[::-1]:
                with weight_layout(model, layout):
                    times[layout].append(
                        seconds_per_step(model, x, y, labels, config, images_per_pass, steps)
                    )
    as_loaded = statistics.median(times[AS_LOADED])
    channels_last = statistics.median(times[CHANNELS_LAST])
    chosen = picks.count(CHANNELS_LAST)
    return {
        "model": name,
        "side": zoo_model.side,
        "images_per_step": len(labels) * config.screening_batch_size,
        "images_per_pass": images_per_pass,
        "as_loaded": as_loaded,
        "channels_last": channels_last,
        "chosen_channels_last": chosen,
        "choices": choices,
        "ratio": as_loaded / channels_last,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--choices", type=int, default=5)
    args = parser.parse_args(argv)
    rows = [
        bench(name, args.steps, args.rounds, args.choices)
        for name in args.models.split(",")
        if name
    ]
    table = [
        "| model | input | images per step (per pass) | as loaded | channels-last "
        "| speed-up | detect chose channels-last |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        line = (
            f"| {row['model']} | {row['side']}² | {row['images_per_step']} "
            f"({row['images_per_pass']}) | {row['as_loaded']:.2f} s | "
            f"{row['channels_last']:.2f} s | {row['ratio']:.2f}× | "
            f"{row['chosen_channels_last']} of {row['choices']} |"
        )
        table.append(line)
        print(line, flush=True)
    results.record(
        "pass_layout",
        "Convolution weight layout of the reversal's passes (published models)",
        "\n".join(table)
        + f"\n\nSeconds per screening step, median of {args.rounds} rounds of {args.steps} "
        f"steps per layout, the order swapped every round, one process, "
        f"{torch.get_num_threads()} threads. The last column: how often `detect`'s own "
        "choice picked channels-last (it keeps the model's own layout only where timing both "
        "on a few images finds channels-last clearly slower).",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
