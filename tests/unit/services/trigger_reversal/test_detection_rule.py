"""The detection rules: ``paper`` is Neural Cleanse's own test (every label fully optimised
once, MAD on the linear norms, nothing else), ``modelguard`` the default pipeline; the
same preset reaches the algorithm from the CLI, an audit's options and the service."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from modelguard.bus.memory import MemoryBus
from modelguard.config import PlatformSettings, PruningOrchestratorSettings, TriggerReversalSettings
from modelguard.convert import ref_to_proto, spec_to_proto
from modelguard.datasets import Dataset, dataset_to_npz
from modelguard.detection.mad import mad_test
from modelguard.detection.neural_cleanse import (
    AUTO_LAYOUT,
    MODELGUARD,
    PAPER,
    RULES,
    ReversalConfig,
    decide,
    reverse_triggers,
    screening_run,
)
from modelguard.detection.neural_cleanse_sequential import reverse_triggers_sequential
from modelguard.errors import InvalidInput
from modelguard.formats.loader import LoadedModel, weights_to_safetensors
from modelguard.jobdata import ModelAndData
from modelguard.metrics import ServiceMetrics
from modelguard.nn.architectures import build
from modelguard.nn.layout import LAYOUTS
from modelguard.proto.modelguard.v1 import common_pb2, jobs_pb2
from modelguard.runtime import Runtime
from modelguard.services.cli import WEIGHT_LAYOUTS, build_parser, main, reversal_config
from modelguard.services.pruning_orchestrator.service import Orchestrator
from modelguard.services.trigger_reversal.service import TriggerReversalService
from modelguard.signing import Signer
from modelguard.spec import InputSpec
from modelguard.store.local import LocalStore

TINY_SPEC = InputSpec(shape=(1, 6, 6))

# A 3-pixel-like backdoor among norms that spread multiplicatively: 1 linear MAD below the
# median (the paper misses it), over 3 on the log scale and a twentieth of the median.
SPREAD = [3.0, 20.0, 30.0, 45.0, 60.0, 80.0, 100.0, 120.0, 140.0, 150.0]
# An easy natural class among tightly packed norms: 9 linear MADs below the median (the
# paper flags it), but its trigger is more than a third of the median's.
EASY_CLASS = [40.0, 100.0, 102.0, 104.0, 106.0, 108.0, 110.0, 112.0, 114.0, 116.0]


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).eval()


def tiny_data(n: int = 48) -> Dataset:
    generator = torch.Generator().manual_seed(1)
    return Dataset(torch.rand(n, 1, 6, 6, generator=generator), torch.arange(n) % 3)


def flagged(norms: Sequence[float | None], config: ReversalConfig) -> tuple[int, ...]:
    return decide([screening_run(norms, config)], config).decided


# ------------------------------------------------------------------ the preset


def test_paper_preset_is_neural_cleanses_test() -> None:
    paper, default = ReversalConfig.paper(), ReversalConfig()
    assert paper.rule == PAPER and default.rule == MODELGUARD
    assert paper.norm_scale == "linear" and default.norm_scale == "log"
    assert paper.max_norm_ratio == 1.0 < default.max_norm_ratio * 4  # ratio rule off
    assert paper.restarts == 1 < default.restarts
    # every label gets the full optimisation: full batches, the whole step budget
    assert paper.screening_batch_size == paper.batch_size > default.screening_batch_size
    assert paper.screening_budget == paper.steps
    assert not paper.refine and default.refine
    assert paper.verify_threshold == 0.0 < default.verify_threshold
    # the decision's own constants are the paper's under both rules
    for name in ("anomaly_threshold", "mad_consistency", "attack_threshold", "steps", "lr"):
        assert getattr(paper, name) == getattr(default, name)
    assert ReversalConfig.for_rule(MODELGUARD) == default
    assert ReversalConfig.for_rule(PAPER) == paper
    assert ReversalConfig(**paper.to_dict()) == paper


def test_paper_preset_keeps_overrides_that_do_not_contradict_it() -> None:
    config = ReversalConfig.paper(seed=7, steps=50, batch_size=16)
    assert (config.seed, config.steps, config.batch_size) == (7, 50, 16)
    assert config.screening_batch_size == 16 and config.screening_budget == 50


@pytest.mark.parametrize(
    "override",
    [
        {"norm_scale": "log"},
        {"max_norm_ratio": 1 / 3},
        {"restarts": 3},
        {"screening_batch_size": 4},
        {"screening_steps": 10},
        {"refine": True},
        {"verify_threshold": 0.5},
    ],
)
def test_paper_preset_refuses_a_departure_from_the_paper(override: dict[str, object]) -> None:
    with pytest.raises(InvalidInput, match=next(iter(override))):
        ReversalConfig.paper(**override)


def test_a_paper_label_on_modelguard_fields_and_unknown_rules_are_refused() -> None:
    with pytest.raises(InvalidInput, match=r"ReversalConfig\.paper"):
        ReversalConfig(rule=PAPER)
    with pytest.raises(InvalidInput, match="detection rule"):
        ReversalConfig.for_rule("nc")
    with pytest.raises(InvalidInput, match="rule must be one of"):
        ReversalConfig(rule="nc")


# ------------------------------------------------------------------ the decision


def test_small_trigger_among_spread_norms_paper_misses_modelguard_flags() -> None:
    paper, default = ReversalConfig.paper(), ReversalConfig()
    linear = screening_run(SPREAD, paper)
    assert linear.anomaly_index[0] == pytest.approx(67 / (1.4826 * 45))
    assert flagged(SPREAD, paper) == ()
    assert flagged(SPREAD, default) == (0,)


def test_easy_natural_class_paper_flags_modelguard_keeps() -> None:
    paper, default = ReversalConfig.paper(), ReversalConfig()
    assert screening_run(EASY_CLASS, paper).anomaly_index[0] == pytest.approx(67 / (1.4826 * 5))
    assert flagged(EASY_CLASS, paper) == (0,)
    # an outlier on the log scale as well, but 0.37 of the median: above a third
    decision = decide([screening_run(EASY_CLASS, default)], default)
    assert decision.outliers == [0] and decision.decided == ()
    assert decision.ratios[0] == pytest.approx(40 / math.sqrt(106 * 108))  # log-scale median


def test_paper_decision_is_the_linear_mad_test_alone() -> None:
    """Whatever the norms, the paper's decision is exactly the MAD test's flags (index > 2,
    below the median, linear norms): nothing is added or vetoed."""
    config = ReversalConfig.paper()
    generator = torch.Generator().manual_seed(0)
    vectors: list[list[float | None]] = [[None, 5.0, 50.0, 52.0, 54.0, 56.0, 58.0]]
    vectors += [list(SPREAD), list(EASY_CLASS)]
    for _ in range(200):
        vectors.append([float(v) for v in torch.exp(2 * torch.randn(10, generator=generator))])
    for norms in vectors:
        assert flagged(norms, config) == mad_test(norms, scale="linear").flagged


# ------------------------------------------------------------------ a run


def test_paper_run_is_the_per_label_procedure() -> None:
    """One run, every label on full batches with the full budget, no refinement, no
    re-check: the batched run gives the sequential per-label procedure's norms and flags."""
    torch.set_num_threads(1)
    config = ReversalConfig.paper(steps=25, batch_size=16)
    batched = reverse_triggers(tiny_model(), tiny_data(), TINY_SPEC, config)
    sequential = reverse_triggers_sequential(tiny_model(), tiny_data(), TINY_SPEC, config)
    assert len(batched.restarts) == 1 and batched.suspects == ()
    assert sum(label.reached_threshold for label in batched.labels) >= 2
    for a, b in zip(batched.labels, sequential.labels, strict=True):
        assert a.reached_threshold == b.reached_threshold
        if a.reached_threshold:
            assert a.l1_norm == pytest.approx(b.l1_norm, rel=1e-4)
    assert batched.flagged == sequential.flagged
    assert batched.evidence["rule"] == PAPER and batched.to_dict()["config"]["rule"] == PAPER


# ------------------------------------------------------------------ CLI, audit, service

SPEC_ARGS = ["--input-shape", "1,6,6", "--value-range", "0,1"]
DETECT = ["detect", "model.pt", "--data", "d.npz", *SPEC_ARGS]
REPAIR = ["repair", "model.pt", "--data", "d.npz", "--out", "r.pt", *SPEC_ARGS]
SUBMIT = ["audit", "submit", "model.pt", "--data", "d.npz", *SPEC_ARGS]


def test_cli_rule_choices_are_the_algorithms() -> None:
    for command in (DETECT, REPAIR, SUBMIT):
        parser = build_parser()
        assert parser.parse_args(command).rule == MODELGUARD
        for rule in RULES:
            assert parser.parse_args([*command, "--rule", rule]).rule == rule
        with pytest.raises(SystemExit):
            parser.parse_args([*command, "--rule", "nc"])


def test_cli_detect_rule_paper_builds_the_preset() -> None:
    assert reversal_config(build_parser().parse_args(DETECT)) == ReversalConfig()
    args = build_parser().parse_args([*DETECT, "--rule", "paper", "--steps", "40"])
    assert reversal_config(args) == ReversalConfig.paper(steps=40)
    # --norm-scale alone changes only the scale of the modelguard rule, --weight-layout the layout
    scaled = reversal_config(build_parser().parse_args([*DETECT, "--norm-scale", "linear"]))
    assert scaled == ReversalConfig(norm_scale="linear")
    pinned = reversal_config(build_parser().parse_args([*DETECT, "--weight-layout", "as_loaded"]))
    assert pinned == ReversalConfig(weight_layout="as_loaded")
    assert (AUTO_LAYOUT, *LAYOUTS) == WEIGHT_LAYOUTS
    paper = [*DETECT, "--rule", "paper", "--weight-layout", "channels_last"]
    assert reversal_config(build_parser().parse_args(paper)) == ReversalConfig.paper(
        weight_layout="channels_last"
    )


def test_cli_repair_weight_layout_reaches_its_reversal() -> None:
    # the reversal repair runs without --triggers takes the same pin as detect's
    assert reversal_config(build_parser().parse_args(REPAIR)) == ReversalConfig()
    repair = build_parser().parse_args([*REPAIR, "--weight-layout", "as_loaded"])
    assert reversal_config(repair) == ReversalConfig(weight_layout="as_loaded")


def test_cli_refuses_a_norm_scale_that_contradicts_the_paper_rule() -> None:
    # refused (exit 2) before any file is read
    assert main([*DETECT, "--rule", "paper", "--norm-scale", "log"]) == 2


@pytest.fixture()
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    bus = MemoryBus()
    yield Runtime(
        PlatformSettings(store_dir=tmp_path), bus, LocalStore(tmp_path), Signer.generate()
    )
    bus.close()


def test_audit_option_is_validated_and_travels_to_trigger_reversal(runtime: Runtime) -> None:
    orchestrator = Orchestrator(
        runtime,
        PruningOrchestratorSettings(),
        ServiceMetrics(CollectorRegistry(), "pruning-orchestrator"),
    )
    store = runtime.store
    model = common_pb2.ModelSpec(
        artifact=ref_to_proto(store.put_blob(weights_to_safetensors(build("lenet5")))),
        arch="lenet5",
        input=spec_to_proto(InputSpec((1, 28, 28))),
    )
    data = Dataset(torch.rand(20, 1, 28, 28), torch.arange(20) % 10)
    data_ref = ref_to_proto(store.put_blob(dataset_to_npz(data)))
    with pytest.raises(InvalidInput, match="detection rule"):
        orchestrator.submit(model, data_ref, jobs_pb2.AuditOptions(detection_rule="nc"))
    record = orchestrator.submit(model, data_ref, jobs_pb2.AuditOptions(detection_rule=PAPER))
    assert orchestrator.request_message(record).options.detection_rule == PAPER
    # an audit submitted before the option existed keeps the default rule
    legacy = orchestrator.submit(model, data_ref, jobs_pb2.AuditOptions())
    assert orchestrator.request_message(legacy).options.detection_rule == ""
    # the reference model, an uploaded artifact, travels with the options
    compared = orchestrator.submit(
        model, data_ref, jobs_pb2.AuditOptions(reference_model=model.artifact)
    )
    sent = orchestrator.request_message(compared).options.reference_model
    assert sent.sha256 == model.artifact.sha256


def test_service_runs_the_requested_rule(runtime: Runtime) -> None:
    torch.set_num_threads(1)
    service = TriggerReversalService(
        runtime,
        TriggerReversalSettings(),
        ServiceMetrics(CollectorRegistry(), "trigger-reversal"),
    )
    inputs = ModelAndData(LoadedModel(tiny_model(), "torchscript", "", 3), tiny_data(), TINY_SPEC)
    stored = service.reverse(inputs, steps=20, rule=PAPER)
    assert stored.result.config == ReversalConfig.paper(steps=20)
    assert stored.summary["config"]["rule"] == PAPER
    assert service.reverse(inputs, steps=20).result.config.rule == MODELGUARD
    with pytest.raises(InvalidInput, match="detection rule"):
        service.reverse(inputs, steps=20, rule="nc")
