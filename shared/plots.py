"""PNG images for reports: line plots (pruning curves, stealing curves), the audit
report's charts (MAD test, pruning curve, leak evidence) and tensors as images (reversed
masks and patterns). Pure functions: arrays in, PNG bytes out."""

from __future__ import annotations

import io
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image


def line_plot_png(
    x: list[float],
    series: dict[str, list[float]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    hlines: dict[str, float] | None = None,
) -> bytes:
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    try:
        for name, values in series.items():
            axes.plot(x[: len(values)], values, marker=".", label=name)
        for name, level in (hlines or {}).items():
            axes.axhline(level, linestyle="--", linewidth=1, color="grey", label=name)
        axes.set_title(title)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend(loc="best", fontsize=8)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(figure)


def tensor_png(image: np.ndarray, scale: int = 4) -> bytes:
    """A (H, W), (1, H, W) or (3, H, W) array in [0, 1] as a PNG, upscaled ``scale``×."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 3 and array.shape[0] in (1, 3):
        array = array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0))
    array = np.nan_to_num(np.clip(array, 0.0, 1.0))
    pixels = (array * 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels)
    if scale > 1:
        picture = picture.resize(
            (picture.width * scale, picture.height * scale), Image.Resampling.NEAREST
        )
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


#: Colours of the report's charts: flagged / rolled back in red, the rest in blue.
ALERT_COLOUR = "#cf222e"
NORMAL_COLOUR = "#0969da"
SECOND_COLOUR = "#1a7f37"


def _png(figure: Any) -> bytes:
    try:
        figure.tight_layout()
        buffer = io.BytesIO()
        # no timestamp in the metadata: the same data gives the same bytes
        figure.savefig(buffer, format="png", metadata={"Software": None})
        return buffer.getvalue()
    finally:
        plt.close(figure)


def mad_chart_png(
    labels: Sequence[int],
    norms: Sequence[float],
    flagged: Collection[int],
    *,
    median: float,
    flag_line: float | None = None,
    title: str = "",
) -> bytes:
    """Neural Cleanse's outlier test as a bar chart: the trigger norm of each label in
    ``labels`` (the optimised ones; flagged labels in red), the median norm and the norm
    below which a label is flagged (``flag_line``, None when the test has none)."""
    if len(labels) != len(norms):
        raise ValueError("one norm per label")
    figure, axes = plt.subplots(figsize=(7, 3), dpi=100)
    positions = np.arange(len(labels))
    colours = [ALERT_COLOUR if label in flagged else NORMAL_COLOUR for label in labels]
    axes.bar(positions, norms, color=colours)
    axes.axhline(median, color="grey", linewidth=1, label=f"median {median:.3g}")
    if flag_line is not None and math.isfinite(flag_line):
        axes.axhline(
            flag_line,
            color=ALERT_COLOUR,
            linestyle="--",
            linewidth=1,
            label=f"flagged below {flag_line:.3g}",
        )
    step = max(1, math.ceil(len(labels) / 40))  # at most ~40 tick labels stay readable
    axes.set_xticks(positions[::step], [str(label) for label in labels][::step], fontsize=7)
    axes.set_xlabel("label")
    axes.set_ylabel("trigger size (L1 norm of the mask)")
    axes.set_title(title)
    axes.legend(loc="best", fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    return _png(figure)


def pruning_curve_png(
    pruned: Sequence[int],
    asr: Sequence[float],
    agreement: Sequence[float],
    rolled_back: Sequence[bool],
    *,
    title: str = "",
) -> bytes:
    """A pruning curve: attack success and agreement with the original against the number
    of neurons pruned when measured; kept steps joined by lines, rolled-back steps drawn
    as red crosses."""
    if not len(pruned) == len(asr) == len(agreement) == len(rolled_back):
        raise ValueError("one value per step in every series")
    figure, axes = plt.subplots(figsize=(7, 3.2), dpi=100)
    kept = [k for k, back in enumerate(rolled_back) if not back]
    back = [k for k, undone in enumerate(rolled_back) if undone]
    for values, name, colour in (
        (asr, "attack success (reversed trigger)", ALERT_COLOUR),
        (agreement, "agreement with the original", SECOND_COLOUR),
    ):
        axes.plot([pruned[k] for k in kept], [values[k] for k in kept], marker=".", color=colour)
        axes.plot([], [], color=colour, label=name)  # one legend entry per series
        if back:
            axes.scatter(
                [pruned[k] for k in back], [values[k] for k in back], marker="x", color="grey"
            )
    if back:
        axes.scatter([], [], marker="x", color="grey", label="rolled back")
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("neurons pruned")
    axes.set_ylabel("share of images")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    return _png(figure)


def bar_chart_png(
    names: Sequence[str],
    values: Sequence[float],
    *,
    threshold: float | None = None,
    threshold_label: str = "threshold",
    xlabel: str = "",
    title: str = "",
) -> bytes:
    """Horizontal bars (one per name; those at or over ``threshold`` in red) and the
    threshold as a dashed line; small enough to sit beside a sentence."""
    if len(names) != len(values):
        raise ValueError("one value per name")
    figure, axes = plt.subplots(figsize=(5, 1.3 + 0.4 * max(1, len(names))), dpi=100)
    line = threshold if threshold is not None and math.isfinite(threshold) else None
    colours = [
        ALERT_COLOUR if line is not None and value >= line else NORMAL_COLOUR for value in values
    ]
    positions = np.arange(len(names))
    axes.barh(positions, values, color=colours)
    axes.set_yticks(positions, list(names), fontsize=8)
    axes.invert_yaxis()  # first name on top
    if line is not None:
        axes.axvline(line, color="grey", linestyle="--", linewidth=1)
        xlabel += f" (dashed: {threshold_label})"
    axes.set_xlim(min(0.0, *values), 1.1 * max([*values, line or 0.0, 1e-9]))
    axes.set_xlabel(xlabel, fontsize=8)
    axes.set_title(title, fontsize=9)
    axes.grid(axis="x", alpha=0.3)
    return _png(figure)


def robust_accuracy_png(
    eps: Sequence[float],
    robust: Sequence[float],
    attacks: Mapping[str, Sequence[float]],
    *,
    clean_accuracy: float | None = None,
    norm: str = "linf",
    title: str = "",
) -> bytes:
    """Accuracy against ε: the combined robust accuracy (correct under every attack at
    that ε and every smaller one) as a thick line, each attack's own accuracy thinner and
    dashed, the clean accuracy as a grey line."""
    if any(len(values) != len(eps) for values in (robust, *attacks.values())):
        raise ValueError("one value per ε in every series")
    figure, axes = plt.subplots(figsize=(7, 3.2), dpi=100)
    for name, values in attacks.items():
        axes.plot(eps, values, marker=".", linestyle="--", linewidth=1, label=name)
    axes.plot(eps, robust, marker="o", color=ALERT_COLOUR, linewidth=2.5, label="robust")
    if clean_accuracy is not None:
        axes.axhline(clean_accuracy, color="grey", linewidth=1, label="clean")
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel(f"ε ({'L∞' if norm == 'linf' else 'L2'}, the data's units)")
    axes.set_ylabel("accuracy")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    return _png(figure)


def robustness_curve_png(summary: dict[str, Any], title: str = "") -> bytes:
    """`robust_accuracy_png` of a robustness summary (`RobustnessResult.to_dict`)."""
    points = summary.get("points") or []
    names = list(dict.fromkeys(a["attack"] for p in points for a in p.get("attacks", [])))
    by_attack = {
        name: [
            next((float(a["accuracy"]) for a in p["attacks"] if a["attack"] == name), math.nan)
            for p in points
        ]
        for name in names
    }
    clean = summary.get("clean_accuracy")
    return robust_accuracy_png(
        [float(p["eps"]) for p in points],
        [float(p["robust_accuracy"]) for p in points],
        by_attack,
        clean_accuracy=float(clean) if isinstance(clean, (int, float)) else None,
        norm=str(summary.get("norm", "linf")),
        title=title,
    )
