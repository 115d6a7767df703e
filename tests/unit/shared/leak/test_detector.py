"""The leak detector: verdicts on planted and trained encodings, on benign models of
kinds it was never calibrated on, its output contract, its calibration, and the pruning
defence."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from modelguard.attacks import leak
from modelguard.datasets import Dataset, load_mnist
from modelguard.errors import NotFound
from modelguard.leak.calibration import (
    Calibration,
    FeatureRule,
    fit_calibration,
    load_calibration,
)
from modelguard.leak.detector import LEAK, DetectorConfig, detect_leak
from modelguard.leak.features import layer_kind, layer_statistics
from modelguard.leak.pruning_defence import (
    PruningDefenceConfig,
    mean_activations,
    prune_dormant_neurons,
)
from modelguard.nn.architectures import build
from modelguard.nn.training import TrainConfig, accuracy, train_classifier
from tests.requirements import skip_or_fail

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mnist() -> tuple[Dataset, Dataset]:
    try:
        return load_mnist("train").subset(3000, seed=1), load_mnist("test").subset(1000, seed=2)
    except NotFound as err:
        skip_or_fail(f"the MNIST data set is missing: {err}")


def _linear(weight: torch.Tensor) -> nn.Module:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
    return nn.Sequential(layer)


# ---------------------------------------------------------------------------- calibration


def test_shipped_calibration_is_coherent() -> None:
    calibration = load_calibration()
    provenance = calibration.provenance
    assert (
        provenance["benign_max_score"] < calibration.threshold < provenance["malicious_min_score"]
    )
    assert {r.feature for r in calibration.rules} == {
        "sign_imbalance", "quantile_skewness", "negative_cokurtosis"
    }  # fmt: skip
    assert provenance["benign_models"] >= 20 and provenance["malicious_models"] >= 20


# ---------------------------------------------------------------------------- planted encodings


def test_planted_correlated_value_encoding_is_flagged(mnist: tuple[Dataset, Dataset]) -> None:
    """fc1-shaped weights = MNIST pixels + 40% noise (decoded correlation ~0.9)."""
    train, _ = mnist
    generator = torch.Generator().manual_seed(0)
    pixels = train.x[:62].reshape(-1)[: 120 * 400].reshape(120, 400)
    pixels = (pixels - pixels.mean()) / pixels.std()
    weight = pixels + 0.4 * torch.randn(120, 400, generator=generator)
    decoded, original = (
        weight.reshape(-1)[:784].reshape(1, -1),
        pixels.reshape(-1)[:784].reshape(1, -1),
    )
    assert leak.image_correlation(decoded, original) > 0.85
    verdict = detect_leak(_linear(weight * 0.05))
    assert verdict.verdict == LEAK
    assert verdict.evidence[0].layer == "0"
    assert {e.feature for e in verdict.evidence} & {"quantile_skewness", "sign_imbalance"}


def test_planted_sign_encoding_is_flagged(mnist: tuple[Dataset, Dataset]) -> None:
    train, _ = mnist
    attack = leak.SignEncoding()
    bits = attack.secret(train.x[:8])[: 120 * 400].reshape(120, 400)
    generator = torch.Generator().manual_seed(1)
    magnitude = torch.rand(120, 400, generator=generator) * 0.05
    verdict = detect_leak(_linear(bits * magnitude))
    assert verdict.verdict == LEAK
    assert verdict.evidence[0].feature == "sign_imbalance"
    assert verdict.evidence[0].value > 0.2


@pytest.mark.parametrize(
    "name",
    ["normal", "laplace", "uniform", "student", "pruned", "zeros", "heteroscedastic", "smooth"],
)
def test_benign_looking_weights_are_not_flagged(name: str) -> None:
    generator = torch.Generator().manual_seed(5)
    shape = (256, 512)
    if name == "normal":
        w = torch.randn(shape, generator=generator)
    elif name == "laplace":  # what L1 regularisation gives
        u = torch.rand(shape, generator=generator) - 0.5
        w = -torch.sign(u) * torch.log1p(-2 * u.abs())
    elif name == "uniform":  # PyTorch's default initialisation
        w = torch.rand(shape, generator=generator) * 2 - 1
    elif name == "student":  # heavy tails of long training
        w = torch.randn(shape, generator=generator) / torch.sqrt(
            torch.rand(shape, generator=generator) + 0.05
        )
    elif name == "pruned":  # 70% magnitude pruning
        w = torch.randn(shape, generator=generator)
        w[w.abs() < 1.04] = 0.0
    elif name == "zeros":
        w = torch.zeros(shape)
    elif name == "heteroscedastic":  # units of very different scales
        w = (
            torch.randn(shape, generator=generator)
            * torch.rand(shape[0], 1, generator=generator)
            * 4
        )
    else:  # smooth learned templates (an MLP's first layer)
        noise = torch.randn(shape[0], shape[1] + 8, generator=generator)
        w = sum(noise[:, i : i + shape[1]] for i in range(8)) / 8 + 0.3 * torch.randn(
            shape, generator=generator
        )
    verdict = detect_leak(_linear(w * 0.02))
    assert verdict.verdict == "benign", verdict.evidence


def test_scale_and_layer_order_do_not_matter() -> None:
    torch.manual_seed(0)
    model = build("lenet5")
    base = detect_leak(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(37.0)
    scaled = detect_leak(model)
    assert scaled.score == pytest.approx(base.score, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("arch", ["vgg_small", "resnet18_small"])
def test_untrained_and_unfamiliar_architectures_are_benign(arch: str) -> None:
    torch.manual_seed(0)
    assert detect_leak(build(arch)).verdict == "benign"
    wide = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.Linear(2048, 10)
    )
    assert detect_leak(wide).verdict == "benign"


# ---------------------------------------------------------------------------- trained in the test

_RECIPE = TrainConfig(epochs=2, batch_size=64, seed=0)


def test_benign_trained_model_not_flagged(mnist: tuple[Dataset, Dataset]) -> None:
    train, test = mnist
    torch.manual_seed(0)
    model = train_classifier(build("lenet5"), train, _RECIPE)
    assert accuracy(model, test) > 0.8
    verdict = detect_leak(model)
    assert verdict.verdict == "benign"
    assert verdict.score < verdict.threshold


def test_sign_encoding_trained_in_the_test_is_flagged(mnist: tuple[Dataset, Dataset]) -> None:
    train, _ = mnist
    torch.manual_seed(0)
    stolen = leak.train_with_sign_encoding(
        build("lenet5"), train, _RECIPE, leak.SignEncodingConfig(strength=200.0, layers=("fc1",))
    )
    assert stolen.figures.bit_accuracy is not None and stolen.figures.bit_accuracy > 0.85
    verdict = detect_leak(stolen.model)
    assert verdict.verdict == LEAK
    assert (verdict.evidence[0].layer, verdict.evidence[0].feature) == ("fc1", "sign_imbalance")


def test_correlated_value_encoding_trained_in_the_test_is_flagged(
    mnist: tuple[Dataset, Dataset],
) -> None:
    train, _ = mnist
    torch.manual_seed(0)
    stolen = leak.train_with_cve(
        build("lenet5"), train, _RECIPE, leak.CorrelatedValueConfig(strength=1.0, layers=("fc1",))
    )
    assert stolen.figures.correlation > 0.5
    verdict = detect_leak(stolen.model)
    assert verdict.verdict == LEAK
    assert verdict.evidence[0].layer == "fc1"


# ---------------------------------------------------------------------------- contract


def test_verdict_contract_for_the_service() -> None:
    torch.manual_seed(0)
    model = build("lenet5")
    with torch.no_grad():
        model.fc2.weight.abs_()  # every sign positive
    verdict = detect_leak(model, DetectorConfig(threshold=1.0))
    assert verdict.verdict == LEAK
    assert (verdict.evidence[0].layer, verdict.evidence[0].feature) == ("fc2", "sign_imbalance")
    document = verdict.to_dict()
    json.dumps(document)
    assert set(document) >= {"verdict", "score", "threshold", "evidence", "layers", "seconds"}
    for layer in document["layers"]:  # type: ignore[union-attr]
        assert {
            "layer",
            "count",
            "min",
            "max",
            "mean",
            "variance",
            "skewness",
            "kurtosis",
            "tail_fraction",
        } <= set(layer)
    for item in document["evidence"]:  # type: ignore[union-attr]
        assert {"layer", "feature", "value"} <= set(item)
    assert 0 < verdict.seconds < 5
    with pytest.raises(ValueError):
        DetectorConfig(threshold=-1.0)


def test_torchscript_module_is_audited_like_the_eager_one() -> None:
    torch.manual_seed(0)
    model = build("lenet5")
    assert detect_leak(torch.jit.script(model)).score == pytest.approx(detect_leak(model).score)


def test_fit_calibration_places_the_threshold_between_the_classes() -> None:
    generator = torch.Generator().manual_seed(6)
    benign = [
        layer_statistics(_linear(torch.randn(64, 256, generator=generator))) for _ in range(4)
    ]
    signs = torch.where(torch.rand(64, 256, generator=generator) < 0.2, 1.0, -1.0)
    malicious = [layer_statistics(_linear(signs * torch.rand(64, 256, generator=generator)))]
    calibration = fit_calibration(benign, malicious)
    details = calibration.provenance
    # benign layers stay under the floors here, so 1 (the floor) is the benign reference
    assert details["benign_max_score"] <= 1.0 + 1e-9
    assert 1.0 < calibration.threshold < details["malicious_min_score"]
    assert math.isclose(
        calibration.threshold, math.sqrt(details["malicious_min_score"]), rel_tol=1e-3
    )
    roundtrip = type(calibration).from_dict(json.loads(json.dumps(calibration.to_dict())))
    assert roundtrip.threshold == calibration.threshold
    with pytest.raises(ValueError, match="separate"):
        fit_calibration(malicious, benign)


# ---------------------------------------------------------------------------- pruning defence


def _toy() -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[1.0, -1.0, 5.0], [-1.0, 1.0, -5.0]]))
        model[2].bias.zero_()
    return model


def test_mean_activations_by_hand() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # pre-activations [[1, 2, -3], [3, 4, -7]] -> ReLU means [2, 3, 0]
    means = mean_activations(_toy(), x, ("0",))
    assert torch.allclose(means["0"], torch.tensor([2.0, 3.0, 0.0]))


def test_pruning_zeroes_the_least_active_units_of_a_copy() -> None:
    model = _toy()
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    result = prune_dormant_neurons(
        model, x, config=PruningDefenceConfig(fraction=0.34, step=0.34, max_accuracy_drop=None)
    )
    assert result.layers[0].pruned == [2]
    assert torch.equal(result.model[0].weight[2], torch.zeros(2))
    assert float(result.model[0].bias.detach()[2]) == 0.0
    assert torch.equal(model[0].weight[2], torch.tensor([-1.0, -1.0]))  # input untouched


def test_pruning_guard_rolls_back_a_prune_that_costs_accuracy() -> None:
    model = _toy()
    # unit 1 is the less active one here, and the only one telling the classes apart
    x = torch.tensor([[1.0, 0.2], [1.0, 0.0], [1.2, 0.1]])
    y = torch.tensor([1, 0, 1])
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[0.0, -10.0, 0.0], [0.0, 10.0, 0.0]]))
        model[2].bias.copy_(torch.tensor([0.5, -0.5]))
    assert accuracy(model, Dataset(x, y)) == 1.0
    config = PruningDefenceConfig(fraction=0.67, step=0.34, max_accuracy_drop=0.0)
    result = prune_dormant_neurons(model, x, y, config)
    assert 1 not in result.layers[0].pruned
    assert result.accuracy_after == result.accuracy_before == 1.0


def test_finetuning_after_pruning_keeps_pruned_units_at_zero() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=generator)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    config = PruningDefenceConfig(fraction=0.5, max_accuracy_drop=None, finetune_epochs=3)
    result = prune_dormant_neurons(model, x, y, config)
    pruned = result.layers[0].pruned
    assert len(pruned) == 4
    assert torch.count_nonzero(result.model[0].weight[pruned]) == 0
    assert torch.count_nonzero(result.model[0].bias[pruned]) == 0


# ---------------------------------------------------------------------------- layer kinds


def test_layer_kinds_follow_the_weight_shape() -> None:
    assert layer_kind((10, 20)) == "dense"
    assert layer_kind((32, 16, 1, 1)) == "pointwise"
    assert layer_kind((96, 1, 3, 3)) == "depthwise"
    assert layer_kind((32, 16, 3, 3)) == "conv"


def _depthwise(weight: torch.Tensor) -> nn.Module:
    layer = nn.Conv2d(weight.shape[0], weight.shape[0], 3, groups=weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return nn.Sequential(layer)


def _centre_heavy(channels: int, generator: torch.Generator) -> torch.Tensor:
    """Depthwise kernels as trained networks have them: a positive centre, smaller
    surroundings of either sign, so most weights are positive."""
    kernel = 0.2 + 0.1 * torch.randn(channels, 1, 3, 3, generator=generator)
    kernel[:, :, 1, 1] += 1.0
    return kernel


def test_a_layer_is_judged_against_the_benign_envelope_of_its_own_kind() -> None:
    generator = torch.Generator().manual_seed(7)
    dense = [layer_statistics(_linear(torch.randn(64, 256, generator=generator))) for _ in range(3)]
    depthwise = [layer_statistics(_depthwise(_centre_heavy(512, generator))) for _ in range(3)]
    signs = torch.where(torch.rand(64, 256, generator=generator) < 0.2, 1.0, -1.0)
    malicious = [layer_statistics(_linear(signs * torch.rand(64, 256, generator=generator)))]
    calibration = fit_calibration(dense + depthwise, malicious)
    assert {"dense", "depthwise"} <= set(calibration.kinds)
    sign = "sign_imbalance"
    assert calibration.bound(sign, "depthwise") > 3 * calibration.bound(sign, "dense")
    # a new centre-heavy depthwise layer is normal for its kind ...
    fresh = _depthwise(_centre_heavy(512, generator))
    assert detect_leak(fresh, calibration=calibration).verdict == "benign"
    # ... and judged by the dense envelope (a calibration without depthwise layers, as
    # before) it would have been a false alarm
    dense_only = fit_calibration(dense, malicious)
    assert "depthwise" not in dense_only.kinds
    assert detect_leak(fresh, calibration=dense_only).verdict == "leak"
    # the same sign encoding stays caught
    assert detect_leak(
        _linear(signs * torch.rand(64, 256, generator=generator)), calibration=calibration
    ).leak


def test_kinds_without_calibration_layers_borrow_the_nearest_kind() -> None:
    rules = tuple(
        FeatureRule(feature, bound, 0.0, kind)
        for kind, bound in (("dense", 0.1), ("conv", 0.3))
        for feature in ("sign_imbalance", "quantile_skewness", "negative_cokurtosis")
    )
    calibration = Calibration(rules, threshold=1.2)
    assert calibration.bound("sign_imbalance", "pointwise") == 0.1
    assert calibration.bound("sign_imbalance", "depthwise") == 0.3
    legacy = Calibration.from_dict(
        {
            "threshold": 1.2,
            "min_count": 1024,
            "confidence": 0.999,
            "rules": [{"feature": "sign_imbalance", "bound": 0.05, "floor": 0.03}],
        }
    )
    assert legacy.bound("sign_imbalance", "depthwise") == 0.05
