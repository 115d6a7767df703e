"""Trigger unlearning's stamping: dilation of the reversed mask, jitter, the stamped
share, and the fine-tune configuration's bounds."""

from __future__ import annotations

import pytest
import torch

from modelguard.detection.triggers import ReversedTrigger
from modelguard.repair.context import FineTuneConfig, _dilated, _stamp_share
from modelguard.spec import InputSpec

SPEC = InputSpec(shape=(1, 8, 8), value_range=(0.0, 1.0))


def _corner_trigger() -> ReversedTrigger:
    mask = torch.zeros(8, 8)
    mask[0, 6] = 1.0  # one pixel of what is really a 2x2 patch in the top-right corner
    return ReversedTrigger(label=3, mask=mask, pattern=torch.ones(1, 8, 8))


def test_dilation_grows_the_mask_by_whole_pixels_and_keeps_the_pattern() -> None:
    trigger = _corner_trigger()
    grown = _dilated(trigger, 1)
    expected = torch.zeros(8, 8)
    expected[0:2, 5:8] = 1.0
    assert torch.equal(grown.mask, expected)
    assert torch.equal(grown.pattern, trigger.pattern) and grown.label == 3
    assert torch.equal(trigger.mask.sum(), torch.tensor(1.0))  # the original is untouched
    assert float(_dilated(trigger, 2).mask.sum()) == 3 * 4  # rows 0-2, columns 4-7 (clipped)


def test_stamp_share_stamps_that_share_with_the_dilated_trigger() -> None:
    x = torch.zeros(10, 1, 8, 8)
    generator = torch.Generator().manual_seed(0)
    grown = _dilated(_corner_trigger(), 1)
    out, _ = _stamp_share(x, [grown], 0.3, SPEC, generator, jitter=0)
    stamped = [i for i in range(10) if float(out[i].sum()) > 0]
    assert len(stamped) == 3
    for i in stamped:
        assert float(out[i, 0, 0:2, 5:8].sum()) == 6.0  # the whole grown patch is white
    assert float(x.sum()) == 0.0  # the input batch is not modified


@pytest.mark.parametrize(
    "bad",
    [
        {"unlearn_dilate": -1},
        {"unlearn_dilate": 9},
        {"unlearn_fraction": 1.0},
        {"unlearn_restarts": -1},
        {"restart_steps": 0},
        {"restart_batch": 0},
        {"restart_seconds": 0.0},
        {"restart_max_norm_ratio": 0.0},
        {"restart_max_footprint": 0.0},
        {"restart_max_footprint": 1.5},
    ],
)
def test_fine_tune_config_bounds(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        FineTuneConfig(**bad)  # type: ignore[arg-type]
