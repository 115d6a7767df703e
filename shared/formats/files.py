"""The file-safety scan of model files on disk, for a CI gate (``modelguard scan``).

Each path is scanned as an audit's upload is (`modelguard.formats.scan.scan_model_bytes`:
format sniffed, then that format's full scan; nothing is unpickled or loaded). A folder is
walked for files with a model file's suffix. The outcome of a file is ``safe``, ``unsafe``
(it could run code when loaded, or is refused for its structure) or ``unreadable``
(missing, corrupt, truncated, oversized or of no known format). ``sarif_log`` writes the
findings as a SARIF 2.1.0 log (OASIS Static Analysis Results Interchange Format), the
form code-scanning services take.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from modelguard.errors import InvalidInput, UnsafeArtifact
from modelguard.formats.registry import FORMATS, get_format
from modelguard.formats.scan import scan_model_bytes

Outcome = Literal["safe", "unsafe", "unreadable"]

#: Suffixes of files a folder walk scans: the registered formats' and those pickled
#: checkpoints are commonly saved with (refused with the reason when they are pickles).
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pth", ".pt", ".bin", ".ckpt", ".joblib", ".dill")

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


@dataclass(frozen=True)
class Rule:
    """A SARIF reporting rule: one kind of finding."""

    id: str
    name: str
    description: str
    level: Literal["error", "warning"]


UNSAFE_RULE = Rule(
    "MG001",
    "UnsafeModelFile",
    "A model file that could run code when loaded (a pickle importing or calling "
    "something unsafe, custom TorchScript operators, nested payloads) or whose structure "
    "is refused (path traversal, zip bombs).",
    "error",
)
UNREADABLE_RULE = Rule(
    "MG002",
    "UnreadableModelFile",
    "A model file that could not be scanned: missing, corrupt, truncated, oversized or of "
    "no known format.",
    "warning",
)
RULES = (UNSAFE_RULE, UNREADABLE_RULE)
RULE_OF: dict[Outcome, Rule] = {"unsafe": UNSAFE_RULE, "unreadable": UNREADABLE_RULE}


@dataclass(frozen=True)
class FileScan:
    """The scan of one file: ``format`` is the registry name of a scanned file's format,
    ``reason`` why an unsafe or unreadable file is one, ``details`` what was inspected."""

    path: Path
    outcome: Outcome
    format: str | None = None
    reason: str | None = None
    details: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "outcome": self.outcome,
            "format": self.format,
            "reason": self.reason,
            "details": list(self.details),
        }


@dataclass(frozen=True)
class ScanReport:
    """The scans of the files found, and the files a folder walk passed over."""

    files: list[FileScan]
    skipped: list[Path] = field(default_factory=list)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for scan in self.files if scan.outcome == outcome)

    @property
    def findings(self) -> list[FileScan]:
        return [scan for scan in self.files if scan.outcome != "safe"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": [scan.to_dict() for scan in self.files],
            "skipped": [str(path) for path in self.skipped],
            "summary": {
                "scanned": len(self.files),
                **{outcome: self.count(outcome) for outcome in ("safe", "unsafe", "unreadable")},
            },
        }


def model_suffixes() -> frozenset[str]:
    """Suffixes a folder walk scans (lower case, with the dot)."""
    registered = (get_format(name).extension for name in FORMATS)
    return frozenset((*registered, *PICKLE_SUFFIXES))


def scan_file(path: Path, max_bytes: int) -> FileScan:
    """Scan the file at ``path`` (at most ``max_bytes`` long; larger is unreadable)."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InvalidInput(f"model file is {size} bytes; the limit is {max_bytes}")
        data = path.read_bytes()
    except OSError as err:
        return FileScan(path, "unreadable", reason=f"cannot read the file: {err.strerror}")
    except InvalidInput as err:
        return FileScan(path, "unreadable", reason=str(err))
    try:
        result = scan_model_bytes(data, max_bytes)
    except UnsafeArtifact as err:
        return FileScan(path, "unsafe", reason=str(err))
    except InvalidInput as err:
        return FileScan(path, "unreadable", reason=str(err))
    return FileScan(path, "safe", format=result.kind, details=list(result.details))


def scan_paths(paths: Iterable[Path], max_bytes: int) -> ScanReport:
    """Scan every file named and every file with a model suffix below every folder named
    (symbolic links to folders are not followed); the walk's other files are skipped."""
    suffixes = model_suffixes()
    files: list[FileScan] = []
    skipped: list[Path] = []
    for path in paths:
        if not path.is_dir():
            files.append(scan_file(path, max_bytes))
            continue
        for root, folders, names in os.walk(path):
            folders.sort()
            for name in sorted(names):
                found = Path(root) / name
                if found.suffix.lower() in suffixes:
                    files.append(scan_file(found, max_bytes))
                else:
                    skipped.append(found)
    return ScanReport(files, skipped)


def artifact_uri(path: Path) -> str:
    """A SARIF ``artifactLocation.uri``: a relative path stays a relative reference (the
    code-scanning services resolve it against the checkout), an absolute one is a file URI."""
    if path.is_absolute():
        return path.as_uri()
    return quote(path.as_posix())


def sarif_log(report: ScanReport, tool_version: str) -> dict[str, Any]:
    """The findings of ``report`` as a SARIF 2.1.0 log with one run (safe files give no
    result)."""
    rule_index = {rule.id: index for index, rule in enumerate(RULES)}
    results = []
    for scan in report.findings:
        rule = RULE_OF[scan.outcome]
        results.append(
            {
                "ruleId": rule.id,
                "ruleIndex": rule_index[rule.id],
                "level": rule.level,
                "message": {"text": scan.reason or rule.description},
                "locations": [
                    {"physicalLocation": {"artifactLocation": {"uri": artifact_uri(scan.path)}}}
                ],
            }
        )
    return {
        "version": SARIF_VERSION,
        "$schema": SARIF_SCHEMA,
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "modelguard",
                        "version": tool_version,
                        "rules": [
                            {
                                "id": rule.id,
                                "name": rule.name,
                                "shortDescription": {"text": rule.description},
                                "defaultConfiguration": {"level": rule.level},
                            }
                            for rule in RULES
                        ],
                    }
                },
                "results": results,
            }
        ],
    }
