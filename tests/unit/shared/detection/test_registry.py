"""The detector registry: every entry imports and is a `BackdoorDetector` named by its
key, with its rules (the first the default) and configs; unknown names are refused with
the list; a detector reached through the registry runs its algorithm unchanged; the
registry imports without torch."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from modelguard.datasets import Dataset
from modelguard.detection.base import BackdoorDetector
from modelguard.detection.neural_cleanse import MODELGUARD, PAPER, RULES, ReversalConfig
from modelguard.detection.neural_cleanse import reverse_triggers as batched
from modelguard.detection.neural_cleanse_sequential import reverse_triggers_sequential as sequential
from modelguard.detection.registry import DEFAULT_DETECTOR, DETECTORS, get_detector
from modelguard.errors import InvalidInput
from modelguard.spec import InputSpec

SPEC = InputSpec(shape=(1, 6, 6))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", list(DETECTORS))
def test_every_entry_imports_and_satisfies_the_protocol(name: str) -> None:
    detector = get_detector(name)
    assert isinstance(detector, BackdoorDetector)
    assert detector.name == name
    assert detector.rules and all(isinstance(rule, str) and rule for rule in detector.rules)
    assert detector.configure() == detector.configure(detector.rules[0])
    for rule in detector.rules:
        detector.configure(rule, seed=3)
    with pytest.raises(InvalidInput, match="detection rule"):
        detector.configure("nc")


def test_default_and_unknown_names() -> None:
    assert DEFAULT_DETECTOR == "neural-cleanse" and DEFAULT_DETECTOR in DETECTORS
    assert get_detector().name == DEFAULT_DETECTOR
    for name in ("nc", "", "Neural-Cleanse"):
        with pytest.raises(InvalidInput, match="unknown detector") as caught:
            get_detector(name)
        assert all(known in str(caught.value) for known in DETECTORS)


def test_neural_cleanse_configs_are_the_rule_presets() -> None:
    detector = get_detector("neural-cleanse")
    assert detector.rules == RULES and detector.rules[0] == MODELGUARD
    assert detector.configure() == ReversalConfig() == ReversalConfig.for_rule(MODELGUARD)
    assert detector.configure(PAPER, steps=40) == ReversalConfig.paper(steps=40)
    with pytest.raises(InvalidInput, match="norm_scale"):
        detector.configure(PAPER, norm_scale="log")


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).eval()


def tiny_data(n: int = 48) -> Dataset:
    generator = torch.Generator().manual_seed(1)
    return Dataset(torch.rand(n, 1, 6, 6, generator=generator), torch.arange(n) % 3)


@pytest.mark.parametrize(
    ("name", "algorithm"), [("neural-cleanse", batched), ("neural-cleanse-sequential", sequential)]
)
def test_detect_runs_the_algorithm_unchanged(name: str, algorithm: object) -> None:
    detector = get_detector(name)
    config = detector.configure(PAPER, steps=15, batch_size=16)
    through = detector.detect(tiny_model(), tiny_data(), SPEC, config)
    direct = algorithm(tiny_model(), tiny_data(), SPEC, config)  # type: ignore[operator]
    assert through.flagged == direct.flagged and through.verdict == direct.verdict
    assert torch.equal(through.masks, direct.masks)
    assert torch.equal(through.patterns, direct.patterns)
    assert [r.l1_norm for r in through.labels] == pytest.approx([r.l1_norm for r in direct.labels])
    summary = through.to_dict()
    assert summary["verdict"] == through.verdict and "masks" not in summary


def test_registry_imports_without_torch() -> None:
    code = (
        "import sys; import modelguard.detection.registry as r; import modelguard.detection.base; "
        "assert 'torch' not in sys.modules, 'torch imported'; print(','.join(r.DETECTORS))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == ",".join(DETECTORS)
