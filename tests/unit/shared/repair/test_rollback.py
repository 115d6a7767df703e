"""The rollback rules (each branch), the stopping rule, and the rollback
pruning run on a hand-built model whose neurons each exercise one branch."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from torch import nn

from modelguard.datasets import Dataset
from modelguard.detection.triggers import ReversedTrigger
from modelguard.errors import InvalidInput
from modelguard.repair.context import FineTuneConfig, _stamp_share, footprint
from modelguard.repair.fine_pruning import FinePruningConfig
from modelguard.repair.registry import repair
from modelguard.repair.result import Measure
from modelguard.repair.rollback import Figures, RollbackConfig, decide, interleave, should_stop
from modelguard.repair.scoring import ScoringConfig
from modelguard.spec import InputSpec

CONFIG = RollbackConfig()  # seed defaults: q0 0.97, asr_stop 0.10, min_drop 0.01


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the CI machine has two cores shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- decide: each branch


def test_kept_when_asr_drops_and_agreement_holds() -> None:
    assert decide(Figures(0.90, 0.90, 1.0), Figures(0.80, 0.85, 0.99), CONFIG) == ("kept", "")


def test_rolled_back_when_asr_did_not_drop() -> None:
    action, reason = decide(Figures(0.90, 0.90, 1.0), Figures(0.895, 0.899, 1.0), CONFIG)
    assert (action, reason) == ("rolled_back", "asr_not_dropped")


def test_rolled_back_when_asr_rose() -> None:
    assert decide(Figures(0.5, 0.5, 1.0), Figures(0.6, 0.6, 1.0), CONFIG)[0] == "rolled_back"


def test_rolled_back_when_agreement_below_q0_even_though_asr_dropped() -> None:
    action, reason = decide(Figures(0.90, 0.90, 1.0), Figures(0.10, 0.10, 0.969), CONFIG)
    assert (action, reason) == ("rolled_back", "agreement_below_q0")


def test_both_reasons_are_reported() -> None:
    action, reason = decide(Figures(0.9, 0.9, 1.0), Figures(0.9, 0.9, 0.5), CONFIG)
    assert action == "rolled_back"
    assert reason.split(",") == ["asr_not_dropped", "agreement_below_q0"]


def test_agreement_exactly_q0_is_kept() -> None:
    assert decide(Figures(0.9, 0.9, 1.0), Figures(0.5, 0.5, 0.97), CONFIG)[0] == "kept"


def test_soft_asr_drop_alone_counts_as_meaningful() -> None:
    # no prediction flipped (ASR unchanged) but the target probability fell by 0.05
    previous, current = Figures(1.0, 0.95, 1.0), Figures(1.0, 0.90, 1.0)
    assert decide(previous, current, CONFIG)[0] == "kept"
    strict = RollbackConfig(min_soft_drop=None)
    assert decide(previous, current, strict) == ("rolled_back", "asr_not_dropped")


def test_min_drop_is_configurable() -> None:
    previous, current = Figures(0.9, 0.9, 1.0), Figures(0.85, 0.9, 1.0)
    assert decide(previous, current, RollbackConfig(min_drop=0.04, min_soft_drop=None))[0] == "kept"
    assert decide(previous, current, RollbackConfig(min_drop=0.06, min_soft_drop=None))[0] == (
        "rolled_back"
    )


# ---------------------------------------------------------------- stopping rule


@pytest.mark.parametrize(
    ("asr", "agreement", "stop"),
    [
        (0.05, 0.99, True),
        (0.0999, 0.97, True),
        (0.10, 0.99, False),  # s_n must be strictly below 10%
        (0.50, 0.99, False),
        (0.05, 0.969, False),  # q_n below q0
        (0.50, 0.50, False),
    ],
)
def test_stopping_rule(asr: float, agreement: float, stop: bool) -> None:
    measure = Measure(agreement=agreement, reversed_asr=asr, accuracy=agreement)
    assert should_stop(measure, CONFIG) is stop


def test_stopping_thresholds_are_configurable() -> None:
    measure = Measure(agreement=0.95, reversed_asr=0.15, accuracy=0.95)
    assert not should_stop(measure, CONFIG)
    assert should_stop(measure, RollbackConfig(q0=0.9, asr_stop=0.2))


def test_interleave_alternates_without_repeats() -> None:
    order = interleave(torch.tensor([3, 1, 0, 2]), torch.tensor([1, 2, 3, 0]))
    assert order == [3, 1, 2, 0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"q0": 0.0},
        {"q0": 1.5},
        {"asr_stop": 0.0},
        {"min_drop": -0.1},
        {"passes": 0},
        {"validation_fraction": 1.0},
        {"max_pruned_fraction": 0.0},
    ],
)
def test_config_is_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RollbackConfig(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the rules in a run


class ToyNet(nn.Module):
    """Inputs (1, 4, 4). ``fc1`` has three neurons:

    * 0: trigger detector, ``relu(10·x[15])`` → +20 on the target logit (class 1);
    * 1: the clean feature, ``relu(100·(x[0] - 0.5))`` → +1 on class 1;
    * 2: dead weight, constant 60, no outgoing weight.

    Class 0 wins by a bias of 0.5 when nothing supports class 1.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 3)
        self.fc2 = nn.Linear(3, 2)
        with torch.no_grad():
            self.fc1.weight.zero_()
            self.fc1.bias.zero_()
            self.fc1.weight[0, 15] = 10.0
            self.fc1.weight[1, 0] = 100.0
            self.fc1.bias[1] = -50.0
            self.fc1.bias[2] = 60.0
            self.fc2.weight.zero_()
            self.fc2.bias.copy_(torch.tensor([0.5, 0.0]))
            self.fc2.weight[1, 0] = 20.0
            self.fc2.weight[1, 1] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))  # type: ignore[no-any-return]


def toy_data(n: int = 400, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=generator) * 0.3
    y = torch.randint(2, (n,), generator=generator)
    first = torch.rand(n, generator=generator) * 0.4
    x[:, 0, 0, 0] = torch.where(y == 1, 0.6 + first, first)
    x[:, 0, 3, 3] = 0.0
    return Dataset(x, y)


def toy_trigger() -> ReversedTrigger:
    mask = torch.zeros(4, 4)
    mask[3, 3] = 1.0
    return ReversedTrigger(1, mask, torch.ones(1, 4, 4))


def test_rollback_run_exercises_each_branch() -> None:
    model = ToyNet().eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    spec = InputSpec((1, 4, 4))
    config = RollbackConfig(
        # ranking by triggered activation tries the dead neuron first, the weight ranking
        # the clean feature next: interleaved order 2, 1, 0
        scoring=ScoringConfig(rank_by="triggered"),
        finetune=FineTuneConfig(local_steps=0, final_epochs=0),
    )
    result = repair(model, toy_data(), spec, [toy_trigger()], mode="rollback", config=config)

    steps = [(s.index, s.action, s.reason) for s in result.curve]
    assert steps == [
        (2, "rolled_back", "asr_not_dropped"),  # nothing changes
        (1, "rolled_back", "asr_not_dropped,agreement_below_q0"),  # class 1 lost
        (0, "kept", ""),  # the trigger path is cut
    ]
    assert result.curve[0].agreement == 1.0 and result.curve[0].asr == 1.0
    assert result.curve[1].agreement < 0.7
    assert result.curve[2].asr == 0.0 and result.curve[2].agreement == 1.0
    # stopped at once: s_n < 10% with q_n >= q0
    assert result.pruned == [("fc1", 0)]
    assert result.before.reversed_asr == 1.0
    assert result.after.reversed_asr == 0.0 and result.after.agreement == 1.0
    # the repaired copy has neuron 0 zeroed; rolled-back neurons are intact
    repaired = result.model
    assert isinstance(repaired, ToyNet)
    assert torch.all(repaired.fc1.weight[0] == 0) and repaired.fc1.bias[0] == 0
    assert torch.equal(repaired.fc1.weight[1:], original["fc1.weight"][1:])
    assert torch.equal(repaired.fc1.bias[1:], original["fc1.bias"][1:])
    # the caller's model is untouched
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key])
    document = result.to_dict()
    assert document["target_labels"] == [1]
    assert document["pruned"] == [{"layer": "fc1", "index": 0}]
    assert {"agreement", "reversed_asr"} <= set(document["before"])
    assert [c["action"] for c in document["curve"]] == ["rolled_back", "rolled_back", "kept"]


def test_nothing_is_pruned_when_the_reversed_trigger_is_already_weak() -> None:
    model = ToyNet().eval()
    with torch.no_grad():
        model.fc2.weight[1, 0] = 0.0  # the trigger no longer reaches the target
    result = repair(model, toy_data(), InputSpec((1, 4, 4)), [toy_trigger()], mode="rollback")
    assert result.pruned == [] and result.curve == []
    assert result.after.reversed_asr < 0.1
    assert any("nothing to prune" in note for note in result.notes)


def test_a_large_site_is_swept_in_groups_of_ranked_neurons() -> None:
    """With at most two candidates a sweep, ToyNet's three neurons go in groups of two in
    the ranked order (2, 1, 0): the dead neuron with the clean feature first (rolled back:
    class 1 is lost), then the trigger detector alone (kept)."""
    config = RollbackConfig(
        scoring=ScoringConfig(rank_by="triggered"),
        finetune=FineTuneConfig(local_steps=0, final_epochs=0),
        max_candidates=2,
    )
    spec = InputSpec((1, 4, 4))
    result = repair(ToyNet().eval(), toy_data(), spec, [toy_trigger()], config=config)
    steps = [(s.neurons or (s.index,), s.action) for s in result.curve]
    assert steps == [((2, 1), "rolled_back"), ((0,), "kept")]
    assert result.curve[0].to_dict()["neurons"] == [2, 1]
    assert result.pruned == [("fc1", 0)]
    assert any("groups of 2" in note for note in result.notes)


def test_the_final_fine_tune_can_re_fit_only_the_classifier() -> None:
    """Pruning keeps nothing here (no drop can count), so the classifier re-fit alone
    removes the backdoor: stamped features are fitted to the clean logits; the layers
    before the classifier are not touched."""
    model = ToyNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    finetune = FineTuneConfig(
        local_steps=0,
        final_scope="classifier",
        refit_lr=0.5,
        refit_steps=1000,
        refit_pull=0.0,  # the toy's backdoor weight is huge: any pull keeps some of it
        unlearn_jitter=0.0,
        unlearn_dilate=0,
    )
    config = RollbackConfig(min_drop=1.1, min_soft_drop=None, finetune=finetune)
    spec = InputSpec((1, 4, 4))
    result = repair(model, toy_data(), spec, [toy_trigger()], layer="fc2:in", config=config)
    assert result.pruned == [] and result.before.reversed_asr == 1.0
    assert result.after.reversed_asr < 0.1 and result.after.agreement >= 0.97
    assert result.model is not None
    after = result.model.state_dict()
    assert torch.equal(after["fc1.weight"], before["fc1.weight"])
    assert not torch.equal(after["fc2.weight"], before["fc2.weight"])
    assert any("edited by" in note for note in result.notes)
    # the scope needs a classifier's input: fc1's outputs are not one
    with pytest.raises(InvalidInput, match="classifier's input"):
        repair(model, toy_data(), spec, [toy_trigger()], layer="fc1", config=config)


def test_the_classifier_scope_erases_the_trigger_direction_without_training() -> None:
    """With no re-fit steps the re-fit leaves the backdoor, so the validation split keeps
    the erasure: the stamped features move only along neuron 0 (the trigger detector),
    which is projected out of fc2's input; its mean clean value (0) goes to the bias."""
    model = ToyNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    finetune = FineTuneConfig(
        local_steps=0, final_scope="classifier", refit_steps=0, unlearn_jitter=0.0
    )
    config = RollbackConfig(min_drop=1.1, min_soft_drop=None, finetune=finetune)
    spec = InputSpec((1, 4, 4))
    result = repair(model, toy_data(), spec, [toy_trigger()], layer="fc2:in", config=config)
    assert result.before.reversed_asr == 1.0
    assert result.after.reversed_asr < 0.1 and result.after.agreement >= 0.97
    assert result.model is not None
    after = result.model.state_dict()
    assert torch.equal(after["fc1.weight"], before["fc1.weight"])
    assert torch.allclose(after["fc2.weight"][:, 0], torch.zeros(2), atol=1e-6)
    assert torch.allclose(after["fc2.weight"][:, 1:], before["fc2.weight"][:, 1:], atol=1e-5)
    note = next(n for n in result.notes if "edited by" in n)
    assert "erasing the 1 feature direction" in note and "erasure (rank 1) kept" in note
    # with erasure off, only the (here idle) re-fit is left: the attack stays
    off = RollbackConfig(
        min_drop=1.1,
        min_soft_drop=None,
        finetune=FineTuneConfig(
            local_steps=0,
            final_scope="classifier",
            refit_steps=0,
            erase_max_rank=0,
            unlearn_jitter=0.0,
        ),
    )
    kept = repair(ToyNet().eval(), toy_data(), spec, [toy_trigger()], layer="fc2:in", config=off)
    assert not any("erasure" in n for n in kept.notes)


def _restart_notes(finetune: FineTuneConfig) -> list[str]:
    config = RollbackConfig(min_drop=1.1, min_soft_drop=None, finetune=finetune)
    result = repair(
        ToyNet().eval(),
        toy_data(),
        InputSpec((1, 4, 4)),
        [toy_trigger()],
        layer="fc2:in",
        config=config,
    )
    assert result.after.reversed_asr < 0.1
    return [n for n in result.notes if n.startswith("unlearning set")]


def test_the_classifier_edit_also_unlearns_triggers_reversed_from_other_starts() -> None:
    """Each restart finds ToyNet's trigger pixel again (its mask no larger than the given
    one's): all of them join the unlearning set; none is reversed with restarts off, and a
    norm ratio no restart can meet keeps only the given trigger."""
    base = FineTuneConfig(local_steps=0, final_scope="classifier", unlearn_jitter=0.0)
    (note,) = _restart_notes(replace(base, unlearn_restarts=2, restart_steps=60))
    assert "and 2 of 2 reversals" in note
    assert _restart_notes(replace(base, unlearn_restarts=0)) == []
    (strict,) = _restart_notes(
        replace(base, unlearn_restarts=2, restart_steps=60, restart_max_norm_ratio=1e-6)
    )
    assert "and 0 of 2 reversals" in strict


def test_a_blend_trigger_is_not_reversed_again() -> None:
    """A full-image mask (a blend, as the blend probe reports one) has a footprint of the
    whole image: no restart runs for it."""
    blend = ReversedTrigger(1, torch.full((4, 4), 0.3), torch.ones(1, 4, 4))
    assert footprint(blend.mask) == 1.0 and footprint(toy_trigger().mask) == 1 / 16
    finetune = FineTuneConfig(local_steps=0, final_scope="classifier", unlearn_restarts=2)
    config = RollbackConfig(min_drop=1.1, min_soft_drop=None, finetune=finetune)
    result = repair(
        ToyNet().eval(), toy_data(), InputSpec((1, 4, 4)), [blend], layer="fc2:in", config=config
    )
    assert not any(n.startswith("unlearning set") for n in result.notes)


def test_the_classifier_edit_leaves_every_other_class_and_skips_the_pruning() -> None:
    """By default the classifier edit changes only the flagged label's row (class 1):
    class 0's row and bias are bit-identical, so its logit on any input is the
    original's, and the pruning search (which would keep the trigger detector's prune,
    see the next test) is not run."""
    model = ToyNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    finetune = FineTuneConfig(
        local_steps=30, final_scope="classifier", unlearn_jitter=0.0, unlearn_dilate=0
    )
    spec = InputSpec((1, 4, 4))
    config = RollbackConfig(finetune=finetune)
    result = repair(model, toy_data(), spec, [toy_trigger()], layer="fc2:in", config=config)
    assert result.pruned == [] and result.curve == []
    assert any(note.startswith("no pruning at fc2:in") for note in result.notes)
    assert result.after.reversed_asr < 0.1 and result.after.agreement >= 0.97
    assert result.model is not None
    after = result.model.state_dict()
    assert torch.equal(after["fc1.weight"], before["fc1.weight"])
    assert torch.equal(after["fc2.weight"][0], before["fc2.weight"][0])
    assert torch.equal(after["fc2.bias"][0], before["fc2.bias"][0])
    assert not torch.equal(after["fc2.weight"][1], before["fc2.weight"][1])
    note = next(n for n in result.notes if "edited by" in n)
    assert "the rows of label(s) 1 of the classifier fc2" in note
    assert "every other class's row" in note
    assert result.edit.startswith("the rows of label(s) 1 of the classifier fc2 (")
    assert result.to_dict()["edit"] == result.edit


def test_each_stamped_image_carries_its_trigger_label_for_the_one_sided_refit() -> None:
    """The re-fit lowers, on a stamped image, the logit of the label whose trigger it
    carries: with two flagged labels each stamped row names its own, clean rows none."""
    mask = torch.zeros(4, 4)
    mask[3, 3] = 1.0
    triggers = [
        ReversedTrigger(1, mask, torch.ones(1, 4, 4)),
        ReversedTrigger(0, mask.flip(0), torch.zeros(1, 4, 4)),
    ]
    x = torch.full((40, 1, 4, 4), 0.5)
    generator = torch.Generator().manual_seed(0)
    stamped, labels = _stamp_share(x, triggers, 0.5, InputSpec((1, 4, 4)), generator)
    assert int((labels == -1).sum()) == 20 and set(labels.tolist()) == {-1, 0, 1}
    assert torch.equal(stamped[labels == -1], x[labels == -1])
    assert bool((stamped[labels == 1][:, 0, 3, 3] == 1.0).all())
    assert bool((stamped[labels == 0][:, 0, 0, 3] == 0.0).all())
    # no trigger: nothing stamped
    same, none = _stamp_share(x, [], 1.0, InputSpec((1, 4, 4)), generator)
    assert same is x and bool((none == -1).all())


def test_the_fine_pruning_baseline_re_fits_every_row_on_clean_features_alone() -> None:
    """The baseline knows no trigger: at a classifier's input its closing edit re-fits
    every row on the clean features (no stamped images, no erasure), after its pruning."""
    finetune = FineTuneConfig(local_steps=0, final_scope="classifier")
    result = repair(
        ToyNet().eval(),
        toy_data(),
        InputSpec((1, 4, 4)),
        [toy_trigger()],
        mode="fine-pruning",
        layer="fc2:in",
        config=FinePruningConfig(finetune=finetune),
    )
    assert result.edit == "the classifier fc2 (re-fit)"
    note = next(n for n in result.notes if "edited by" in n)
    assert "re-fitting on the features of" in note and "stamped" not in note
    assert "erasure" not in note


def test_no_local_fine_tune_runs_when_the_classifier_is_edited_at_the_end() -> None:
    """With every row editable, pruning the trigger detector's input to fc2 is kept; with
    the classifier scope no end-to-end local fine-tune follows it (fc1 is never
    trained)."""
    model = ToyNet().eval()
    before = model.fc1.weight.detach().clone()
    finetune = FineTuneConfig(
        local_steps=30, final_scope="classifier", unlearn_jitter=0.0, edit_rows="all"
    )
    config = RollbackConfig(finetune=finetune)
    spec = InputSpec((1, 4, 4))
    result = repair(model, toy_data(), spec, [toy_trigger()], layer="fc2:in", config=config)
    assert any(step.action == "kept" for step in result.curve)
    assert result.model is not None
    assert torch.equal(result.model.state_dict()["fc1.weight"], before)
    assert any("no local fine-tunes" in note for note in result.notes)


def test_small_models_keep_the_end_to_end_fine_tune() -> None:
    """``auto`` re-fits only the classifier of a model of millions of weights."""
    model = ToyNet().eval()
    config = RollbackConfig(
        min_drop=1.1, min_soft_drop=None, finetune=FineTuneConfig(local_steps=0)
    )
    result = repair(
        model, toy_data(), InputSpec((1, 4, 4)), [toy_trigger()], layer="fc2:in", config=config
    )
    assert not any("edited by" in note for note in result.notes)


def test_an_edit_that_leaves_the_attack_must_not_also_break_the_model() -> None:
    from modelguard.repair.context import choose_edit

    # some edit removes the attack: the highest agreement among those that do
    removing = {"re-fit": (0.05, 0.93), "erasure (rank 2)": (0.08, 0.95), "x": (0.5, 1.0)}
    assert choose_edit(removing, 0.10, 0.97) == "erasure (rank 2)"
    # none does: the lowest ASR among those above the agreement floor …
    none = {
        "re-fit": (0.40, 0.99),
        "erasure (rank 1)": (0.30, 0.98),
        "erasure (rank 8)": (0.2, 0.4),
    }
    assert choose_edit(none, 0.10, 0.97) == "erasure (rank 1)"
    # … and when every edit is below the floor, the least damaging one
    broken = {"re-fit": (0.40, 0.90), "erasure (rank 8)": (0.20, 0.40)}
    assert choose_edit(broken, 0.10, 0.97) == "re-fit"
