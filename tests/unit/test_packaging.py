"""The wheel installs under the project's own name: the library (shared/) as
``modelguard``, the deployables (services/) as ``modelguard.services``; nothing named
``shared`` or ``services`` reaches site-packages."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _tool() -> dict[str, object]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    tool: dict[str, object] = data["tool"]["setuptools"]
    return tool


def test_package_dir_maps_the_folders_to_the_project_name() -> None:
    assert _tool()["package-dir"] == {"modelguard": "shared", "modelguard.services": "services"}


def test_every_package_of_the_tree_is_declared_and_nothing_else() -> None:
    tree = set()
    for top, name in (("shared", "modelguard"), ("services", "modelguard.services")):
        for init in (REPO / top).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO / top).parts
            tree.add(".".join((name, *parts)))
    declared = set(_tool()["packages"])  # type: ignore[arg-type]
    assert declared == tree, f"missing: {sorted(tree - declared)}; extra: {sorted(declared - tree)}"
    assert not any(p.split(".")[0] in ("shared", "services") for p in declared)


def test_data_files_ship_with_the_wheel() -> None:
    data = _tool()["package-data"]
    assert "*.json" in data["*"]  # type: ignore[index]  # the leak detector's calibration
