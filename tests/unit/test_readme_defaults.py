"""Every default the README's defaults table states is the code's: each row names a field
by its dotted Python path (a dataclass or a pydantic-settings field), and its default is
imported and compared with the table's value."""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

README = Path(__file__).resolve().parents[2] / "README.md"
BEGIN, END = "<!-- defaults:begin -->", "<!-- defaults:end -->"

#: What a unit after a number multiplies it by ("1%" is 0.01: shares are fractions).
UNITS: dict[str, Fraction] = {
    "": Fraction(1),
    "%": Fraction(1, 100),
    "GiB": Fraction(1 << 30),
    "h": Fraction(3600),
    "day": Fraction(86_400),
}
NUMBER = re.compile(r"^(?P<number>\d[\d,]*(?:\.\d+)?(?:/\d+)?)\s*(?P<unit>%|GiB|h|day)?$")

#: The defaults the README's prose relies on: the table must keep a row for each.
REQUIRED = {
    "ReversalConfig.rule",
    "ReversalConfig.attack_threshold",
    "ReversalConfig.anomaly_threshold",
    "ReversalConfig.max_norm_ratio",
    "ReversalConfig.mask_start",
    "RollbackConfig.q0",
    "RollbackConfig.min_drop",
    "RollbackConfig.asr_stop",
    "ShapleyPruneConfig.per_round",
    "ShapleyPruneConfig.asr_stop",
    "ShapleyPruneConfig.converge_tol",
    "ShapleyPruneConfig.max_rounds",
    "ShapleyPruneConfig.max_pruned_fraction",
    "PruningOrchestratorSettings.max_upload_bytes",
    "PlatformSettings.stage_time_limit_seconds",
    "ResultMapperSettings.rate_per_second",
    "ResultMapperSettings.rate_burst",
    "ResultMapperSettings.query_budget_rows",
}


def table_rows(text: str) -> list[tuple[str, str]]:
    """``(dotted path, default text)`` of every row between the markers."""
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "defaults table markers"
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = []
    for line in block.strip().splitlines()[2:]:  # after the header and the --- line
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == 3, f"a row is | setting | default | meaning |: {line!r}"
        rows.append((cells[0].strip("`"), cells[1]))
    return rows


def parse_value(text: str) -> Any:
    """``"0.5%"`` → 0.005, ``"1/3"``, ``"200,000"``, ``"1 GiB"``, ``"1 h"``; a value in
    backticks is a string."""
    if text.startswith("`") and text.endswith("`"):
        return text.strip("`")
    match = NUMBER.match(text)
    assert match, f"unreadable default {text!r}"
    number = Fraction(match["number"].replace(",", ""))
    return number * UNITS[match["unit"] or ""]


def code_default(path: str) -> Any:
    """The default of the field ``module.Class.field``."""
    module_name, class_name, field_name = path.rsplit(".", 2)
    owner = getattr(importlib.import_module(module_name), class_name)
    if dataclasses.is_dataclass(owner):
        fields = {f.name: f for f in dataclasses.fields(owner)}
        assert field_name in fields, f"{path}: no such field"
        return fields[field_name].default
    assert isinstance(owner, type) and issubclass(owner, BaseModel), f"{path}: not a config"
    assert field_name in owner.model_fields, f"{path}: no such field"
    # the declared default, not the environment's value
    return owner.model_fields[field_name].default


def same(stated: Any, actual: Any) -> bool:
    if isinstance(stated, str):
        return bool(stated == actual)
    return isinstance(actual, (int, float)) and math.isclose(float(stated), actual, rel_tol=1e-9)


def test_parser_reads_the_forms_the_table_uses() -> None:
    assert parse_value("0.5%") == Fraction(1, 200)
    assert parse_value("1/3") == Fraction(1, 3)
    assert parse_value("200,000") == 200_000
    assert parse_value("1 GiB") == 1 << 30
    assert parse_value("1 h") == 3600
    assert parse_value("`log`") == "log"
    assert not same(parse_value("2%"), 0.005)


def test_table_covers_the_defaults_the_prose_states() -> None:
    named = {".".join(path.rsplit(".", 2)[1:]) for path, _ in table_rows(README.read_text())}
    assert named >= REQUIRED, f"rows missing from the README's defaults table: {REQUIRED - named}"


@pytest.mark.parametrize(("path", "stated"), table_rows(README.read_text()))
def test_readme_default_is_the_code_default(path: str, stated: str) -> None:
    actual = code_default(path)
    assert same(parse_value(stated), actual), (
        f"README says {path} defaults to {stated}; the code says {actual!r}"
    )
