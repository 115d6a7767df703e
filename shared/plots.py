"""PNG images for reports: line plots (pruning curves, stealing curves) and tensors as
images (reversed masks and patterns). Pure functions: arrays in, PNG bytes out."""

from __future__ import annotations

import io

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
