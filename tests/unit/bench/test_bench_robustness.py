"""bench/bench_robustness.py: which zoo models it draws curves for, how it stops when the
zoo is not built, the ART agreement bar, and the smoke mode end to end (a zoo of
untrained models stands in for the built one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import bench_robustness
from bench.bench_robustness import art_verdict, compared_on_art, zoo_entries, zoo_subset
from bench.zoo import HELDOUT, INDEX, ZooEntry, zoo_specs
from modelguard.formats.loader import weights_to_safetensors
from modelguard.nn.architectures import build


def fake_zoo(zoo_dir: Path, names: list[str]) -> None:
    """The zoo models ``names`` with untrained weights and their index entries."""
    specs = {s.name: s for s in zoo_specs()}
    index = {}
    for name in names:
        spec = specs[name]
        torch.manual_seed(0)
        (zoo_dir / f"{name}.safetensors").write_bytes(weights_to_safetensors(build(spec.arch)))
        entry = ZooEntry(
            name=name,
            arch=spec.arch,
            dataset=spec.dataset,
            seed=spec.seed,
            kind=spec.kind,
            triggers=spec.triggers,
            clean_accuracy=0.1,
            attack_success=[0.1] * len(spec.triggers),
            twin=spec.twin,
            seconds=0.0,
            spec=spec.spec,
            split=spec.split,
        )
        index[name] = entry.to_dict()
    (zoo_dir / INDEX).write_text(json.dumps(index))


def test_the_curves_cover_every_clean_model_and_one_backdoored_model_per_architecture() -> None:
    specs = {s.name: s for s in zoo_specs(HELDOUT)}
    names = zoo_subset(HELDOUT)
    clean = [n for n in names if not specs[n].triggers]
    backdoored = [n for n in names if specs[n].triggers]
    assert clean == [s.name for s in specs.values() if not s.triggers]
    architectures = {s.arch for s in specs.values()}
    assert sorted(specs[n].arch for n in backdoored) == sorted(architectures)
    assert len(architectures) >= 2


def test_art_is_compared_on_the_first_clean_model_of_each_architecture(tmp_path: Path) -> None:
    names = zoo_subset(HELDOUT)
    fake_zoo(tmp_path, names)
    entries = zoo_entries(names, tmp_path, ensure=False)
    chosen = compared_on_art(entries)
    assert {e.arch for e in entries if e.name in chosen} == {e.arch for e in entries}
    assert len(chosen) == len({e.arch for e in entries})
    assert not any(e.infected for e in entries if e.name in chosen)


def test_a_missing_zoo_model_stops_the_run_with_the_command_that_builds_it(
    tmp_path: Path,
) -> None:
    names = zoo_subset(HELDOUT)
    fake_zoo(tmp_path, names[:1])
    with pytest.raises(SystemExit, match=r"python -m bench\.zoo .*--ensure") as stopped:
        zoo_entries(names, tmp_path, ensure=False)
    assert names[0] not in str(stopped.value).split("bench.zoo")[1]
    assert all(name in str(stopped.value) for name in names[1:])


def comparison(model: str, points: float) -> dict[str, object]:
    return {"model": model, "attack": "PGD", "eps": 0.3, "ours": 0.5, "art": 0.5, "points": points}


def test_the_art_agreement_fails_beyond_five_points_either_way() -> None:
    assert art_verdict([comparison("a", 1.0), comparison("b", -5.0)]).startswith(
        "- ART agreement: met: largest difference 5.0 points (b, PGD"
    )
    assert "NOT MET" in art_verdict([comparison("a", 0.0), comparison("b", -5.2)])
    assert "NOT MET" in art_verdict([comparison("a", 7.0)])


@pytest.mark.slow
def test_the_smoke_run_draws_the_zoo_curves_and_compares_with_art(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    names = zoo_subset(HELDOUT)
    fake_zoo(tmp_path, names)
    plot = tmp_path / "plot.png"
    monkeypatch.setattr(bench_robustness, "PLOT", plot)

    def no_record(*args: object, **kwargs: object) -> None:
        raise AssertionError("the smoke run must not write the results page")

    monkeypatch.setattr(bench_robustness.results, "record", no_record)
    assert bench_robustness.main(["--smoke", "--zoo-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in names:
        assert f"| {name} (" in out  # a curve row per zoo model
    rows = [line for line in out.splitlines() if line.startswith("| ") and "| ε |" not in line]
    art_rows = [r for r in rows if "| FGSM |" in r or "| PGD |" in r]
    compared = {r.split(" | ")[0].lstrip("| ") for r in art_rows}
    assert compared >= {"standard", "adversarially trained"} and len(compared) >= 4
    assert len(art_rows) == len(compared) * 2 * 3  # two attacks at three ε per model
    assert "- ART agreement: " in out
    assert not plot.exists()
