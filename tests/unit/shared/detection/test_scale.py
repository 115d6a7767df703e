"""Trigger reversal at scale: label batches sized from a memory budget, the triage that
spends the full optimisation on a few labels of a many-class model, and the
``inconclusive`` verdict when the time budget runs out."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import nn

from modelguard.datasets import Dataset
from modelguard.detection import budget, neural_cleanse, neural_cleanse_sequential
from modelguard.detection.blend_probe import BlendProbeResult
from modelguard.detection.budget import (
    BASELINE_BYTES,
    CHANNELS_LAST_MIN_PIXELS,
    LAYOUT_TOLERANCE,
    REUSED_BLOCK_BYTES,
    PassCost,
    faster_layout,
    measure_pass_cost,
    pass_memory,
    trigger_state_bytes,
)
from modelguard.detection.neural_cleanse import (
    CLEAN,
    INCONCLUSIVE,
    INFECTED,
    ReversalConfig,
    decide,
    outliers_if_reached,
    reverse_triggers,
    screening_run,
)
from modelguard.detection.neural_cleanse_sequential import reverse_triggers_sequential
from modelguard.detection.optimizer import TriggerOptimizer, mask_from_theta
from modelguard.detection.triage import TriageResult, triage_labels
from modelguard.errors import InvalidInput
from modelguard.nn.layout import AS_LOADED, CHANNELS_LAST, weight_layout
from modelguard.spec import InputSpec
from tests.manyclass import ManyClassModel, train_many_class

CLASSES = 1000


@pytest.fixture(scope="module")
def many() -> ManyClassModel:
    torch.set_num_threads(1)
    made = train_many_class(CLASSES, side=32, target=617, seed=0)
    assert made.real_asr(made.module) > 0.9
    return made


def spec(side: int) -> InputSpec:
    return InputSpec((1, side, side), (0.0, 1.0))


def test_pass_cost_grows_with_the_activations() -> None:
    small = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    large = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.rand(2, 1, 16, 16)
    small(x), large(x)  # materialise the lazy layers
    cheap, costly = measure_pass_cost(small, x), measure_pass_cost(large, x)
    assert costly.bytes_per_image > 8 * cheap.bytes_per_image
    assert cheap.seconds_per_image > 0
    # 64 channels of 16×16 float32 saved by the ReLU alone
    assert costly.bytes_per_image >= 64 * 16 * 16 * 4


def test_pass_size_follows_the_memory_budget() -> None:
    cost = PassCost(bytes_per_image=100 << 20, seconds_per_image=0.1)
    shape = (3, 224, 224)
    roomy = cost.images_within(pass_memory(8192, 8, shape))
    tight = cost.images_within(pass_memory(2048, 8, shape))
    assert roomy > 3 * tight >= 3
    expected = ((2048 << 20) - BASELINE_BYTES - 8 * trigger_state_bytes(shape)) // (100 << 20)
    assert tight == expected
    with pytest.raises(InvalidInput, match="cannot hold the optimisation state of 1000 labels"):
        pass_memory(1024, 1000, shape)


def test_a_pass_keeps_its_largest_activation_in_reused_memory() -> None:
    """A tensor above the allocator's reuse limit costs fresh, zeroed pages on every pass:
    passes hold no more images than keep the largest activation below it, nor more than
    the memory budget allows."""
    cost = PassCost(
        bytes_per_image=100 << 20, seconds_per_image=0.1, largest_bytes_per_image=5 << 20
    )
    assert cost.images_per_pass(64 << 30) == REUSED_BLOCK_BYTES // (5 << 20)
    assert cost.images_per_pass(200 << 20) == 2  # the memory budget is the tighter limit
    huge = PassCost(bytes_per_image=1, seconds_per_image=0.1, largest_bytes_per_image=1 << 30)
    assert huge.images_per_pass(64 << 30) == 1
    wide = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.rand(2, 1, 16, 16)
    wide(x)
    measured = measure_pass_cost(wide, x)
    # the ReLU's 64 channels of 16×16 float32 are the largest tensor saved for one image
    assert measured.largest_bytes_per_image == 64 * 16 * 16 * 4
    assert measured.largest_bytes_per_image <= measured.bytes_per_image


def small_convnet(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(64, classes),
    ).eval()


def _laid_out(model: nn.Module) -> str:
    weight = next(p for p in model.parameters() if p.dim() == 4)
    return AS_LOADED if weight.is_contiguous() else CHANNELS_LAST


def _fake_clock(seconds: dict[str, float], timed: list[str]) -> Callable[..., PassCost]:
    """A `measure_pass_cost` whose time per image is ``seconds`` of the model's layout."""

    def timing(
        model: nn.Module, example: torch.Tensor, repeats: int = 2, images: int = 2
    ) -> PassCost:
        layout = _laid_out(model)
        timed.append(layout)
        return PassCost(bytes_per_image=1, seconds_per_image=seconds[layout])

    return timing


@pytest.mark.parametrize(
    ("channels_last_seconds", "chosen"),
    [
        (0.5, CHANNELS_LAST),
        (1 + LAYOUT_TOLERANCE / 2, CHANNELS_LAST),
        ((1 + LAYOUT_TOLERANCE) * 1.02, AS_LOADED),
    ],
    ids=["faster", "slower-within-the-tolerance", "just-past-the-tolerance"],
)
def test_channels_last_is_kept_unless_measured_clearly_slower(
    channels_last_seconds: float, chosen: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each layout is timed on the model itself, alternately (here a fake clock gives the
    model as loaded 1 s per image), and the model leaves with its own layout."""
    timed: list[str] = []
    seconds = {AS_LOADED: 1.0, CHANNELS_LAST: channels_last_seconds}
    monkeypatch.setattr(budget, "measure_pass_cost", _fake_clock(seconds, timed))
    model = small_convnet()
    side = int(CHANNELS_LAST_MIN_PIXELS**0.5)
    assert faster_layout(model, torch.rand(2, 3, side, side)) == chosen
    # three rounds, the order swapped every round
    assert timed == [AS_LOADED, CHANNELS_LAST, CHANNELS_LAST, AS_LOADED, AS_LOADED, CHANNELS_LAST]
    assert _laid_out(model) == AS_LOADED


def test_a_model_that_fails_channels_last_keeps_its_layout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class ViewsItsWeight(nn.Module):
        """Weight standardisation written with ``view``, which a channels-last weight
        refuses."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.conv.weight
            flat = w.view(w.shape[0], -1)
            standard = ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)).view_as(w)
            return nn.functional.conv2d(x, standard).mean((2, 3))

    model = ViewsItsWeight()
    with pytest.raises(RuntimeError, match="view"), weight_layout(model, CHANNELS_LAST):
        model(torch.rand(1, 3, 8, 8))
    side = int(CHANNELS_LAST_MIN_PIXELS**0.5)
    with caplog.at_level("WARNING", logger="modelguard.detection.budget"):
        assert faster_layout(model, torch.rand(2, 3, side, side)) == AS_LOADED
    assert "fails with channels-last weights" in caplog.text
    assert _laid_out(model) == AS_LOADED


def test_small_inputs_and_models_the_layout_would_not_change_are_not_measured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def timing(*args: object, **kwargs: object) -> PassCost:
        raise AssertionError("nothing to measure")

    monkeypatch.setattr(budget, "measure_pass_cost", timing)
    side = int(CHANNELS_LAST_MIN_PIXELS**0.5)
    below = torch.rand(2, 3, side - 1, side)
    assert faster_layout(small_convnet(), below) == AS_LOADED
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64 * 64, 3))
    assert faster_layout(mlp, torch.rand(2, 1, 64, 64)) == AS_LOADED
    already = small_convnet()
    with weight_layout(already, CHANNELS_LAST):
        assert faster_layout(already, torch.rand(2, 3, side, side)) == AS_LOADED


@pytest.mark.parametrize("normalised", [False, True], ids=["raw", "mean-std"])
def test_the_reversal_and_its_blend_probe_run_in_the_chosen_layout_and_give_the_model_back(
    normalised: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``weight_layout="auto"`` the measured choice (here a fake clock favouring
    channels-last) holds for the whole run, through the normalising wrapper, and is
    recorded; the model is given back as it came."""
    seen: list[str] = []
    real_cost, real_probe = neural_cleanse.measure_pass_cost, neural_cleanse.probe_blend

    def cost_spy(model: nn.Module, example: torch.Tensor, repeats: int = 2) -> PassCost:
        seen.append(f"cost:{_laid_out(model)}")
        return real_cost(model, example, repeats)

    def probe_spy(model: nn.Module, *args: object, **kwargs: object) -> BlendProbeResult:
        seen.append(f"probe:{_laid_out(model)}")
        return real_probe(model, *args, **kwargs)  # type: ignore[arg-type]

    clock = _fake_clock({AS_LOADED: 1.0, CHANNELS_LAST: 0.5}, [])
    monkeypatch.setattr(budget, "measure_pass_cost", clock)
    monkeypatch.setattr(neural_cleanse, "measure_pass_cost", cost_spy)
    monkeypatch.setattr(neural_cleanse, "probe_blend", probe_spy)
    model = small_convnet()

    def state() -> list[tuple[int, int, tuple[int, ...], bool]]:
        return [(id(p), p.data_ptr(), p.stride(), p.requires_grad) for p in model.parameters()]

    before = state()
    x = torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    data = Dataset(x, model(x).argmax(1))
    stats = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)} if normalised else {}
    spec = InputSpec((3, 64, 64), (0.0, 1.0), **stats)  # type: ignore[arg-type]
    config = ReversalConfig(steps=20, restarts=1, min_valid_labels=2)
    result = reverse_triggers(model, data, spec, config)
    assert seen == [f"cost:{CHANNELS_LAST}", f"probe:{CHANNELS_LAST}"]
    assert result.evidence["weight_layout"] == CHANNELS_LAST
    assert state() == before


def test_a_pinned_layout_is_not_measured_and_an_unknown_one_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def timing(*args: object, **kwargs: object) -> PassCost:
        raise AssertionError("a pinned layout is not measured")

    monkeypatch.setattr(budget, "measure_pass_cost", timing)
    model = small_convnet()
    x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    data = Dataset(x, model(x).argmax(1))
    spec = InputSpec((3, 64, 64), (0.0, 1.0))
    for pinned in (AS_LOADED, CHANNELS_LAST):
        config = ReversalConfig(
            steps=5, restarts=1, min_valid_labels=2, blend_probe=False, weight_layout=pinned
        )
        assert reverse_triggers(model, data, spec, config).evidence["weight_layout"] == pinned
    with pytest.raises(InvalidInput, match="weight_layout must be one of auto, as_loaded"):
        ReversalConfig(weight_layout="nhwc")


def test_the_sequential_baseline_runs_in_the_pinned_layout_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The faithful per-label detector honours the same setting, so a speed comparison of
    the two runs both in one layout; like the batched one, it leaves no gradient on the
    model's weights."""
    seen: list[str] = []
    real = neural_cleanse_sequential.reverse_label

    def spy(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        seen.append(_laid_out(model))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(neural_cleanse_sequential, "reverse_label", spy)
    model = small_convnet()
    pointers = [p.data_ptr() for p in model.parameters()]
    x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    config = ReversalConfig.paper(steps=3, weight_layout=CHANNELS_LAST)
    result = reverse_triggers_sequential(
        model, Dataset(x, model(x).argmax(1)), InputSpec((3, 64, 64), (0.0, 1.0)), config
    )
    assert seen == [CHANNELS_LAST] * 4 and result.evidence["weight_layout"] == CHANNELS_LAST
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_label_batches_under_a_memory_budget_give_the_masks_of_one_batch(
    many: ManyClassModel,
) -> None:
    """The same labels optimised in one forward pass or in passes of 8 images (4 images a
    label: two labels a pass): the same losses and attack success on a step (up to float
    summation order), and the same masks after 30 steps (Adam's first steps are ±lr
    whatever a gradient's size, so where gradients are near zero rounding flips single
    pixels: the comparison is on the masks as a whole)."""
    x, y = many.clean.x[:64], many.clean.y[:64]
    labels = [3, 617, 40, 999, 5]
    runs, stats = [], []
    for max_images in (4096, 8):
        settings = ReversalConfig(max_batch_images=max_images).optimizer_settings(screening=True)
        optimizer = TriggerOptimizer(
            many.module, x, y, labels, (0.0, 1.0), settings, torch.Generator().manual_seed(0)
        )
        stats.append(optimizer.step(torch.arange(len(labels)), x[:4], y[:4]))
        optimizer.optimize(30)
        runs.append(optimizer)
    assert torch.allclose(stats[0].ce, stats[1].ce, rtol=1e-5)
    assert torch.equal(stats[0].asr, stats[1].asr)
    one, chunked = (mask_from_theta(run.theta_mask) for run in runs)
    assert float((one - chunked).abs().mean()) < 1e-2
    assert torch.allclose(one.flatten(1).sum(1), chunked.flatten(1).sum(1), rtol=0.02)
    assert runs[0].evaluations == runs[1].evaluations


def triage_of(many: ManyClassModel, config: ReversalConfig, start: str = "") -> TriageResult:
    """The triage of ``many`` with ``config``'s settings (``start``: another mask start)."""
    settings = config.optimizer_settings(screening=True)
    return triage_labels(
        many.module,
        many.clean.x,
        many.clean.y,
        CLASSES,
        (0.0, 1.0),
        replace(settings, mask_start=start) if start else settings,
        steps=config.triage_steps,
        runs=config.triage_runs,
        seed=0,
        images_per_pass=256,
    )


def test_triage_keeps_the_planted_target_among_the_candidates(many: ManyClassModel) -> None:
    config = ReversalConfig()
    triage = triage_of(many, config)
    assert triage.complete
    assert many.target in triage.ranking[: config.triage_candidates]
    assert sorted(triage.ranking) == list(range(CLASSES))


def test_the_triage_keeps_its_own_starts_whatever_the_screening_starts_from(
    many: ManyClassModel,
) -> None:
    """The sink search's first run starts half-covering and the next ones faint, as its
    design says; the screening's ``mask_start`` must not change the ranking."""
    config = ReversalConfig()

    def ranked(start: str) -> tuple[tuple[int, ...], dict[int, float]]:
        triage = triage_of(many, config, start)
        return triage.ranking, triage.reached

    assert ranked("faint") == ranked("random")


def test_a_thousand_class_model_is_flagged_with_its_target(many: ManyClassModel) -> None:
    messages: list[tuple[float, str]] = []
    result = reverse_triggers(
        many.module,
        many.clean,
        spec(many.side),
        ReversalConfig(seed=0),
        progress=lambda f, m: messages.append((f, m)),
    )
    assert result.verdict == INFECTED and result.flagged == (617,)
    assert "triage" in result.evidence
    optimised = [r.label for r in result.labels if r.optimised]
    assert 617 in optimised and len(optimised) == len(result.labels_with_triggers) < 20
    assert len(result.labels) == CLASSES
    mask, pattern = result.trigger(617)
    assert mask.shape == (32, 32) and pattern.shape == (1, 32, 32)
    with pytest.raises(InvalidInput, match="no reversed trigger"):
        result.trigger(next(k for k in range(CLASSES) if k not in optimised))
    # progress: labels done and the time left, never backwards
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("left" in m and "labels" in m for _, m in messages)


def test_an_outlier_cleared_by_the_size_condition_is_named_in_the_summary(
    many: ManyClassModel,
) -> None:
    """A size bound no trigger can meet leaves the planted target an outlier by its index
    only: the verdict is clean, and the summary says which label and why."""
    result = reverse_triggers(
        many.module, many.clean, spec(many.side), ReversalConfig(seed=0, max_norm_ratio=0.001)
    )
    assert result.verdict == CLEAN and not result.flagged
    summary = result.evidence["summary"]
    target = next(r for r in result.labels if r.label == many.target)
    assert target.anomaly_index > 2
    assert f"label {many.target}: anomaly index {target.anomaly_index:.2f}" in summary
    assert "of the median" in summary and "0.001" in summary


def test_a_clean_thousand_class_model_is_not_flagged() -> None:
    clean = train_many_class(CLASSES, side=32, target=None, seed=1)
    result = reverse_triggers(clean.module, clean.clean, spec(32), ReversalConfig(seed=0))
    assert result.verdict == CLEAN, result.evidence["summary"]


def test_the_time_budget_running_out_is_inconclusive_never_clean(
    many: ManyClassModel,
) -> None:
    result = reverse_triggers(
        many.module, many.clean, spec(many.side), ReversalConfig(time_budget_seconds=0.05)
    )
    assert result.verdict == INCONCLUSIVE
    assert "time budget" in result.evidence["summary"]
    assert not result.flagged
    # the reason says what budget would do, from the speed measured on this machine
    reason = result.evidence["reason"]
    hint = re.search(r"raise --time-budget \(about (\d+) s for this model", reason)
    assert hint is not None, reason
    assert int(hint.group(1)) >= 60 and int(hint.group(1)) % 60 == 0


def test_too_few_triggers_for_the_outlier_test_is_inconclusive_with_its_reason(
    many: ManyClassModel,
) -> None:
    # one step from the faint start: no label's trigger reaches the attack threshold
    config = ReversalConfig(steps=1, screening_steps=1, restarts=1)
    result = reverse_triggers(many.module, many.clean, spec(many.side), config)
    assert result.verdict == INCONCLUSIVE and not result.flagged
    reason = result.evidence["reason"]
    assert "attack-success threshold" in reason and "--time-budget" not in reason
    assert result.evidence["summary"] == f"inconclusive: {reason}"


def test_labels_the_time_budget_kept_short_of_steps_are_told_the_budget_to_give(
    many: ManyClassModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the time budget affords 2 of the 300 screening steps (and 2 are let through)
    monkeypatch.setattr(neural_cleanse, "MIN_SCREENING_STEPS", 1)
    monkeypatch.setattr(neural_cleanse._Reversal, "affordable_steps", lambda *_: 2)
    result = reverse_triggers(
        many.module, many.clean, spec(many.side), ReversalConfig(steps=300, restarts=1)
    )
    assert result.verdict == INCONCLUSIVE and not result.flagged
    reason = result.evidence["reason"]
    assert "afforded 2 of 300 screening steps" in reason, reason
    hint = re.search(r"raise --time-budget \(about (\d+) s", reason)
    assert hint is not None and int(hint.group(1)) % 60 == 0, reason


def test_labels_without_a_trigger_cannot_hide_an_outlier_behind_their_spread() -> None:
    """Two small triggers among eight labels, two of which never reached one: counted as
    infinite norms those two double the spread and the small ones fall under the
    threshold; at their masks' last size (a lower bound) the small ones stand out."""
    config = ReversalConfig()
    norms = [80.0, 130.0, 3000.0, 3100.0, 3150.0, 3800.0, None, None]
    run = screening_run(norms, config, steps=150)
    assert decide([run], config).decided == ()
    last = [80.0, 130.0, 3000.0, 3100.0, 3150.0, 3800.0, 3600.0, 3750.0]
    assert outliers_if_reached([run], last, config) == (0, 1)
    # labels that would still be large change nothing
    assert outliers_if_reached([screening_run(norms[2:], config)], last[2:], config) == ()


def test_a_busy_first_speed_probe_is_measured_again_before_the_budget_cuts_the_screening(
    many: ManyClassModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A machine busy while the reversal first measures its speed (here: a first probe a
    thousand times slower) must not cut the screening short: before the budget cuts the
    steps the speed is measured again, and the faster figure holds."""
    real = neural_cleanse.measure_pass_cost
    probes: list[PassCost] = []

    def probe(model: nn.Module, example: torch.Tensor, repeats: int = 2) -> PassCost:
        cost = real(model, example, repeats)
        probes.append(cost)
        if len(probes) == 1:
            return replace(cost, seconds_per_image=cost.seconds_per_image * 1000)
        return cost

    monkeypatch.setattr(neural_cleanse, "measure_pass_cost", probe)
    result = reverse_triggers(many.module, many.clean, spec(many.side), ReversalConfig(seed=0))
    assert len(probes) == 2
    assert result.verdict == INFECTED and result.flagged == (617,), result.evidence.get("reason")


def _with_labels_cut_short(
    many: ManyClassModel,
    monkeypatch: pytest.MonkeyPatch,
    step_budget: int,
    hidden: tuple[int, ...],
) -> tuple[neural_cleanse.ReversalResult, list[list[float]]]:
    """A run whose time budget affords 60 screening steps of ``step_budget``, with fixed
    screening norms (not the optimisation's): the last two labels without a trigger, the
    others alike, so nothing is an outlier. The outlier test with those two at their
    masks' last size answers ``hidden`` (the test itself is checked as a function
    above). Returns the result and the last norms that test was given."""
    original = neural_cleanse._Reversal.screen

    def screen(self: neural_cleanse._Reversal, *args: object, **kwargs: object) -> object:
        optimizer, info = original(self, *args, **kwargs)  # type: ignore[arg-type]
        count = len(info.norms)
        norms = [100.0 + k for k in range(count - 2)] + [None, None]
        return optimizer, screening_run(norms, self.config, seed=info.seed, steps=60)

    given: list[list[float]] = []

    def answer(_infos: object, last_norms: list[float], _config: object) -> tuple[int, ...]:
        given.append(list(last_norms))
        return hidden

    monkeypatch.setattr(neural_cleanse._Reversal, "screen", screen)
    monkeypatch.setattr(neural_cleanse._Reversal, "affordable_steps", lambda *_: 60)
    monkeypatch.setattr(neural_cleanse, "outliers_if_reached", answer)
    config = ReversalConfig(steps=step_budget, restarts=1)
    return reverse_triggers(many.module, many.clean, spec(many.side), config), given


def test_a_clean_verdict_the_budget_cut_short_must_survive_the_unreached_labels(
    many: ManyClassModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    result, given = _with_labels_cut_short(many, monkeypatch, 300, hidden=(0,))
    assert result.verdict == INCONCLUSIVE and not result.flagged
    first = result.trigger_labels[0]
    assert tuple(result.evidence["outliers_if_reached"]) == (first,)
    reason = result.evidence["reason"]
    assert f"labels {first} would be outliers had the 2 labels without a trigger" in reason
    assert "afforded only 60 of 300 screening steps" in reason, reason
    # the unreached labels enter at the size of the masks the result returns for them
    (norms,) = given
    for position in (-2, -1):
        label = result.trigger_labels[position]
        assert norms[position] == pytest.approx(result.labels[label].trigger_norm)
    # the outlier test finds nothing with them either: clean stands
    result, _ = _with_labels_cut_short(many, monkeypatch, 300, hidden=())
    assert result.verdict == CLEAN
    assert "outliers_if_reached" not in result.evidence


def test_a_clean_verdict_the_budget_did_not_cut_is_not_asked_again(
    many: ManyClassModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All 60 steps of a 60-step budget ran: labels without a trigger had their steps."""
    result, given = _with_labels_cut_short(many, monkeypatch, 60, hidden=(0,))
    assert result.verdict == CLEAN and given == []


def test_after_a_triage_a_restart_screens_only_the_labels_in_doubt(many: ManyClassModel) -> None:
    """A second run of every label rarely fits a many-class model's time budget: the
    restart re-screens the labels in doubt and scores them against the first run."""
    first = reverse_triggers(many.module, many.clean, spec(many.side), ReversalConfig(seed=0))
    position = first.trigger_labels.index(many.target)
    index = first.restarts[0].anomaly_index[position]
    assert index is not None and index > 0
    # a threshold at the target's own index puts it in doubt
    result = reverse_triggers(
        many.module, many.clean, spec(many.side), ReversalConfig(seed=0, anomaly_threshold=index)
    )
    assert len(result.restarts) >= 2
    full, again = result.restarts[0], result.restarts[1]
    assert full.screened is None
    assert again.screened is not None and position in again.screened
    assert len(again.screened) < len(result.trigger_labels)
    for k, norm in enumerate(again.norms):
        if k not in again.screened:
            assert norm == full.norms[k]
    # another random start: another trigger for the label in doubt
    assert again.norms[position] != full.norms[position]
    assert again.to_dict()["screened"] == list(again.screened)
    summary = result.evidence["summary"]
    assert re.search(rf"labels \[[^\]]*\b{many.target}\b[^\]]*\] were screened again", summary)
