"""The one progress type and its scaling helper."""

from __future__ import annotations

import pytest

from modelguard.progress import Progress, scaled


def test_scaled_maps_a_part_onto_its_span_of_the_whole() -> None:
    seen: list[tuple[float, str]] = []

    def outer(fraction: float, message: str) -> None:
        seen.append((fraction, message))

    part: Progress = scaled(outer, 0.3, 0.7)
    part(0.0, "start")
    part(0.5, "half")
    part(1.0, "")
    assert seen == [(0.3, "start"), (pytest.approx(0.65), "half"), (1.0, "")]


def test_scaled_of_nobody_is_nobody() -> None:
    assert scaled(None, 0.0, 0.5) is None
