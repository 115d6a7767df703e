"""The MAD outlier test of Neural Cleanse against values computed by hand."""

from __future__ import annotations

import math
import statistics

import pytest

from modelguard.detection.mad import MEAN_AD_CONSISTENCY, mad_test


def test_ten_labels_one_small_outlier() -> None:
    # sorted: 10 47 48 49 50 | 50 51 52 53 55 -> median 50
    # |a - 50| = 40 0 2 2 1 1 3 3 0 5 -> sorted 0 0 1 1 2 | 2 3 3 5 40 -> median 2
    # MAD = 1.4826 * 2 = 2.9652
    norms = [10.0, 50.0, 52.0, 48.0, 51.0, 49.0, 53.0, 47.0, 50.0, 55.0]
    result = mad_test(norms)
    assert result.median == 50.0
    assert result.mad == pytest.approx(2.9652)
    assert result.rule == "mad"
    assert result.anomaly_index[0] == pytest.approx(40 / 2.9652)  # 13.4898
    assert result.anomaly_index[9] == pytest.approx(5 / 2.9652)  # 1.6862
    assert result.anomaly_index[1] == 0.0
    assert result.flagged == (0,)


def test_only_labels_below_the_median_are_flagged() -> None:
    # median 3, deviations 2 1 0 1 97 -> median(b) 1, MAD 1.4826
    result = mad_test([1.0, 2.0, 3.0, 4.0, 100.0])
    assert result.anomaly_index[0] == pytest.approx(2 / 1.4826)  # 1.349
    assert result.anomaly_index[4] == pytest.approx(97 / 1.4826)  # 65.43, but above
    assert result.flagged == ()


def test_threshold_is_strict_and_configurable() -> None:
    # median 10, deviations 4 0 0 1 1 -> sorted 0 0 1 1 4 -> median 1 -> MAD 1.4826
    norms = [6.0, 10.0, 10.0, 11.0, 9.0]
    index = 4 / 1.4826  # 2.698
    assert mad_test(norms).flagged == (0,)
    assert mad_test(norms, threshold=index).flagged == ()  # "> threshold", not ">="
    assert mad_test(norms, threshold=3.0).flagged == ()
    # a different consistency constant scales every index
    assert mad_test(norms, consistency=1.0).anomaly_index[0] == pytest.approx(4.0)


def test_unreached_labels_are_censored_not_flagged() -> None:
    # None and inf are "no trigger": they count as +inf in the median and MAD
    # values inf 10 20 30 inf -> sorted 10 20 30 inf inf -> median 30
    # deviations inf 20 10 0 inf -> sorted 0 10 20 inf inf -> median 20 -> MAD 29.652
    result = mad_test([None, 10.0, 20.0, 30.0, math.inf])
    assert result.median == 30.0
    assert result.mad == pytest.approx(29.652)
    assert result.anomaly_index[0] is None
    assert result.anomaly_index[4] is None
    assert result.anomaly_index[1] == pytest.approx(20 / 29.652)  # 0.6745
    assert result.valid == (False, True, True, True, False)
    assert result.flagged == ()


def test_nan_norm_counts_as_unreached() -> None:
    result = mad_test([math.nan, 1.0, 50.0, 51.0, 52.0, 53.0])
    assert result.anomaly_index[0] is None
    assert 0 not in result.flagged


def test_zero_mad_falls_back_to_mean_absolute_deviation() -> None:
    # median 5, deviations 0 0 0 0 4 -> MAD 0; mean deviation 0.8 * 1.253314
    result = mad_test([5.0, 5.0, 5.0, 5.0, 1.0])
    assert result.mad == 0.0
    assert result.rule == "mean-absolute-deviation"
    assert result.dispersion == pytest.approx(0.8 * MEAN_AD_CONSISTENCY)
    assert result.anomaly_index[4] == pytest.approx(4 / (0.8 * 1.253314))  # 3.989
    assert result.flagged == (4,)


def test_identical_norms_give_zero_indices() -> None:
    result = mad_test([3.0, 3.0, 3.0, 3.0])
    assert result.rule == "identical-norms"
    assert result.anomaly_index == (0.0, 0.0, 0.0, 0.0)
    assert result.flagged == ()


def test_too_few_valid_labels_is_inconclusive() -> None:
    result = mad_test([None, None, 1.0, 2.0])
    assert not result.conclusive
    assert result.flagged == ()
    assert "at least 3" in result.reason


def test_censored_median_is_inconclusive() -> None:
    # 3 of 6 labels unreached: the median is (3 + inf) / 2
    result = mad_test([None, None, None, 1.0, 2.0, 3.0])
    assert not result.conclusive
    assert result.flagged == ()
    assert "median" in result.reason


def test_negative_norm_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        mad_test([1.0, -2.0, 3.0])


def test_to_dict_is_strict_json() -> None:
    import json

    result = mad_test([None, 10.0, 20.0, 30.0, 40.0])
    text = json.dumps(result.to_dict(), allow_nan=False)
    assert '"anomaly_index": [null' in text


def test_restarts_combine_by_median_index() -> None:
    from modelguard.detection.neural_cleanse import RestartInfo, combine_restarts

    def run(norms: list[float | None]) -> RestartInfo:
        result = mad_test(norms)
        return RestartInfo(0, tuple(norms), result.anomaly_index, result.flagged, 10, result.median)

    clean = [50.0, 52.0, 48.0, 51.0, 49.0]
    # label 0 is an outlier in two runs of three; label 4 only in one
    runs = [
        run([10.0, *clean[1:]]),
        run([11.0, *clean[1:4], 30.0]),
        run(clean),
    ]
    index = combine_restarts(runs)
    per_run = [[info.anomaly_index[k] or 0.0 for info in runs] for k in range(5)]
    assert index[0] == pytest.approx(sorted(per_run[0])[1])  # the median of three
    assert index[0] > 2.0
    assert index[4] <= 2.0 < max(per_run[4])  # one run is not enough
    # a label above the median counts 0 in that run, whatever its index
    assert combine_restarts([run([50.0, 50.0, 50.0, 51.0, 500.0])])[4] == 0.0


# norms of the zoo's VGG MNIST model with a 3x3 patch on label 5 (screening, seed 0):
# clean labels spread multiplicatively from 12 to 55, the backdoor trigger is 2.8
VGG_NORMS = [53.4, 24.1, 11.7, 18.4, 54.8, 2.8, 42.5, 23.1, 33.1, 37.0]


def test_log_scale_finds_an_outlier_the_linear_rule_misses() -> None:
    linear = mad_test(VGG_NORMS)
    log = mad_test(VGG_NORMS, scale="log")
    assert linear.flagged == () and (linear.anomaly_index[5] or 0.0) < 2.0
    assert log.flagged == (5,)
    # by hand: log median = (log 24.1 + log 33.1) / 2; MAD over |log a - median|
    logs = [math.log(v) for v in VGG_NORMS]
    median = statistics.median(logs)
    mad = 1.4826 * statistics.median(abs(v - median) for v in logs)
    assert log.anomaly_index[5] == pytest.approx((median - logs[5]) / mad)
    assert log.median == pytest.approx(math.exp(median))  # reported in norm units
    assert log.scale == "log" and log.to_dict()["scale"] == "log"


def test_log_scale_keeps_the_rules_for_unreached_labels() -> None:
    result = mad_test([None, 10.0, 20.0, 30.0, 40.0, math.inf], scale="log")
    assert result.anomaly_index[0] is None and result.anomaly_index[5] is None
    assert result.rule == "mad"
    assert mad_test([None, None, 5.0], scale="log").rule == "inconclusive"


def test_unknown_scale_is_rejected() -> None:
    with pytest.raises(ValueError, match="scale"):
        mad_test([1.0, 2.0, 3.0], scale="sqrt")


def test_norm_ratio_is_the_median_over_runs_of_norm_over_run_median() -> None:
    from modelguard.detection.neural_cleanse import RestartInfo, norm_ratio

    def run(norms: list[float | None], median: float) -> RestartInfo:
        return RestartInfo(0, tuple(norms), (None,) * len(norms), (), 10, median)

    runs = [run([5.0, 50.0], 50.0), run([10.0, 40.0], 40.0), run([None, 60.0], 60.0)]
    assert norm_ratio(runs, 0) == pytest.approx(statistics.median([0.1, 0.25]))
    assert norm_ratio(runs, 1) == pytest.approx(1.0)
    assert math.isnan(norm_ratio([run([None, 1.0], 1.0)], 0))
