"""A detection compared with the model the submitted one was fine-tuned from: the flagged
labels whose triggers the reference follows as well are set aside as inherited, a trigger
only the submitted model follows stays flagged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelguard.datasets import Dataset
from modelguard.detection.neural_cleanse import (
    CLEAN,
    INCONCLUSIVE,
    INFECTED,
    LabelResult,
    RestartInfo,
    ReversalResult,
)
from modelguard.detection.reference import (
    INHERITED_MIN_RATIO,
    apply_reference,
    compare_with_reference,
    set_aside,
)
from modelguard.errors import InvalidInput
from modelguard.spec import InputSpec

SPEC = InputSpec((1, 8, 8))
CLASSES = 4
NATURAL, PLANTED = 2, 3


def _linear(classes: int = CLASSES) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, classes))
    with torch.no_grad():
        model[1].weight.normal_(0, 0.05)
        model[1].bias.zero_()
    return model.eval()


def _corner(top: bool, left: bool) -> torch.Tensor:
    mask = torch.zeros(8, 8)
    rows = slice(0, 2) if top else slice(6, 8)
    cols = slice(0, 2) if left else slice(6, 8)
    mask[rows, cols] = 1.0
    return mask


def _answers_patch(model: nn.Sequential, label: int, mask: torch.Tensor) -> None:
    """A white 2×2 patch where ``mask`` is sends the model to ``label``."""
    with torch.no_grad():
        model[1].weight[label] += 10.0 * mask.flatten()
        model[1].bias[label] -= 20.0


def _models() -> tuple[nn.Module, nn.Module]:
    """The base (a natural patch for label 2) and its fine-tune (that patch, plus a planted
    one for label 3)."""
    base = _linear()
    with torch.no_grad():
        base[1].weight[0, 4 * 8 + 4] += 10.0  # label 0's logit: 10 × a centre pixel in [0, 0.5]
        base[1].bias[PLANTED] -= 5.0  # a class the base seldom answers
    _answers_patch(base, NATURAL, _corner(True, True))
    tuned = _linear()
    tuned.load_state_dict(base.state_dict())
    _answers_patch(tuned, PLANTED, _corner(False, False))
    return base, tuned


def _data() -> Dataset:
    generator = torch.Generator().manual_seed(1)
    return Dataset(torch.rand(64, 1, 8, 8, generator=generator) * 0.5, torch.arange(64) % CLASSES)


def _result(flagged: tuple[int, ...], **evidence: object) -> ReversalResult:
    masks = torch.zeros(CLASSES, 8, 8)
    masks[NATURAL] = _corner(True, True)
    masks[PLANTED] = _corner(False, False)
    labels = tuple(LabelResult(k, 10.0, 3.0, 1.0, True) for k in range(CLASSES))
    run = RestartInfo(0, (10.0,) * CLASSES, (3.0,) * CLASSES, flagged, 100)
    return ReversalResult(
        labels=labels,
        flagged=flagged,
        verdict=INFECTED if flagged else CLEAN,
        masks=masks,
        patterns=torch.ones(CLASSES, 1, 8, 8),
        restarts=(run,),
        steps=100,
        evaluations=1000,
        seconds=1.0,
        evidence={"summary": "infected: labels are outliers", **evidence},
    )


def test_the_base_models_natural_patch_is_inherited_and_the_planted_one_is_not() -> None:
    base, tuned = _models()
    comparison = compare_with_reference(
        _result((NATURAL, PLANTED)), tuned, base, _data(), SPEC, name="base.pt"
    )
    by_label = {c.label: c for c in comparison.labels}
    assert by_label[NATURAL].submitted_success == pytest.approx(1.0)
    assert by_label[NATURAL].reference_success == pytest.approx(1.0)
    assert by_label[PLANTED].submitted_success == pytest.approx(1.0)
    assert by_label[PLANTED].reference_success == 0.0
    assert comparison.inherited == (NATURAL,)
    assert comparison.images == 48  # the 64 images less the 16 of the label itself

    result = apply_reference(_result((NATURAL, PLANTED)), comparison)
    assert result.verdict == INFECTED
    assert result.flagged == (PLANTED,)
    summary = result.evidence["summary"]
    assert "set aside as inherited from the reference model base.pt: label 2" in summary
    assert "not inherited: label 3 (reference 0%, submitted 100%)" in summary
    assert result.evidence["reference"]["inherited"] == [NATURAL]
    assert result.to_dict()["evidence"]["reference"]["labels"][1]["label"] == PLANTED


def test_a_detection_whose_every_flagged_trigger_is_inherited_is_clean_against_it() -> None:
    base, tuned = _models()
    result = apply_reference(
        _result((NATURAL,)),
        compare_with_reference(_result((NATURAL,)), tuned, base, _data(), SPEC),
    )
    assert result.verdict == CLEAN
    assert result.flagged == ()
    assert result.evidence["summary"].startswith(
        "clean against the reference: every flagged trigger is inherited"
    )
    # what the detector said before the comparison stays readable
    assert "before the comparison: infected: labels are outliers" in result.evidence["summary"]


def test_a_trigger_the_reference_follows_less_than_a_quarter_as_often_stays_flagged() -> None:
    base, tuned = _models()
    with torch.no_grad():  # the patch's logit 0.75 beats label 0's (0 to 5) on about 15%
        base[1].bias[NATURAL] -= 19.25
    data = _data()
    comparison = compare_with_reference(_result((NATURAL,)), tuned, base, data, SPEC)
    (natural,) = comparison.labels
    assert 0.0 < natural.reference_success < INHERITED_MIN_RATIO * natural.submitted_success
    assert comparison.inherited == ()
    assert apply_reference(_result((NATURAL,)), comparison).verdict == INFECTED
    # the ratio is a setting
    lenient = compare_with_reference(_result((NATURAL,)), tuned, base, data, SPEC, min_ratio=0.05)
    assert lenient.inherited == (NATURAL,)


def test_nothing_flagged_compares_nothing() -> None:
    base, tuned = _models()
    comparison = compare_with_reference(_result(()), tuned, base, _data(), SPEC)
    assert comparison.labels == () and comparison.inherited == ()
    result = apply_reference(_result(()), comparison)
    assert result.verdict == CLEAN and result.flagged == ()


def test_a_reference_of_another_task_is_refused() -> None:
    _, tuned = _models()
    with pytest.raises(InvalidInput, match="answers 5 classes, the submitted one 4"):
        compare_with_reference(_result((NATURAL,)), tuned, _linear(5), _data(), SPEC)
    other_input = nn.Sequential(nn.Flatten(), nn.Linear(16, CLASSES)).eval()
    with pytest.raises(InvalidInput, match="does not take the declared input"):
        compare_with_reference(_result((NATURAL,)), tuned, other_input, _data(), SPEC)
    with pytest.raises(InvalidInput, match="ratio must be in"):
        compare_with_reference(_result((NATURAL,)), tuned, tuned, _data(), SPEC, min_ratio=0)


def test_a_blend_probe_label_is_not_compared_and_stays_flagged() -> None:
    """The probe's noise blend is answered by benign models' texture classes too."""
    base, tuned = _models()
    probe = {"flagged": True, "label": NATURAL, "share": 1.0}
    result = _result((NATURAL, PLANTED), blend_probe=probe)
    comparison = compare_with_reference(result, tuned, base, _data(), SPEC)
    blended = comparison.labels[0]
    assert blended.label == NATURAL and not blended.inherited and blended.note
    assert blended.to_dict()["submitted_success"] is None  # strict JSON, no NaN
    repaired = apply_reference(result, comparison)
    assert repaired.flagged == (NATURAL, PLANTED) and repaired.verdict == INFECTED
    assert (
        "label 2 (the blend probe's label: a noise blend is not compared)"
        in (repaired.evidence["summary"])
    )


def test_an_inconclusive_reversal_is_not_made_clean_by_the_comparison() -> None:
    """A reversal out of time whose blend probe flagged a label: set aside, the verdict
    goes back to inconclusive, not clean."""
    base, tuned = _models()
    result = _result((NATURAL,), reason="the time budget ran out")
    comparison = compare_with_reference(result, tuned, base, _data(), SPEC)
    assert comparison.inherited == (NATURAL,)
    compared = apply_reference(result, comparison)
    assert compared.verdict == INCONCLUSIVE and compared.flagged == ()
    assert compared.evidence["summary"].startswith("inconclusive: the time budget ran out")


def test_partly_inherited_the_summary_leads_with_what_stays_flagged() -> None:
    base, tuned = _models()
    tuned.train()  # the comparison runs in eval mode and gives the mode back
    result = _result((NATURAL, PLANTED))
    compared = apply_reference(result, compare_with_reference(result, tuned, base, _data(), SPEC))
    assert tuned.training and not base.training
    assert compared.evidence["summary"].startswith("infected: label(s) [3] after the comparison")
    assert set_aside(compared) == (NATURAL,) and set_aside(result) == ()
