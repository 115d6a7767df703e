"""Per-layer features against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from modelguard.leak.detector import module_from_state_dict
from modelguard.leak.features import FeatureConfig, layer_statistics, tensor_statistics
from modelguard.nn.architectures import build

torch.set_num_threads(1)


def stats(values: list[float], **config: int | float) -> object:
    return tensor_statistics(
        "w", torch.tensor(values, dtype=torch.float32), FeatureConfig(**config)
    )


def test_moments_match_hand_computation() -> None:
    # deviations from the mean 4: -3 -2 -1 0 6
    s = tensor_statistics("w", torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0]))
    assert s.count == 5 and s.min == 1.0 and s.max == 10.0
    assert s.mean == pytest.approx(4.0)
    assert s.variance == pytest.approx(10.0)  # (9 + 4 + 1 + 0 + 36) / 5
    assert s.skewness == pytest.approx(36.0 / 10.0**1.5, rel=1e-5)  # m3 = 180/5
    assert s.kurtosis == pytest.approx(278.8 / 100.0 - 3.0, rel=1e-5)  # m4 = 1394/5
    assert s.tail_fraction == 0.0  # nothing beyond 3σ = 9.49
    wide = tensor_statistics(
        "w", torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0]), FeatureConfig(tail_sigma=1.5)
    )
    assert wide.tail_fraction == pytest.approx(0.2)  # only |6| > 1.5σ = 4.74


def test_moments_match_scipy_on_random_weights() -> None:
    from scipy import stats as sps

    generator = torch.Generator().manual_seed(0)
    w = torch.randn(5000, generator=generator) ** 3
    s = tensor_statistics("w", w)
    x = w.double().numpy()
    assert s.mean == pytest.approx(float(x.mean()), abs=1e-5)
    assert s.variance == pytest.approx(float(x.var()), rel=1e-4)
    assert s.skewness == pytest.approx(float(sps.skew(x)), rel=1e-3)
    assert s.kurtosis == pytest.approx(float(sps.kurtosis(x)), rel=1e-3)
    z = np.abs(x - x.mean()) / x.std()
    assert s.tail_fraction == pytest.approx(float((z > 3).mean()))


def test_sign_features_by_hand() -> None:
    s = stats([-1.0, 2.0, 3.0, 0.0, -5.0, 6.0])
    assert s.positive_fraction == pytest.approx(3 / 5)  # zeros are left out
    assert s.zero_fraction == pytest.approx(1 / 6)
    # signs 1 1 -1 -1 1 1: mean 1/3, variance 8/9, centred lag-1 products sum to 8/9
    # over 5 pairs -> (8/45) / (8/9) = 0.2
    t = stats([1.0, 2.0, -1.0, -2.0, 3.0, 4.0])
    assert t.sign_autocorrelation == pytest.approx(0.2, abs=1e-6)


def test_positive_fraction_stderr_is_cluster_robust() -> None:
    # 4 units of 10 weights with 2, 4, 6, 8 positive: per-unit fractions 0.2 0.4 0.6 0.8
    rows = []
    for positive in (2, 4, 6, 8):
        rows.append([1.0] * positive + [-1.0] * (10 - positive))
    s = tensor_statistics("w", torch.tensor(rows))
    assert s.units == 4
    spread = math.sqrt((0.09 + 0.01 + 0.01 + 0.09) / 3)
    assert s.positive_fraction_stderr == pytest.approx(spread / 2, rel=1e-5)
    # identical units: the binomial error is the floor
    same = tensor_statistics("w", torch.tensor([[1.0, -1.0] * 5] * 4))
    assert same.positive_fraction_stderr == pytest.approx(math.sqrt(0.25 / 40), rel=1e-5)


def test_autocorrelation_by_loop() -> None:
    values = [1.0, 2.0, 4.0, 3.0, 6.0, 5.0, 7.0, 10.0, 8.0, 9.0]
    s = stats(values, max_lag=3)
    x = np.array(values)
    z = (x - x.mean()) / x.std()
    per_lag = [
        float(np.mean([z[i] * z[i + lag] for i in range(len(z) - lag)])) for lag in (1, 2, 3)
    ]
    assert s.autocorrelation == pytest.approx(max(per_lag), abs=1e-5)
    assert s.autocorrelation_lag == 1 + int(np.argmax(per_lag))


def test_quantile_skewness_by_hand() -> None:
    # linear-interpolated quantiles of 1..9, 101: Q10 = 1.9, Q50 = 5.5, Q90 = 18.2
    s = stats([1, 2, 3, 4, 5, 6, 7, 8, 9, 101])
    assert s.quantile_skewness == pytest.approx((18.2 + 1.9 - 11.0) / (18.2 - 1.9), rel=1e-5)
    # two lobes with a hole at the centre (magnitude pruning), 20 negative and 21
    # positive values: Q50 = 1.1 sits on the upper lobe and Kelly would say -0.41, but
    # Q55 - Q45 = 2.6 > 0.3 (Q90 - Q10) = 1.62, so the midhinge (Q25 + Q75)/2 stands in
    lobes = [-1.2 - 0.1 * k for k in range(20)] + [1.1 + 0.1 * k for k in range(21)]
    q = np.quantile(lobes, [0.1, 0.25, 0.45, 0.5, 0.55, 0.75, 0.9])
    assert q[4] - q[2] > 0.3 * (q[6] - q[0])
    expected = (q[6] + q[0] - (q[1] + q[5])) / (q[6] - q[0])
    assert stats(lobes).quantile_skewness == pytest.approx(expected, abs=1e-5)
    assert abs(expected) < 0.1
    assert stats(list(range(1, 12))).quantile_skewness == pytest.approx(0.0, abs=1e-6)


def test_exact_zeros_are_left_out_of_sign_and_neighbour_features() -> None:
    generator = torch.Generator().manual_seed(4)
    w = torch.randn(64, 64, generator=generator)
    pruned = w.clone()
    pruned[:, ::2] = 0.0  # magnitude pruning leaves exact zeros
    dense, sparse = tensor_statistics("w", w[:, 1::2].contiguous()), tensor_statistics("w", pruned)
    assert sparse.zero_fraction == pytest.approx(0.5)
    assert sparse.quantile_skewness == pytest.approx(dense.quantile_skewness, abs=1e-4)
    assert sparse.positive_fraction == pytest.approx(dense.positive_fraction)
    assert abs(sparse.quantile_skewness) < 0.1  # not the ~1 that the zero spike would give


def test_histogram_quantiles_agree_with_exact_ones() -> None:
    generator = torch.Generator().manual_seed(1)
    w = torch.rand(100_000, generator=generator) ** 3  # strongly skewed
    fast = tensor_statistics("w", w)  # beyond exact_quantile_limit: histogram path
    exact = tensor_statistics("w", w, FeatureConfig(exact_quantile_limit=10**7))
    q = np.quantile(w.double().numpy(), [0.1, 0.5, 0.9])
    expected = (q[2] + q[0] - 2 * q[1]) / (q[2] - q[0])
    assert exact.quantile_skewness == pytest.approx(expected, abs=1e-5)
    assert fast.quantile_skewness == pytest.approx(expected, abs=2e-3)


def test_neighbour_cokurtosis_by_loop_and_by_construction() -> None:
    values = [0.5, -1.0, 2.0, 1.5, -0.5, 0.25, 3.0, -2.0]
    x = np.array(values)
    z = (x - x.mean()) / x.std()
    a, b = z[:-1], z[1:]
    expected = np.mean(a * a * b * b) - np.mean(a * a) * np.mean(b * b) - 2 * np.mean(a * b) ** 2
    assert stats(values).neighbour_cokurtosis == pytest.approx(float(expected), abs=1e-5)

    generator = torch.Generator().manual_seed(2)
    n = 200_000
    # independent weights, whatever their law: ~0
    uniform = tensor_statistics("u", torch.rand(n, generator=generator))
    assert abs(uniform.neighbour_cokurtosis) < 0.03
    # a smooth Gaussian field (moving average of noise): ~0
    noise = torch.randn(n + 3, generator=generator)
    smooth = (noise[:-3] + noise[1:-2] + noise[2:-1] + noise[3:]) / 2
    assert abs(tensor_statistics("s", smooth).neighbour_cokurtosis) < 0.05
    # neighbours sharing a two-level component (object/background runs): negative
    runs = torch.repeat_interleave(torch.randint(0, 2, (n // 8,), generator=generator).float(), 8)
    shared = tensor_statistics("r", runs + 0.3 * torch.randn(n, generator=generator))
    assert shared.neighbour_cokurtosis < -0.5
    # scale varying smoothly along the tensor: positive
    scale = torch.repeat_interleave(torch.rand(n // 100, generator=generator) * 3, 100)
    assert (
        tensor_statistics("v", scale * torch.randn(n, generator=generator)).neighbour_cokurtosis
        > 0.5
    )


def test_degenerate_tensors_give_finite_statistics() -> None:
    constant = tensor_statistics("c", torch.full((8, 8), 0.25))
    assert (
        constant.variance == 0.0 and constant.skewness == 0.0 and constant.positive_fraction == 1.0
    )
    zeros = tensor_statistics("z", torch.zeros(8, 8))
    assert zeros.zero_fraction == 1.0 and zeros.positive_fraction == 0.5
    w = torch.randn(10, 10)
    w[0, 0], w[1, 1] = float("nan"), float("inf")
    s = tensor_statistics("n", w)
    assert s.nonfinite == 2 and s.count == 98 and math.isfinite(s.skewness)
    assert all(math.isfinite(v) for v in s.to_dict().values() if isinstance(v, float))


def test_large_tensors_are_sampled_but_moments_stay_exact() -> None:
    generator = torch.Generator().manual_seed(3)
    w = torch.randn(600, 1000, generator=generator) * 0.1 + 0.01
    s = tensor_statistics("big", w, FeatureConfig(max_sample=1 << 16))
    assert s.count == 600_000 and s.sampled == 1 << 16
    assert s.mean == pytest.approx(float(w.double().mean()), abs=1e-6)
    assert s.variance == pytest.approx(float(w.double().var(unbiased=False)), rel=1e-5)
    assert abs(s.skewness) < 0.05 and abs(s.quantile_skewness) < 0.03


def test_layer_statistics_walks_linear_and_conv_weights() -> None:
    torch.manual_seed(0)
    model = build("lenet5")
    layers = layer_statistics(model)
    assert [(s.layer, s.count) for s in layers] == [
        ("conv1", 150), ("conv2", 2400), ("fc1", 48000), ("fc2", 10080), ("fc3", 840)
    ]  # fmt: skip
    assert layers[1].shape == (16, 6, 5, 5) and layers[1].units == 16
    assert [s.layer for s in layer_statistics(model, FeatureConfig(min_count=1000))] == [
        "conv2", "fc1", "fc2"
    ]  # fmt: skip
    # the same numbers through TorchScript and through a bare state dict
    scripted = layer_statistics(torch.jit.script(model))
    bare = layer_statistics(module_from_state_dict(model.state_dict()))
    for other in (scripted, bare):
        assert [s.to_dict() for s in other] == [s.to_dict() for s in layers]
    json.dumps([s.to_dict() for s in layers])  # serialisable as is
    # biases and BatchNorm vectors are not weights of Linear/Conv layers
    assert all(s.layer != "bn1" for s in layer_statistics(build("resnet18_small")))


def test_module_from_state_dict_skips_what_is_not_a_float_tensor() -> None:
    state = {
        "a.b.weight": torch.ones(3, 3),
        "a.b.bias": torch.ones(3),
        "counter": torch.tensor(3),
        "meta": "x",
        "a.b": torch.zeros(2, 2),  # clashes with the module a.b: kept under another name
    }
    module = module_from_state_dict(state)
    names = dict(module.named_parameters())
    assert "a.b.weight" in names and "a.b.bias" in names and "counter" not in names
    assert any(torch.equal(p, torch.zeros(2, 2)) for p in names.values())
    assert isinstance(module, nn.Module)
