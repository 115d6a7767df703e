"""The results page the benchmarks write: each benchmark owns one section, which carries
the command, commit, machine and date of the run that produced it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench import results


def test_a_section_records_command_commit_machine_and_date(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    results.record("repair", "Repair", "| a | b |", command="python -m bench.x --y", page=page)
    text = page.read_text()
    assert text.startswith("# Benchmark results")
    assert "`python -m bench.x --y`" in text
    assert "commit `" in text and "Machine:" in text and " UTC" in text
    assert "| a | b |" in text


def test_a_benchmark_replaces_only_its_own_section_and_order_is_kept(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    results.record("serving", "Serving", "old serving", command="c", page=page)
    results.record("detection", "Detection", "first detection", command="c", page=page)
    results.record("detection", "Detection", "second detection", command="c", page=page)
    text = page.read_text()
    assert "first detection" not in text and "second detection" in text
    assert "old serving" in text
    assert text.index("## Detection") < text.index("## Serving")  # ORDER, not write order
    assert text.count("<!-- bench:detection:begin -->") == 1


def test_an_unknown_section_is_appended(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    results.record("zoo", "Zoo", "z", command="c", page=page)
    results.record("new-thing", "New", "n", command="c", page=page)
    text = page.read_text()
    assert text.index("## Zoo") < text.index("## New")


def test_the_commit_label_ignores_the_results_page_but_not_the_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "benchmarks.md").write_text("page\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    monkeypatch.setattr(results, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(results, "PAGE", tmp_path / "docs" / "benchmarks.md")
    clean = results.commit_label()
    assert len(clean) == 12 and "+" not in clean
    (tmp_path / "docs" / "benchmarks.md").write_text("page written by a run\n")
    assert results.commit_label() == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert results.commit_label() == clean + "+changes"
