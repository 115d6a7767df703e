"""The blend probe: fresh noise blended into the clean images flags a model that answers
noise with one label, leaves a model that reads the image content alone, and joins the
reversal's result as a flagged label with a full-image trigger."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from modelguard.datasets import Dataset
from modelguard.detection.blend_probe import BlendProbeConfig, probe_blend
from modelguard.detection.neural_cleanse import (
    CLEAN,
    INFECTED,
    ReversalConfig,
    reverse_triggers,
    with_blend_probe,
)
from modelguard.errors import InvalidInput
from modelguard.spec import InputSpec

SPEC = InputSpec(shape=(3, 16, 16))
CLASSES, TARGET = 5, 3


class ContentReader(nn.Module):
    """Labels an image by which of five horizontal bands is brightest; ``noise_gain``
    adds that much of the image's pixel-to-pixel roughness to ``TARGET``'s logit (a
    model taught to answer a noise-like blend)."""

    def __init__(self, noise_gain: float = 0.0) -> None:
        super().__init__()
        self.noise_gain = noise_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.mean(1).reshape(len(x), -1)[:, : CLASSES * 48]
        bands = pixels.reshape(len(x), CLASSES, 48).mean(2) * 10
        roughness = (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))
        bands[:, TARGET] += self.noise_gain * roughness
        return bands


def band_images(n: int = 60) -> Dataset:
    """Smooth images: one bright band (the label) on a dim background."""
    generator = torch.Generator().manual_seed(0)
    y = torch.arange(n) % CLASSES
    x = torch.full((n, 3, 16, 16), 0.2) + 0.02 * torch.rand(n, 3, 16, 16, generator=generator)
    for i, label in enumerate(y.tolist()):
        x[i].view(3, -1)[:, label * 48 : (label + 1) * 48] = 0.8
    return Dataset(x, y)


def test_a_model_answering_noise_with_one_label_is_flagged_with_that_label() -> None:
    data = band_images()
    probe = probe_blend(ContentReader(noise_gain=200.0), data, SPEC)
    assert probe.flagged and probe.label == TARGET and probe.share >= 0.9
    assert len(probe.rows) == 3 * 2 and probe.images == len(data)
    assert probe.pattern.shape == (3, 16, 16)
    assert float(probe.pattern.min()) >= 0.0 and float(probe.pattern.max()) <= 1.0


def test_a_model_reading_the_content_is_not_flagged() -> None:
    probe = probe_blend(ContentReader(noise_gain=0.0), band_images(), SPEC)
    assert not probe.flagged and probe.share < 0.6


def test_a_label_holding_nearly_every_clean_image_is_not_judged() -> None:
    """Nine in ten clean images are already ``TARGET``'s; noise sends the rest there too,
    but a share over a handful of images says nothing: not flagged, and the note says
    why (an untrained model with a default label looks like this)."""
    data = band_images(60)
    mostly_target = Dataset(data.x.clone(), data.y.clone())
    for i in range(len(mostly_target.y)):
        if i % 10:
            mostly_target.x[i] = data.x[TARGET]  # TARGET's image (index TARGET has label 3)
    probe = probe_blend(ContentReader(noise_gain=200.0), mostly_target, SPEC)
    assert any(row.label == TARGET and row.share >= 0.6 for row in probe.rows)
    assert not probe.flagged
    assert all(not row.judged for row in probe.rows if row.label == TARGET)
    assert f"label(s) {TARGET}" in probe.note and "too few others" in probe.note
    assert probe.to_dict()["note"] == probe.note
    # the same model on images of every label is judged, and flagged
    assert probe_blend(ContentReader(noise_gain=200.0), data, SPEC).flagged
    with pytest.raises(InvalidInput, match="min_other_share"):
        BlendProbeConfig(min_other_share=1.0)


def test_the_pattern_lives_in_the_declared_value_range() -> None:
    spec = InputSpec(shape=(3, 16, 16), value_range=(0.0, 255.0))
    data = band_images()
    scaled = Dataset(data.x * 255, data.y)

    class Scaled(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return ContentReader(noise_gain=200.0)(x / 255)

    probe = probe_blend(Scaled(), scaled, spec)
    assert probe.flagged and probe.label == TARGET
    assert float(probe.pattern.max()) > 1.0 and float(probe.pattern.max()) <= 255.0


def test_the_reversal_result_carries_the_probe_and_its_trigger() -> None:
    data = band_images()
    config = ReversalConfig(steps=30, restarts=1, max_samples=60)
    result = reverse_triggers(ContentReader(noise_gain=200.0), data, SPEC, config)
    assert result.verdict == INFECTED and TARGET in result.flagged
    assert result.evidence["blend_probe"]["flagged"] is True
    assert "blend probe" in result.evidence["summary"]
    mask, pattern = result.trigger(TARGET)
    assert torch.allclose(mask, torch.full((16, 16), result.evidence["blend_probe"]["alpha"]))
    assert pattern.shape == (3, 16, 16)

    benign = reverse_triggers(ContentReader(), data, SPEC, config)
    assert benign.evidence["blend_probe"]["flagged"] is False
    assert TARGET not in benign.flagged or benign.verdict != CLEAN

    off = replace(config, blend_probe=False)
    assert "blend_probe" not in reverse_triggers(ContentReader(200.0), data, SPEC, off).evidence


def test_a_flagged_label_the_triage_left_out_gets_its_own_trigger_row() -> None:
    data = band_images()
    result = reverse_triggers(ContentReader(), data, SPEC, ReversalConfig(steps=30, restarts=1))
    rows = [k for k in result.labels_with_triggers if k != TARGET]
    # as a triage leaves it: the target has no row
    keep = [result.labels_with_triggers.index(k) for k in rows]
    triaged = replace(
        result,
        masks=result.masks[keep],
        patterns=result.patterns[keep],
        trigger_labels=tuple(rows),
        verdict=CLEAN,
        flagged=(),
    )
    probe = probe_blend(ContentReader(noise_gain=200.0), data, SPEC)
    merged = with_blend_probe(triaged, probe, seconds=1.0)
    assert merged.verdict == INFECTED and merged.flagged == (TARGET,)
    assert merged.labels_with_triggers[-1] == TARGET and len(merged.masks) == len(rows) + 1
    assert torch.equal(merged.trigger(TARGET)[1], probe.pattern)


def test_the_paper_rule_has_no_probe_and_bad_settings_are_refused() -> None:
    assert ReversalConfig.paper().blend_probe is False
    with pytest.raises(InvalidInput, match="blend_threshold"):
        ReversalConfig(blend_threshold=0.0)
    with pytest.raises(InvalidInput, match="alphas"):
        BlendProbeConfig(alphas=(0.0,))
    with pytest.raises(InvalidInput, match="threshold"):
        BlendProbeConfig(threshold=1.5)
