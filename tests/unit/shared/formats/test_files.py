"""Scanning model files on disk for a CI gate: each file's outcome with its reason, folder
walks by suffix, and the findings as a structurally valid SARIF 2.1.0 log."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as safetensors_save
from torch import nn

from modelguard.formats.files import (
    RULES,
    SARIF_VERSION,
    model_suffixes,
    sarif_log,
    scan_file,
    scan_paths,
)
from modelguard.formats.registry import all_formats

torch.set_num_threads(1)

SARIF_LEVELS = {"none", "note", "warning", "error"}


@pytest.fixture()
def models(tmp_path: Path) -> Path:
    """A folder: a TorchScript model and safetensors weights (safe), a pickle calling
    os.system (unsafe), a truncated ONNX file (unreadable), a README (not a model) and a
    nested folder holding a torch.save state dict (safe)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    script = io.BytesIO()
    torch.jit.save(torch.jit.script(model), script)
    (tmp_path / "model.pt").write_bytes(script.getvalue())
    (tmp_path / "weights.safetensors").write_bytes(safetensors_save(dict(model.state_dict())))
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(os.system))
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07\x12")
    (tmp_path / "README.md").write_text("not a model\n")
    (tmp_path / "nested").mkdir()
    state = io.BytesIO()
    torch.save(model.state_dict(), state)
    (tmp_path / "nested" / "state.pth").write_bytes(state.getvalue())
    return tmp_path


def test_each_file_gets_its_outcome_and_reason(models: Path) -> None:
    report = scan_paths([models], max_bytes=1 << 30)
    outcomes = {scan.path.relative_to(models).as_posix(): scan for scan in report.files}
    assert {name: scan.outcome for name, scan in outcomes.items()} == {
        "broken.onnx": "unreadable",
        "evil.pkl": "unsafe",
        "model.pt": "safe",
        "weights.safetensors": "safe",
        "nested/state.pth": "safe",
    }
    assert outcomes["model.pt"].format == "torchscript"
    assert outcomes["weights.safetensors"].format == "safetensors"
    assert outcomes["nested/state.pth"].format == "torch-zip"
    assert "system" in (outcomes["evil.pkl"].reason or "")
    assert report.skipped == [models / "README.md"]
    assert [scan.path for scan in report.findings] == [models / "broken.onnx", models / "evil.pkl"]
    document = report.to_dict()
    assert document["summary"] == {"scanned": 5, "safe": 3, "unsafe": 1, "unreadable": 1}
    assert document["skipped"] == [str(models / "README.md")]


def test_a_named_file_is_scanned_whatever_its_suffix(models: Path) -> None:
    readme = scan_paths([models / "README.md"], max_bytes=1 << 30)
    assert [scan.outcome for scan in readme.files] == ["unreadable"]
    assert "neither" in (readme.files[0].reason or "")  # no known format, said so
    missing = scan_file(models / "missing.pt", max_bytes=1 << 30)
    assert missing.outcome == "unreadable" and "cannot read the file" in (missing.reason or "")


def test_an_oversized_file_is_not_read(models: Path) -> None:
    scan = scan_file(models / "model.pt", max_bytes=16)
    assert scan.outcome == "unreadable"
    assert scan.reason is not None and scan.reason.endswith("the limit is 16")


def test_folder_walks_cover_every_registered_format() -> None:
    assert {fmt.extension for fmt in all_formats()} <= model_suffixes()
    assert {".pkl", ".bin", ".ckpt"} <= model_suffixes()


def assert_valid_sarif(log: dict[str, Any]) -> None:
    """The SARIF 2.1.0 schema's required properties and the references between them."""
    assert log["version"] == SARIF_VERSION
    assert log["$schema"].endswith("sarif-2.1.0.json")
    assert isinstance(log["runs"], list) and log["runs"]
    for run in log["runs"]:
        driver = run["tool"]["driver"]
        assert isinstance(driver["name"], str) and driver["name"]
        assert isinstance(driver["version"], str)
        rules = driver["rules"]
        assert len({rule["id"] for rule in rules}) == len(rules)
        for rule in rules:
            assert rule["shortDescription"]["text"]
            assert rule["defaultConfiguration"]["level"] in SARIF_LEVELS
        for result in run["results"]:
            assert result["message"]["text"]
            assert result["level"] in SARIF_LEVELS
            assert rules[result["ruleIndex"]]["id"] == result["ruleId"]
            assert result["locations"]
            for location in result["locations"]:
                assert location["physicalLocation"]["artifactLocation"]["uri"]


def test_the_findings_make_a_valid_sarif_log(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(models)  # relative paths, as a CI job passes them
    report = scan_paths([Path("."), models / "evil.pkl"], max_bytes=1 << 30)
    log = sarif_log(report, "1.2.3")
    assert_valid_sarif(log)
    driver = log["runs"][0]["tool"]["driver"]
    assert driver["version"] == "1.2.3"
    assert [rule["id"] for rule in driver["rules"]] == [rule.id for rule in RULES]
    results = log["runs"][0]["results"]
    located = [
        (r["ruleId"], r["level"], r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"])
        for r in results
    ]
    assert located == [
        ("MG002", "warning", "broken.onnx"),
        ("MG001", "error", "evil.pkl"),
        ("MG001", "error", (models / "evil.pkl").as_uri()),
    ]
    assert "system" in results[1]["message"]["text"]
    clean = sarif_log(scan_paths([models / "model.pt"], max_bytes=1 << 30), "1.2.3")
    assert_valid_sarif(clean)
    assert clean["runs"][0]["results"] == []


def test_uris_are_percent_encoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my model#1.pkl").write_bytes(pickle.dumps(os.system))
    log = sarif_log(scan_paths([Path("my model#1.pkl")], max_bytes=1 << 30), "0")
    location = log["runs"][0]["results"][0]["locations"][0]
    assert location["physicalLocation"]["artifactLocation"]["uri"] == "my%20model%231.pkl"
