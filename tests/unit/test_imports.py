"""Import rules of the layout (docs/architecture.md): a service imports shared and the protos, never
another service; nothing in the library imports services; no import cycles. Every
import counts: module level, inside functions and under TYPE_CHECKING."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

REPO = Path(os.environ.get("MODELGUARD_REPO", Path(__file__).resolve().parents[2]))
LIB, APPS = "modelguard", "modelguard.services"
#: folder -> the import name it installs as (pyproject's package-dir)
FOLDERS = {"shared": LIB, "services": APPS}


def module_name(path: Path) -> str:
    folder, *parts = path.relative_to(REPO).with_suffix("").parts
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([FOLDERS[folder], *parts])


MODULES = {
    module_name(p): p
    for folder in FOLDERS
    for p in (REPO / folder).rglob("*.py")
    if "proto" not in p.relative_to(REPO).parts
}


def imports(name: str) -> set[str]:
    """The project modules ``name`` imports (a `from pkg import sub` counts as pkg.sub)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            candidates = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in MODULES:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                found.add(candidate)
    return found


GRAPH = {name: imports(name) for name in MODULES}


def service_of(name: str) -> str | None:
    """``x`` for a module of ``services/x/``."""
    if not name.startswith(APPS + "."):
        return None
    parts = name[len(APPS) + 1 :].split(".")
    return parts[0] if len(parts) > 1 else None


def test_no_service_imports_another_service() -> None:
    bad = [
        f"{a} -> {b}"
        for a, targets in GRAPH.items()
        for b in targets
        if service_of(a) and service_of(b) and service_of(a) != service_of(b)
    ]
    assert not bad, "\n".join(sorted(bad))


def test_library_does_not_import_services() -> None:
    def is_app(name: str) -> bool:
        return name == APPS or name.startswith(APPS + ".")

    bad = [f"{a} -> {b}" for a, t in GRAPH.items() if not is_app(a) for b in t if is_app(b)]
    assert not bad, "\n".join(sorted(bad))


def test_service_dirs_hold_only_their_own_modules() -> None:
    # the faces of a service are transports only: gRPC (servicer), HTTP/JSON (http_api) and
    # the Open Inference Protocol (inference), each a thin translation onto ``service``
    faces = {"servicer", "http_api", "inference"}
    allowed = {"__init__", "main", "handler", "service", "state", "report", *faces}
    bad = [n for n in MODULES if service_of(n) and n.split(".")[-1] not in allowed]
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                cycles.append(sorted([v, *component]))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, cycles


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
