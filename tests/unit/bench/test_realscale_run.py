"""The real-scale benchmark: a command's peak RSS is its own, not its parent's; rows of
another time budget are kept apart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from bench import bench_realscale, realzoo
from bench.bench_realscale import merged, run, table


def test_a_commands_peak_rss_does_not_count_the_benchmarks_own_memory(tmp_path: Path) -> None:
    weights = tmp_path / "tiny.safetensors"
    save_file({"w": torch.zeros(4)}, str(weights))
    ballast = torch.ones(768 << 18)  # 768 MB held (and touched) by the benchmark itself
    output, seconds, peak_gb = run(["scan", str(weights), "--json"])
    assert "safe" in str(output) and seconds > 0
    # a Python process that imports the CLI: far below the parent's ballast
    assert 0.02 < peak_gb < 0.7, peak_gb
    assert float(ballast[-1]) == 1.0


def _row(model: str, verdict: str, **extra: object) -> dict[str, object]:
    return {
        "model": model,
        "format": "TorchScript",
        "split": "heldout",
        "attack": "none",
        "detect_verdict": verdict,
        "flagged": [],
        "detect_seconds": 400.0,
        "detect_rss_gb": 1.5,
        "leak_verdict": "benign",
        "leak_score": 1.0,
        **extra,
    }


def test_a_row_with_another_time_budget_is_kept_beside_the_default_one(tmp_path: Path) -> None:
    rows_file = tmp_path / "rows.json"
    # a row written before rows had a time budget is the default budget's
    rows_file.write_text(json.dumps([_row("lite1", "inconclusive", reason="out of time")]))
    longer = _row("lite1", "infected", time_budget=1100.0, flagged=[852])
    rows = merged([longer], rows_file)
    assert [r["detect_verdict"] for r in rows] == ["inconclusive", "infected"]
    # a new run replaces only the row of its own budget
    rows = merged([_row("lite1", "clean", time_budget=1100.0)], rows_file)
    assert [r["detect_verdict"] for r in rows] == ["inconclusive", "clean"]
    rows = merged([_row("lite1", "inconclusive", reason="still out of time")], rows_file)
    assert [r.get("reason") for r in rows] == ["still out of time", None]
    text = table(rows)
    assert "| lite1 | TorchScript | heldout |" in text
    assert "| lite1 | TorchScript, `--time-budget 1100` | heldout |" in text
    assert "lite1 (TorchScript): still out of time" in text


def _fake_runs(monkeypatch: pytest.MonkeyPatch, detected: dict[str, Any]) -> list[list[str]]:
    """The commands the benchmark runs, recorded instead of run: detect answers
    ``detected``, leakscan benign."""
    commands: list[list[str]] = []

    def fake_run(command: list[str]) -> tuple[dict[str, Any], float, float]:
        commands.append(command)
        if command[0] == "detect":
            return detected, 1.0, 0.5
        return {"verdict": "benign", "score": 1.0}, 1.0, 0.5

    monkeypatch.setattr(bench_realscale, "run", fake_run)
    return commands


def test_the_time_budget_goes_to_detect_and_nowhere_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands = _fake_runs(monkeypatch, {"verdict": "clean", "flagged": [], "evidence": {}})
    (spec,) = realzoo.select(["lite1"])
    model = realzoo.RealModel(spec, tmp_path / "lite1.pt", 240, {})
    row = bench_realscale.bench_model(model, False, tmp_path, time_budget=1100.0)
    detect, leakscan = commands
    assert detect[detect.index("--time-budget") + 1] == "1100.0"
    assert "--time-budget" not in leakscan
    assert row["time_budget"] == 1100.0
    bench_realscale.bench_model(model, False, tmp_path)
    assert "--time-budget" not in commands[2]


def test_against_the_parent_detect_takes_the_published_model_and_the_row_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands = _fake_runs(monkeypatch, {"verdict": "infected", "flagged": [9], "evidence": {}})
    built: list[str] = []

    def fake_build(spec: realzoo.RealSpec) -> realzoo.RealModel:
        built.append(spec.name)
        return realzoo.RealModel(spec, tmp_path / f"{spec.name}.pt", 240, {})

    monkeypatch.setattr(realzoo, "build", fake_build)
    (spec,) = realzoo.select(["lite1-patch-bl-t9"])
    model = realzoo.RealModel(spec, tmp_path / "bl9.pt", 240, {})
    row = bench_realscale.bench_model(model, False, tmp_path, against_parent=True)
    detect, leakscan = commands
    assert built == ["lite1"]  # the published model of the same variant
    assert detect[detect.index("--reference") + 1] == str(tmp_path / "lite1.pt")
    assert "--reference" not in leakscan
    assert row["reference"] == bench_realscale.PARENT
    # kept beside the row without a reference, and marked in the table
    rows = merged([row, {**row, "reference": None}], tmp_path / "rows.json")
    assert len(rows) == 2
    assert "TorchScript, `--reference` published parent" in table(rows)
