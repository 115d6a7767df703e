"""The in-process commands print the services' summary documents: ``modelguard detect``
the trigger-reversal stage's, ``modelguard leakscan`` the leak-detector stage's (less the
store references and the timings)."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from modelguard.bus.memory import MemoryBus
from modelguard.config import LeakDetectorSettings, PlatformSettings, TriggerReversalSettings
from modelguard.datasets import Dataset, dataset_to_npz, load_mnist
from modelguard.detection.reference import INHERITED_MIN_RATIO
from modelguard.detection.triggers import load_triggers
from modelguard.formats.loader import weights_to_safetensors
from modelguard.jobdata import Limits, load_inputs_from_bytes, load_model_from_bytes
from modelguard.metrics import ServiceMetrics
from modelguard.nn.architectures import build
from modelguard.nn.training import TrainConfig, train_classifier
from modelguard.runtime import Runtime
from modelguard.services.cli import main
from modelguard.services.leak_detector.service import LeakDetectorService
from modelguard.services.trigger_reversal.service import TriggerReversalService
from modelguard.signing import Signer
from modelguard.spec import InputSpec
from modelguard.store.local import LocalStore
from tests.conftest import MNIST_SPEC, InfectedModel

SPEC = InputSpec(shape=(1, 6, 6))
SPEC_ARGS = ["--input-shape", "1,6,6", "--value-range", "0,1"]
MNIST_ARGS = ["--input-shape", "1,28,28", "--value-range", "0,1"]


@pytest.fixture()
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    bus = MemoryBus()
    yield Runtime(
        PlatformSettings(store_dir=tmp_path / "store"),
        bus,
        LocalStore(tmp_path / "store"),
        Signer.generate(),
    )
    bus.close()


@pytest.fixture()
def files(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).eval()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    generator = torch.Generator().manual_seed(1)
    data = Dataset(torch.rand(48, 1, 6, 6, generator=generator), torch.arange(48) % 3)
    (tmp_path / "model.pt").write_bytes(buffer.getvalue())
    (tmp_path / "clean.npz").write_bytes(dataset_to_npz(data))
    return tmp_path / "model.pt", tmp_path / "clean.npz"


def _without(document: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in document.items() if k not in keys}


def test_detect_prints_the_trigger_reversal_summary(
    runtime: Runtime, files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.set_num_threads(1)
    model, data = files
    out = tmp_path / "pictures"
    args = ["detect", str(model), "--data", str(data), *SPEC_ARGS, "--steps", "20"]
    assert main([*args, "--json", "--out", str(out)]) == 0
    cli = json.loads(capsys.readouterr().out)
    service = TriggerReversalService(
        runtime, TriggerReversalSettings(), ServiceMetrics(CollectorRegistry(), "trigger-reversal")
    )
    inputs = load_inputs_from_bytes(
        model.read_bytes(), data.read_bytes(), SPEC, "", Limits.of(PlatformSettings())
    )
    stored = service.reverse(inputs, steps=20)
    assert cli["labels_from"] == "the y array of clean.npz"
    # the measured time of a forward pass is a timing, as "seconds" is
    for document in (cli, stored.summary):
        document["evidence"]["budget"].pop("measured_ms_per_image")
        document["evidence"].get("blend_probe", {}).pop("seconds", None)
    # "triggers": the CLI's file path, the stage's store reference
    assert _without(cli, "seconds", "images", "labels_from", "triggers") == _without(
        stored.summary, "seconds", "images", "triggers"
    )
    # the service's pictures (of the flagged labels) or the smallest trigger's, as files
    labels = list(stored.result.flagged) or [
        min(
            (r for r in stored.result.labels if math.isfinite(r.l1_norm)),
            key=lambda r: r.l1_norm,
        ).label
    ]
    assert sorted(cli["images"]) == sorted(
        f"label {label} {part}" for label in labels for part in ("mask", "pattern", "trigger")
    )
    assert all(Path(path).is_file() for path in cli["images"].values())
    assert main(args) == 0
    assert f"verdict: {stored.result.verdict}" in capsys.readouterr().out


def test_leakscan_prints_the_leak_detector_summary(
    runtime: Runtime, files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, _ = files
    service = LeakDetectorService(
        runtime, LeakDetectorSettings(), ServiceMetrics(CollectorRegistry(), "leak-detector")
    )
    inputs = load_inputs_from_bytes(
        model.read_bytes(), None, SPEC, "", Limits.of(PlatformSettings())
    )
    _verdict, summary = service.scan(inputs.model)
    for extra in ([], SPEC_ARGS):  # parameters only, or the model loaded for its input
        assert main(["leakscan", str(model), *extra, "--json"]) == 0
        cli = json.loads(capsys.readouterr().out)
        assert _without(cli, "seconds") == _without(summary, "seconds")


def test_refusals_keep_their_exit_codes(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = files
    pickled = tmp_path / "model.pkl"
    pickled.write_bytes(pickle.dumps(os.system))
    assert main(["leakscan", str(pickled)]) == 2
    assert main(["leakscan", str(tmp_path / "missing.pt")]) == 2
    assert "cannot read the model file" in capsys.readouterr().err
    repair = ["repair", str(model), "--data", str(data), *SPEC_ARGS, "--out", "r.pt"]
    assert main([*repair, "--target", "seven"]) == 2
    assert main(["detect", str(model), "--data", str(data), *SPEC_ARGS, "--steps", "99999"]) == 2


def test_repair_refuses_a_layer_the_model_lacks_before_reversing_any_trigger(
    files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import modelguard.services.cli as cli

    def no_reversal(*_args: object) -> None:
        raise AssertionError("the reversal ran before the layer was checked")

    monkeypatch.setattr(cli, "reverse", no_reversal)
    model, data = files
    out = tmp_path / "r.pt"
    repair = ["repair", str(model), "--data", str(data), *SPEC_ARGS, "--out", str(out)]
    assert main([*repair, "--layer", "4"]) == 2
    assert "'4' is not a prunable" in capsys.readouterr().err
    assert not out.exists()


def _choices(command: str, option: str) -> list[str]:
    import argparse

    from modelguard.services.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    target = sub.choices[command]
    if command == "audit":
        inner = next(a for a in target._actions if isinstance(a, argparse._SubParsersAction))
        target = inner.choices["submit"]
    action = next(a for a in target._actions if option in a.option_strings)
    return list(action.choices or [])


def test_the_cli_choices_come_from_the_registries() -> None:
    from modelguard.detection.registry import DETECTORS, get_detector
    from modelguard.repair.registry import REPAIR_CHOICES, REPAIR_MODES

    rules = {r for name in DETECTORS for r in get_detector(name).rules}
    for command in ("detect", "repair", "audit"):
        assert _choices(command, "--detector") == list(DETECTORS)
        assert set(_choices(command, "--rule")) == rules
    assert _choices("repair", "--mode") == list(REPAIR_MODES)
    assert _choices("audit", "--repair-mode") == list(REPAIR_CHOICES)


# --- clean data from a folder of images ------------------------------------------------------
LENET_ARGS = ["--arch", "lenet5", "--input-shape", "1,16,16", "--value-range", "0,1"]


@pytest.fixture()
def lenet_and_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A LeNet-5 weights file (10 classes, 16×16 grey input) and a folder of 24×20 RGB
    PNGs in class folders 0, 1 and 2 (resized and converted by the reader)."""
    from PIL import Image

    from modelguard.formats.loader import weights_to_safetensors
    from modelguard.nn.architectures import build

    torch.manual_seed(0)
    model = tmp_path / "lenet.safetensors"
    model.write_bytes(weights_to_safetensors(build("lenet5", hw=(16, 16))))
    generator = torch.Generator().manual_seed(2)
    for label in range(3):
        (tmp_path / "images" / str(label)).mkdir(parents=True)
        for index in range(4):
            pixels = torch.randint(0, 256, (20, 24, 3), generator=generator, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(tmp_path / "images" / str(label) / f"{index}.png")
    return model, tmp_path / "images"


def test_detect_reads_a_folder_of_images_and_says_where_the_labels_came_from(
    lenet_and_folder: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    torch.set_num_threads(1)
    model, folder = lenet_and_folder
    detect = ["detect", str(model), "--data", str(folder), *LENET_ARGS, "--steps", "20"]
    assert main([*detect, "--json"]) == 0
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert document["labels_from"] == "the class folders' names (0, 1, 2)"
    assert "data_subset" not in document
    assert "labels: the class folders' names (0, 1, 2)" in captured.err.splitlines()
    assert main([*detect, "--labels", "predicted", "--max-images", "6"]) == 0
    captured = capsys.readouterr()
    assert "verdict:" in captured.out
    lines = captured.err.splitlines()
    assert (
        "labels: the model's own predictions (no ground truth given); the class folders are "
        "not used"
    ) in lines
    assert f"images: 6 of the 12 in {folder}, a random subset (seed 0; --max-images 6)" in lines


def test_a_folder_with_a_bad_image_is_refused_naming_it(
    lenet_and_folder: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, folder = lenet_and_folder
    (folder / "1" / "scan[3].png").write_bytes(b"\x89PNG but not really")
    detect = ["detect", str(model), "--data", str(folder), *LENET_ARGS, "--steps", "20"]
    assert main(detect) == 2
    error = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert f"error: 1 image(s) in {folder} cannot be read: 1/scan[3].png (not an image" in error
    assert main([*detect[:4], "--labels", "labels.csv", *detect[4:]]) == 2
    assert "cannot read the labels file labels.csv" in capsys.readouterr().err


def test_audit_submit_sends_a_folder_as_the_npz_the_service_reads(
    lenet_and_folder: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from contextlib import contextmanager

    from modelguard.clean_data import read_clean_data
    from modelguard.datasets import load_npz
    from modelguard.proto.modelguard.v1 import pruning_orchestrator_pb2
    from modelguard.services import cli

    sent: list[Path | bytes] = []

    class Client:
        def submit(self, model: Path, data: Path | bytes, *args: Any, **kwargs: Any) -> Any:
            sent.append(data)
            return pruning_orchestrator_pb2.Audit(audit_id="a1")

    @contextmanager
    def fake_client(*args: Any, **kwargs: Any) -> Iterator[Client]:
        yield Client()

    monkeypatch.setattr(cli, "audit_client", fake_client)
    model, folder = lenet_and_folder
    submit = ["audit", "submit", str(model), *LENET_ARGS, "--target", "orchestrator:1"]
    spec = InputSpec((1, 16, 16))
    assert main([*submit, "--data", str(folder)]) == 0
    assert isinstance(sent[-1], bytes)
    uploaded = load_npz(sent[-1], spec, num_classes=10)
    expected = read_clean_data(folder, spec).dataset
    assert torch.equal(uploaded.x, expected.x) and torch.equal(uploaded.y, expected.y)
    assert "labels: the class folders' names (0, 1, 2)" in capsys.readouterr().err.splitlines()
    # predicted labels need the model, loaded here; an .npz goes as it is
    assert main([*submit, "--data", str(folder), "--labels", "predicted"]) == 0
    assert isinstance(sent[-1], bytes) and len(load_npz(sent[-1], spec)) == 12
    npz = tmp_path / "clean.npz"
    npz.write_bytes(sent[-1])
    assert main([*submit, "--data", str(npz)]) == 0
    assert sent[-1] == npz


def test_audit_submit_passes_the_robustness_options_on(
    lenet_and_folder: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from contextlib import contextmanager

    from modelguard.proto.modelguard.v1 import jobs_pb2, pruning_orchestrator_pb2
    from modelguard.services import cli

    sent: list[jobs_pb2.AuditOptions] = []
    references: list[Path | None] = []

    class Client:
        def submit(
            self,
            *args: Any,
            options: jobs_pb2.AuditOptions,
            reference: Path | None = None,
            **kwargs: Any,
        ) -> Any:
            sent.append(options)
            references.append(reference)
            return pruning_orchestrator_pb2.Audit(audit_id="a1")

    @contextmanager
    def fake_client(*args: Any, **kwargs: Any) -> Iterator[Client]:
        yield Client()

    monkeypatch.setattr(cli, "audit_client", fake_client)
    model, folder = lenet_and_folder
    submit = ["audit", "submit", str(model), *LENET_ARGS, "--data", str(folder)]
    submit += ["--target", "orchestrator:1"]
    assert main([*submit, "--eps", "0.1,0.3", "--norm", "l2", "--attack-steps", "7"]) == 0
    assert list(sent[-1].robustness_eps) == pytest.approx([0.1, 0.3])
    assert (sent[-1].robustness_norm, sent[-1].robustness_steps) == ("l2", 7)
    assert main(submit) == 0  # no ε: the stage is not asked for
    assert list(sent[-1].robustness_eps) == []
    assert references[-1] is None
    assert main([*submit, "--reference", str(model)]) == 0
    assert references[-1] == model
    with pytest.raises(SystemExit):
        main([*submit, "--eps", "-0.1"])


def test_detect_saves_the_flagged_triggers_that_repair_takes(
    infected_lenet: InfectedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """detect, then repair with its triggers, as a user does: the trigger is reversed once."""
    weights, data = str(infected_lenet.weights_path), str(infected_lenet.clean_npz_path)
    model_args = [weights, "--arch", "lenet5", "--data", data, *MNIST_ARGS]
    out = tmp_path / "detected"
    assert main(["detect", *model_args, "--json", "--out", str(out)]) == 0
    detected = json.loads(capsys.readouterr().out)
    assert detected["flagged"] == [infected_lenet.target]
    saved = load_triggers(Path(detected["triggers"]).read_bytes())
    assert [t.label for t in saved] == [infected_lenet.target]

    repaired_path = tmp_path / "repaired.safetensors"
    repair = ["repair", *model_args, "--triggers", detected["triggers"], "--json"]
    assert main([*repair, "--out", str(repaired_path)]) == 0
    repaired = json.loads(capsys.readouterr().out)
    assert repaired["target_labels"] == [infected_lenet.target]
    module = load_model_from_bytes(
        repaired_path.read_bytes(), MNIST_SPEC, "lenet5", Limits.of(PlatformSettings())
    ).module
    assert infected_lenet.real_asr(module) < 0.1 < infected_lenet.real_asr(infected_lenet.module)


def test_detect_against_a_reference_sets_aside_only_the_triggers_it_shares(
    infected_lenet: InfectedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A clean model of the same task ignores the planted trigger: the target stays flagged.
    The submitted model as its own reference shares every trigger: clean against it."""
    torch.manual_seed(1)
    clean = build("lenet5")
    train_classifier(clean, load_mnist("train").subset(4000, seed=1), TrainConfig(epochs=1, seed=1))
    clean_path = tmp_path / "clean.safetensors"
    clean_path.write_bytes(weights_to_safetensors(clean))
    weights, data = str(infected_lenet.weights_path), str(infected_lenet.clean_npz_path)
    detect = ["detect", weights, "--arch", "lenet5", "--data", data, *MNIST_ARGS, "--json"]

    assert main([*detect, "--reference", str(clean_path)]) == 0
    against_clean = json.loads(capsys.readouterr().out)
    assert against_clean["verdict"] == "infected"
    assert against_clean["flagged"] == [infected_lenet.target]
    compared = against_clean["evidence"]["reference"]
    assert compared["reference"] == "clean.safetensors" and compared["inherited"] == []
    (label,) = compared["labels"]
    assert label["reference_success"] < INHERITED_MIN_RATIO * label["submitted_success"]

    assert main([*detect, "--reference", weights]) == 0
    against_itself = json.loads(capsys.readouterr().out)
    assert against_itself["verdict"] == "clean" and against_itself["flagged"] == []
    assert against_itself["evidence"]["reference"]["inherited"] == [infected_lenet.target]
    assert against_itself["evidence"]["summary"].startswith("clean against the reference")


def test_a_reference_is_refused_before_the_reversal_or_beside_given_triggers(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = files
    detect = ["detect", str(model), "--data", str(data), *SPEC_ARGS]
    assert main([*detect, "--reference", str(tmp_path / "missing.pt")]) == 2
    assert "cannot read the reference model file" in capsys.readouterr().err
    repair = ["repair", str(model), "--data", str(data), *SPEC_ARGS, "--out", "r.pt"]
    assert main([*repair, "--triggers", "t.safetensors", "--reference", str(model)]) == 2
    assert "--reference applies to the reversal repair runs itself" in capsys.readouterr().err
