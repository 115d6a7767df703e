"""The reference benchmark's summary: the smallest natural and the largest planted ratio
of each split, the rows as a table."""

from __future__ import annotations

from typing import Any

from bench.bench_reference import extremes, table


def _row(split: str, kind: str, ratio: float | None, label: int = 1) -> dict[str, Any]:
    submitted = 0.8 if ratio is not None else 0.0
    return {
        "model": "m",
        "split": split,
        "label": label,
        "kind": kind,
        "flagged": kind == "planted",
        "submitted": submitted,
        "reference": (ratio or 0.0) * submitted,
        "ratio": ratio,
        "l1": 12.0,
    }


def test_the_summary_names_each_splits_extremes() -> None:
    rows = [
        _row("tuning", "natural", 0.7),
        _row("tuning", "natural", 0.36),
        _row("tuning", "natural", None),  # the submitted model never followed it
        _row("tuning", "planted", 0.0),
        _row("heldout", "natural", 0.8),
    ]
    summary = extremes(rows)
    tuning = "tuning: natural triggers' ratio at least 0.36 over 2, planted at most 0.00 over 1"
    assert tuning in summary
    assert "heldout: natural triggers' ratio at least 0.80 over 1, planted none" in summary
    text = table(rows)
    assert "| m | tuning | 1 | planted | yes | 0.80 | 0.00 | 0.00 | 12 |" in text
    assert "| m | tuning | 1 | natural | no | 0.00 | 0.00 | – | 12 |" in text
